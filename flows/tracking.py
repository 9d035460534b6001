"""MLflow lineage of compression jobs: one parent run per job, one child run per iteration.

Everything goes through `MlflowClient` with explicit run ids, because MLflow's active-run
stack is thread-local and Prefect may run tasks in other threads. A job that was killed
leaves its parent run RUNNING; re-running the same job (same config fingerprint and
output folder) resumes that parent run and re-logs only the iterations it lacks. The
final model is logged as an MLflow model (transformers flavor, text-generation) of the
parent run, registered as a new version of `iterabre-<base model>` with its lineage, and
given the alias `champion` or `challenger` by flows/registry.py (never stages).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from flows import registry
from iterabre.config import CompressConfig
from iterabre.errors import IterabreError
from iterabre.files import git_commit
from iterabre.modelcard import parameter_count
from iterabre.paths import REPO_ROOT

EXPERIMENT = os.environ.get("ITERABRE_MLFLOW_EXPERIMENT", "iterabre")
TAG_MODEL, TAG_REVISION, TAG_FINGERPRINT = "iterabre.model", "iterabre.revision", "iterabre.fingerprint"
TAG_OUTPUT, TAG_STEP, TAG_KIND = "iterabre.output", "iterabre.step", "iterabre.kind"
TAG_TEACHER = "iterabre.teacher"
PARENT_TAG = "mlflow.parentRunId"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the repository (git-ignored)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store: `mlruns/` next to the .db file, so artifacts never depend on the cwd."""
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides its own artifact store
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()


def _probe_server(uri: str, timeout_s: float = 10, tries: int = 2) -> None:
    """For an HTTP tracking URI: refuse, in one line, a server that does not answer `/health`.

    MLflow's own client retries a dead server with backoff for minutes; this answers in seconds.
    """
    import time
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    started, error = time.monotonic(), None
    for attempt in range(tries):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s)
            return
        except urllib.error.HTTPError:
            return  # it answered (auth or a proxy path): the query below says more
        except OSError as e:
            error = e
            if attempt + 1 < tries:
                time.sleep(2)
    raise IterabreError(f"the MLflow tracking server {uri} is unreachable: it did not answer ({tries} tries in "
                        f"{time.monotonic() - started:.0f} s: {getattr(error, 'reason', error)}).",
                        "start it (`mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000`), fix "
                        "MLFLOW_TRACKING_URI, or unset it to use the embedded SQLite store")


def connect(uri: str | None = None):
    """An MlflowClient on `uri` that has answered one query (fails here, before any compute)."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    _probe_server(uri)
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # any driver/network error means the same thing to the user
        raise IterabreError(f"the MLflow tracking store {uri} is unreachable ({str(e).splitlines()[0][:200]}).",
                            "start the MLflow server or set MLFLOW_TRACKING_URI to a reachable store, "
                            "e.g. sqlite:///mlflow.db") from None
    return client


def experiment_id(client, uri: str | None = None) -> str:
    """Id of the `iterabre` experiment, created on first use."""
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(EXPERIMENT, artifact_location=_artifact_root(uri or tracking_uri()))


def registered_name(model: str) -> str:
    """Registry name from the base model spec: 'HuggingFaceTB/SmolLM2-135M' -> 'iterabre-smollm2-135m'."""
    stem = Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
    return "iterabre-" + re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """{'recovery': {'lr': 1e-4}} -> {'recovery.lr': '0.0001'} (MLflow params are strings)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = "None" if value is None else str(value)
    return out


def _data_tags() -> dict[str, str]:
    """DVC md5 and dirty flag of the data folder ('unknown' outside a full checkout)."""
    from iterabre.data import data_version

    try:
        version = data_version()
    except IterabreError:
        return {"data.md5": "unknown", "data.dirty": "unknown"}
    return {"data.md5": version["md5"], "data.dirty": str(version["dirty"]).lower()}


def job_tags(cfg: CompressConfig, flow_run_id: str | None) -> dict[str, str]:
    """Tags that identify a job: base model + revision, fingerprint, code and data versions."""
    commit = git_commit()
    return {TAG_MODEL: cfg.model, TAG_REVISION: cfg.revision or "none", TAG_FINGERPRINT: cfg.fingerprint(),
            TAG_OUTPUT: str(Path(cfg.output).resolve()), TAG_KIND: "job", "git.commit": commit,
            "mlflow.source.git.commit": commit, "prefect.flow_run_id": str(flow_run_id or "none"),
            **_data_tags()}


def _search(client, exp_id: str, filters: dict[str, str], status: str | None = None) -> list:
    """Runs whose tags equal `filters` (and, optionally, with this status), newest first."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in filters.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    return client.search_runs([exp_id], " and ".join(clauses), order_by=["attributes.start_time DESC"])


def finished_jobs(client, model: str, revision: str | None, fingerprint: str) -> list:
    """FINISHED parent runs of this model, revision and config fingerprint (any output folder)."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    filters = {TAG_KIND: "job", TAG_MODEL: model, TAG_REVISION: revision or "none", TAG_FINGERPRINT: fingerprint}
    return _search(client, exp.experiment_id, filters, "FINISHED")


@dataclass
class Job:
    """A parent run and the client that writes to it."""

    client: object
    run_id: str
    experiment_id: str


def start_job(client, cfg: CompressConfig, extra_params: dict, flow_run_id: str | None) -> Job:
    """Resume this job's unfinished parent run (same fingerprint + output) or open a new one."""
    exp_id = experiment_id(client)
    tags = job_tags(cfg, flow_run_id)
    key = {k: tags[k] for k in (TAG_KIND, TAG_FINGERPRINT, TAG_OUTPUT)}
    stale = [r for r in _search(client, exp_id, key) if r.info.status != "FINISHED"]
    if stale:
        run_id = stale[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "iterabre.resumed", "true")
    else:
        run_id = client.create_run(exp_id, run_name=f"{registered_name(cfg.model)}-{tags[TAG_FINGERPRINT][:8]}").info.run_id
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    _log_params(client, run_id, {**flatten(cfg.to_dict()), **flatten(extra_params)})
    return Job(client, run_id, exp_id)


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Log params the run does not have yet (MLflow refuses to change a logged value)."""
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    new = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
    for start in range(0, len(new), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=new[start:start + 100])


def _metrics(prefix: str, evaluation: dict) -> dict[str, float]:
    """{'blimp': {'acc': 0.7}} -> {'<prefix>blimp/acc': 0.7}."""
    return {f"{prefix}{task}/{name}": float(v) for task, row in evaluation.items() for name, v in row.items()}


def _log_metrics(client, run_id: str, values: dict[str, float], step: int = 0) -> None:
    """Log a dict of metrics at one step, in batches."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[start:start + 500])


def _step_child(job: Job, step: int):
    """The existing child run of iteration `step`, if any (newest first)."""
    found = _search(job.client, job.experiment_id, {PARENT_TAG: job.run_id, TAG_STEP: str(step)})
    return found[0] if found else None


# What every recovery method reports, whatever it is (kd, reconstruct, none, ...).
RECOVERY_METRICS = ("loss_before", "loss_after", "tokens", "seconds", "peak_mem_mb",
                    "heldout_rel_error_before", "heldout_rel_error_after")


def log_step(job: Job, record: dict, checkpoint: str | None) -> str:
    """One child run per iteration: removed blocks, scores, recovery curve, eval, checkpoint."""
    old = _step_child(job, record["step"])
    if old is not None and old.info.status == "FINISHED":
        return old.info.run_id  # logged before a resume: nothing to add
    if old is not None:
        job.client.delete_run(old.info.run_id)  # half-logged by a killed process
    client, step = job.client, record["step"]
    teacher = str(record.get("teacher", "unknown"))  # base | previous: whom this step distilled from
    run_id = client.create_run(job.experiment_id, run_name=record.get("name") or f"step-{step:02d}",
                               tags={PARENT_TAG: job.run_id, TAG_STEP: str(step), TAG_KIND: "step",
                                     TAG_TEACHER: teacher}).info.run_id
    client.log_param(run_id, "removed", ",".join(map(str, record["removed"])))
    client.log_param(run_id, "teacher", teacher)
    if record.get("budget") is not None:
        client.log_param(run_id, "budget", str(record["budget"]))
    if record.get("chosen"):  # scorer=select: which rule's set went, and every proposed set's distance
        client.log_param(run_id, "select_chosen", record["chosen"])
        _log_metrics(client, run_id, {f"select/distance_{rule}": d for rule, d in record["distances"].items()})
    if rec_method := record["recovery"].get("extra", {}).get("auto"):  # recovery=auto: the method it ran
        client.log_param(run_id, "recovery_auto", rec_method)
    rec = record["recovery"]
    _log_metrics(client, run_id, {f"score/block_{i}": s for i, s in record["scores"].items()})
    _log_metrics(client, run_id, {"num_layers": record["num_layers"], **_metrics("eval/", record["eval"]),
                                  **{f"recovery/{k}": rec[k] for k in RECOVERY_METRICS if rec.get(k) is not None}})
    for opt_step, loss in rec.get("losses", []):
        _log_metrics(client, run_id, {"recovery/loss": loss}, step=int(opt_step))
    if checkpoint:
        client.log_artifacts(run_id, checkpoint, "checkpoint")
    client.set_terminated(run_id, "FINISHED")
    _log_metrics(client, job.run_id, {"num_layers": record["num_layers"],
                                      "recovery/loss_after": rec.get("loss_after")}, step=step)
    return run_id


def log_evals(job: Job, base_eval: dict, final_eval: dict) -> None:
    """Base and final metrics on the parent run (base/<task>/<metric>, final/...)."""
    _log_metrics(job.client, job.run_id, {**_metrics("base/", base_eval), **_metrics("final/", final_eval)})


def register_final(job: Job, report: dict) -> dict:
    """Log `report["final_dir"]` as the job's MLflow model, register it with its lineage, and alias it.

    The alias is `champion` only when the gates passed and the version is not worse than the
    registry's current champion (flows/registry.py); else `challenger`, with the reason on the
    version. Idempotent per parent run: a job killed after logging or registering reuses that
    logged model / version on resume.
    """
    client, name, final_dir = job.client, registered_name(report["base_model"]), report["final_dir"]
    tags = registry.lineage_tags(report, client.get_run(job.run_id).data.tags, parameter_count(final_dir),
                                 _weights_bytes(final_dir))
    version = _registered_version(client, name, job.run_id)
    if version is None:
        model_id = _logged_model_id(job) or log_final_model(job, final_dir)
        _ensure_registered_model(client, name)
        with _global_store(client):
            version = client.create_model_version(name, source=f"models:/{model_id}", run_id=job.run_id, tags=tags,
                                                  model_id=model_id).version
    version = str(version)
    gates = report["promotion"]["alias"], list(report["promotion"]["reasons"])
    alias, reasons = registry.choose_alias(client, name, version, gates, tags)
    registry.record_decision(client, name, version, alias, reasons, tags, gates[1])
    for k, v in {"registry.name": name, "registry.version": version, "registry.alias": alias}.items():
        client.set_tag(job.run_id, k, v)
    return {"name": name, "version": int(version), "alias": alias, "reasons": reasons,
            "uri": f"models:/{name}@{alias}", "version_uri": f"models:/{name}/{version}"}


@contextlib.contextmanager
def _global_store(client):
    """MLflow's SQL registry looks a `models:/<id>` source up through a new client on the *global* tracking
    URI (its own TODO in create_model_version), whose default is ./mlflow.db of the working directory: a
    job started anywhere but the repository root would not find its logged model. So MLFLOW_TRACKING_URI,
    which that global URI falls back to, names the job's store for that one call and is put back after
    (mlflow.set_tracking_uri would not do: setting it back to unset also deletes the variable)."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = client.tracking_uri
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _ensure_registered_model(client, name: str) -> None:
    try:
        client.get_registered_model(name)
    except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST); the type varies across stores
        client.create_registered_model(name, description="Block-pruned and recovered models made by iterabre.")


def _registered_version(client, name: str, run_id: str) -> str | None:
    """The version of `name` this parent run registered already, if any."""
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except Exception:  # no such registered model yet
        return None
    return found[0].version if found else None


def _weights_bytes(folder: str) -> int:
    """Bytes of the model's weight files (what a deployment downloads, give or take the tokenizer)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


# ---------------------------------------------------------------- the final model as an MLflow model

MODEL_NAME = "model"  # the logged model's name within the job
# What the served model accepts per request (`params`), and an example request.
GENERATION_PARAMS = {"max_new_tokens": 32}
INPUT_EXAMPLE = ["Once upon a time"]
PINNED = ("torch", "transformers", "tokenizers", "safetensors")  # installed versions, pinned: nothing inferred


def _pip_requirements() -> list[str]:
    """Exact pins of what loading the model needs (MLflow adds itself); inferring them would go online."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in PINNED]  # 2.13.0+cpu -> 2.13.0


def _logged_model_id(job: Job) -> str | None:
    """The finished logged model of this parent run, if an earlier attempt logged it; half-logged ones go."""
    from mlflow.entities import LoggedModelStatus

    found = job.client.search_logged_models([job.experiment_id], filter_string=f"source_run_id = '{job.run_id}'")
    mine = [m for m in found if m.name == MODEL_NAME]
    for model in mine:
        if model.status != LoggedModelStatus.READY:
            job.client.delete_logged_model(model.model_id)  # a process killed while saving or uploading it
    return next((m.model_id for m in mine if m.status == LoggedModelStatus.READY), None)


def log_final_model(job: Job, final_dir: str) -> str:
    """Log the model in `final_dir` with the transformers flavor (weights, not a hub reference); its id.

    The model is loaded once, in its stored dtype, and saved by MLflow into a temporary folder
    next to `final_dir` (same disk), then uploaded. `save_model` + the client, rather than
    `mlflow.transformers.log_model`, because log_model would load a second copy of the weights
    to check the input example.
    """
    import tempfile

    import mlflow.transformers
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model, infer_signature
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = job.client
    logged = client.create_logged_model(job.experiment_id, name=MODEL_NAME, source_run_id=job.run_id,
                                        tags={TAG_KIND: "final-model"})
    components = {"model": AutoModelForCausalLM.from_pretrained(final_dir, dtype="auto"),
                  "tokenizer": AutoTokenizer.from_pretrained(final_dir)}
    signature = infer_signature(INPUT_EXAMPLE, ["Once upon a time, there was"], params=GENERATION_PARAMS)
    meta = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=job.run_id,
                 model_id=logged.model_id)
    with tempfile.TemporaryDirectory(dir=Path(final_dir).parent, prefix=".mlflow-model-") as tmp:
        mlflow.transformers.save_model(components, path=f"{tmp}/model", task="text-generation", signature=signature,
                                       input_example=INPUT_EXAMPLE, pip_requirements=_pip_requirements(),
                                       mlflow_model=meta, model_card=_model_card(final_dir))
        components.clear()  # the weights are on disk now; free them before the upload
        client.log_model_artifacts(logged.model_id, f"{tmp}/model")
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(job.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def _model_card(final_dir: str):
    """final/README.md as a huggingface_hub ModelCard (MLflow stores it as model_card.md), or None.

    Without one MLflow would try to fetch the base model's card from the hub.
    """
    from huggingface_hub import ModelCard

    card = Path(final_dir) / "README.md"
    return ModelCard(card.read_text(encoding="utf-8")) if card.is_file() else ModelCard("---\nlicense: unknown\n---\n")


def finish_job(job: Job, files: list[str]) -> None:
    """Attach report files to the parent run and mark it FINISHED."""
    for path in files:
        job.client.log_artifact(job.run_id, path, "report")
    job.client.set_terminated(job.run_id, "FINISHED")


def fail_job(job: Job, killed: bool = False) -> None:
    """Mark the parent run KILLED (a signal or Ctrl-C) or FAILED; a later identical run resumes it."""
    job.client.set_terminated(job.run_id, "KILLED" if killed else "FAILED")
