"""MLflow lineage of compression jobs: one parent run per job, one child run per iteration.

Everything goes through `MlflowClient` with explicit run ids, because MLflow's active-run
stack is thread-local and Prefect may run tasks in other threads. A job that was killed
leaves its parent run RUNNING; re-running the same job (same config fingerprint and
output folder) resumes that parent run and re-logs only the iterations it lacks. The
final model is logged as artifacts of the parent run, registered as a new version of
`iterabre-<base model>` and given the alias `champion` or `challenger` (never stages).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from iterabre.config import CompressConfig
from iterabre.errors import IterabreError
from iterabre.files import git_commit
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

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri


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


def register_final(job: Job, model: str, final_dir: str, alias: str, reasons: list[str]) -> dict:
    """Log DIR/final on the parent run, register it as a new version and set its alias.

    Idempotent per parent run: a job killed after registering reuses its version on resume.
    """
    client = job.client
    name = registered_name(model)
    mine = _registered_version(client, name, job.run_id)
    if mine is None:
        client.log_artifacts(job.run_id, final_dir, "final")
        try:
            client.get_registered_model(name)
        except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST); the type varies across stores
            client.create_registered_model(name, description="Block-pruned and recovered models made by iterabre.")
        mine = client.create_model_version(name, source=f"{job.artifact_uri}/final", run_id=job.run_id,
                                           description="; ".join(reasons)).version
    client.set_registered_model_alias(name, alias, mine)
    client.set_model_version_tag(name, mine, "iterabre.gates", "; ".join(reasons))
    for k, v in {"registry.name": name, "registry.version": str(mine), "registry.alias": alias}.items():
        client.set_tag(job.run_id, k, v)
    return {"name": name, "version": int(mine), "alias": alias, "uri": f"models:/{name}@{alias}"}


def _registered_version(client, name: str, run_id: str) -> str | None:
    """The version of `name` this parent run registered already, if any."""
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except Exception:  # no such registered model yet
        return None
    return found[0].version if found else None


def finish_job(job: Job, files: list[str]) -> None:
    """Attach report files to the parent run and mark it FINISHED."""
    for path in files:
        job.client.log_artifact(job.run_id, path, "report")
    job.client.set_terminated(job.run_id, "FINISHED")


def fail_job(job: Job, killed: bool = False) -> None:
    """Mark the parent run KILLED (a signal or Ctrl-C) or FAILED; a later identical run resumes it."""
    job.client.set_terminated(job.run_id, "KILLED" if killed else "FAILED")
