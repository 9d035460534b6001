"""The registry as a team uses it: a real MLflow model with its lineage, promotion against the
champion the registry holds, `iterabre registry list|promote`, loading and serving by alias.

The scenario tests run against a real `mlflow server` (127.0.0.1, temp SQLite, temp artifact
root) and register the tiny model through `tracking.register_final`, the function the flow
calls, with reports whose metrics are chosen (a full job cannot be made better or worse at
will on a random model; tests/test_flow.py registers a real job's model).
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import _free_port, stop_process_group
from flows import registry, tracking
from iterabre import modelcard, planning
from iterabre.cli import app
from iterabre.config import CompressConfig
from iterabre.tiny import byte_tokenizer, tiny_model

BIN = Path(sys.executable).parent
runner = CliRunner()


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def final_dir(tmp_path_factory) -> Path:
    """A 4-block tiny Llama + tokenizer with a model card: what a job leaves in final/."""
    path = tmp_path_factory.mktemp("final") / "final"
    tiny_model("llama", 4).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    (path / "README.md").write_text(modelcard.render(report_for(path, "tiny", 20.0, 0.7)))
    return path


def report_for(final: Path, base: str, ppl: float, acc: float, acc_stderr: float = 0.01,
               limit: float | None = 2.0) -> dict:
    """A job's report with these final metrics (base: ppl 10, acc 0.75); the gates are the real ones."""
    base_eval = {"wikitext": {"word_perplexity": 10.0}, "blimp": {"acc": 0.75, "acc_stderr": 0.01}}
    final_eval = {"wikitext": {"word_perplexity": ppl}, "blimp": {"acc": acc, "acc_stderr": acc_stderr}}
    alias, reasons = planning.promotion(base_eval, final_eval, 0.9, 2.5)
    return {"base_model": base, "base_num_layers": 6, "final_num_layers": 4, "removed_layers": [3, 4],
            "config": {**CompressConfig(model=base, target_layers=4).to_dict(), "eval_tasks": "wikitext,blimp",
                       "eval_limit": limit},
            "data_version": {"md5": "0123abcd.dir"}, "base_eval": base_eval, "final_eval": final_eval,
            "final_dir": str(final), "promotion": {"alias": alias, "reasons": reasons},
            "budget": {"schedule": "increasing", "used_total": 256}, "licence": "Apache-2.0",
            "registered_name": tracking.registered_name(base),
            "num_parameters": {"base": 2 * modelcard.parameter_count(final), "final": modelcard.parameter_count(final)}}


def register(client, tmp_path: Path, report: dict) -> dict:
    """One job's parent run + registration, as the flow does it (`_finish` -> `register_final`)."""
    cfg = CompressConfig(model=report["base_model"], target_layers=4, output=str(tmp_path / f"out-{time.time_ns()}"))
    job = tracking.start_job(client, cfg, {}, "flow-run-123")
    report = {**report, "mlflow_run_id": job.run_id}
    return {**tracking.register_final(job, report), "run_id": job.run_id}


def version_tags(client, name: str, version: int) -> dict:
    return client.get_model_version(name, str(version)).tags


def champion_of(client, name: str) -> int:
    return int(client.get_model_version_by_alias(name, "champion").version)


# ---------------------------------------------------------------- pure: comparison and card

def _tags(ppl=20.0, acc=0.70, acc_se=0.01, params=1000, limit="2.0") -> dict:
    report = {"wikitext": {"word_perplexity": ppl}, "blimp": {"acc": acc, "acc_stderr": acc_se}}
    return {registry.TAG_PARAMS: str(params), registry.TAG_EVAL_LIMIT: limit, **registry.gate_tags(report, "final")}


def test_compare_within_one_standard_error_is_not_worse():
    assert registry.compare(_tags(acc=0.69), _tags(acc=0.70), "3") == []  # 0.01 < sqrt(2) * 0.01
    assert registry.compare(_tags(acc=0.74, ppl=19.0), _tags(), "3") == []  # better everywhere


def test_compare_names_every_reason_it_is_worse():
    worse = registry.compare(_tags(acc=0.60, ppl=20.5, params=1001), _tags(), "3")
    assert len(worse) == 3
    assert "1,001 parameters, more than champion v3's 1,000" in worse[0]
    assert "blimp acc 0.6 is worse than champion v3's 0.7 by more than one standard error (0.014)" in worse[1]
    assert "wikitext word_perplexity 20.5 is worse than champion v3's 20" in worse[2]  # no stderr: any rise


def test_compare_refuses_what_it_cannot_compare():
    assert "not comparable" in registry.compare(_tags(limit="None"), _tags(), "3")[-1]
    assert "stores no gate metric" in registry.compare(_tags(), {registry.TAG_PARAMS: "1000",
                                                                 registry.TAG_EVAL_LIMIT: "2.0"}, "3")[-1]
    mine = {k: v for k, v in _tags().items() if "blimp" not in k}
    assert registry.compare(mine, _tags(), "3") == ["no blimp acc to compare with champion v3's"]


def test_decide_needs_the_gates_and_the_comparison():
    assert registry.decide(("challenger", ["ppl gate"]), _tags(), None) == ("challenger", ["ppl gate"])
    assert registry.decide(("champion", ["ok"]), _tags(), None)[0] == "champion"
    alias, reasons = registry.decide(("champion", ["ok"]), _tags(ppl=25.0), ("2", _tags()))
    assert alias == "challenger" and reasons[0] == "ok" and "worse than champion v2" in reasons[1]
    assert registry.decide(("champion", ["ok"]), _tags(ppl=15.0), ("2", _tags()))[0] == "champion"


def test_model_card(final_dir):
    report = report_for(final_dir, "smollm2-135m", 20.0, 0.7)
    report["base_hub_id"] = modelcard.base_hub_id("smollm2-135m")
    card = modelcard.render(report)
    assert card.startswith("---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "with 2 of 6 decoder blocks removed" in card and "removal order): 3, 4" in card
    assert "| wikitext | word_perplexity | 10.00 | 20.00 |" in card
    assert "| blimp | acc | 0.7500 ± 0.0100 | 0.7000 ± 0.0100 |" in card
    assert "Apache-2.0, inherited from the base model" in card
    assert 'mlflow.pyfunc.load_model("models:/iterabre-smollm2-135m@champion")' in card
    assert "could not be found" in modelcard.render({**report, "licence": "unknown"})


def test_model_card_describes_what_the_job_did(final_dir):
    """The card's summary follows the job: one-shot select names the set it kept and the repair auto ran;
    the paper's iterative KD recipe reads as the paper's loop. Every scorer and method has its words."""
    from iterabre.recovery import RECOVERY_METHODS
    from iterabre.scorers import SCORERS

    assert set(modelcard.HOW_SCORED) == set(SCORERS)
    assert set(modelcard.HOW_REPAIRED) == set(RECOVERY_METHODS) - {"auto"}
    report = report_for(final_dir, "smollm2-135m", 20.0, 0.7)
    cfg = report["config"]
    assert cfg["scorer"] == "select" and cfg["recovery"]["method"] == "auto"  # the defaults
    steps = [{"step": 1, "chosen": "angular", "recovery": {"method": "reconstruct+kd"}}]
    card = modelcard.render({**report, "steps": steps})
    assert ("scored the decoder blocks once with `output` and `angular` and chose, of the sets they proposed, "
            "the one whose removal as a whole moves the final hidden states least (`angular`'s), removed its 2 "
            "blocks at once and refitted the block before each gap by least squares") in card
    assert "- Recovery: `auto` (ran `reconstruct+kd`) from the `base` teacher" in card
    paper = {**cfg, "scorer": "output", "schedule": "iterative", "recovery": {**cfg["recovery"], "method": "kd"}}
    card = modelcard.render({**report, "config": paper, "steps": [{"step": 1, "recovery": {"method": "kd"}}] * 2})
    assert ("scored every decoder block by how much the model's final hidden states change without it (the "
            "IteRABRe criterion), removed the least important, healed the smaller model by distillation from "
            "the original, and repeated until 4 blocks remained") in card
    iterative = {**cfg, "schedule": "iterative"}
    steps = [{"step": 1, "chosen": "output", "recovery": {"method": "block-recon+kd"}},
             {"step": 2, "chosen": "angular", "recovery": {"method": "reconstruct+kd"}}]
    card = modelcard.render({**report, "config": iterative, "steps": steps})
    assert "least (`output`'s at 1 step, `angular`'s at 1 step), removed that set, retrained the kept block(s)" in card
    assert "then distilled from the original or refitted the block before each gap by least squares" in card


def test_base_licence_from_the_base_models_files(tmp_path):
    assert modelcard.base_licence("smollm2-135m") == "Apache-2.0"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# A\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"license": "cc-by-4.0"}))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "README.md").write_text("# no front matter\n")
    assert [modelcard.base_licence(str(tmp_path / n)) for n in "abc"] == ["mit", "cc-by-4.0", "unknown"]
    assert modelcard.base_licence("nobody/not-cached") == "unknown"  # hub id, offline, not cached


def test_parameter_count_reads_headers_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert modelcard.parameter_count(tiny_model_dir) == model.num_parameters()


def test_a_half_logged_model_is_replaced_on_resume(final_dir, tmp_path):
    from mlflow.entities import LoggedModelStatus

    client = tracking.connect()  # the session's SQLite store
    cfg = CompressConfig(model="half-logged", target_layers=4, output=str(tmp_path / "out"))
    job = tracking.start_job(client, cfg, {}, None)
    killed = client.create_logged_model(job.experiment_id, name=tracking.MODEL_NAME, source_run_id=job.run_id)
    done = tracking.register_final(job, report_for(final_dir, "half-logged", 20.0, 0.7))
    left = client.search_logged_models([job.experiment_id], filter_string=f"source_run_id = '{job.run_id}'")
    assert [m.status for m in left] == [LoggedModelStatus.READY] and left[0].model_id != killed.model_id
    assert client.get_model_version(done["name"], str(done["version"])).source == f"models:/{left[0].model_id}"


def test_registration_finds_its_model_from_any_working_directory(final_dir, tmp_path, monkeypatch):
    """MLflow resolves a `models:/<id>` source through its global tracking URI, which defaults to ./mlflow.db of
    the working directory: a job whose store is elsewhere still registers its model, and the global URI and
    the environment are left as they were."""
    import os

    from mlflow.tracking._tracking_service import utils

    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # mlflow's default: sqlite:///mlflow.db in the working directory
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    done = register(tracking.connect(store), tmp_path, report_for(final_dir, "anywhere", 20.0, 0.7))
    assert done["version"] == 1 and utils._tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking.connect(store).get_model_version(done["name"], "1").run_id == done["run_id"]


# ---------------------------------------------------------------- bad input (embedded SQLite store)

@pytest.fixture
def bare_version():
    """A registered model with one version (no weights needed to test the CLI's refusals)."""
    client = tracking.connect()
    name = f"iterabre-bad-input-{time.time_ns()}"
    client.create_registered_model(name)
    client.create_model_version(name, source="file:///nowhere")
    return name


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_promote_refuses_unknown_model_version_and_bad_alias(bare_version):
    assert "no registered model 'iterabre-nope'" in _one_line_error(
        runner.invoke(app, ["registry", "promote", "iterabre-nope", "1"]))
    assert f"{bare_version} has no version 7. Fix: use one of: 1" in _one_line_error(
        runner.invoke(app, ["registry", "promote", bare_version, "7"]))
    for alias in ("bad alias", "latest", "v2"):
        assert f"MLflow refused the alias '{alias}'" in _one_line_error(
            runner.invoke(app, ["registry", "promote", bare_version, "1", "--alias", alias]))
    assert "no registered model" in _one_line_error(runner.invoke(app, ["registry", "list", "iterabre-nope"]))


def test_registry_commands_refuse_an_unreachable_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    for args in (["registry", "list"], ["registry", "promote", "iterabre-x", "1"]):
        assert "unreachable" in _one_line_error(runner.invoke(app, args))


# ---------------------------------------------------------------- a real tracking server

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free 127.0.0.1 port with a temp SQLite store and artifact root; yields its URI."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--default-artifact-root", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield uri
    finally:
        stop_process_group(proc, timeout=5)  # its workers may outlive SIGTERM for long: then SIGKILL
        log.close()


@pytest.fixture
def server_client(mlflow_server, monkeypatch):
    """A client of the test server; the CLI and mlflow's own loaders see it through MLFLOW_TRACKING_URI."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    # mlflow.get_tracking_uri() would read the patched variable back: keep the global itself (usually
    # unset), or every later in-process test would talk to this server after it has stopped.
    previous = utils._tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    yield tracking.connect()
    mlflow.set_tracking_uri(previous)  # None also unsets the variable; monkeypatch then restores it


@pytest.mark.slow
def test_worse_job_stays_challenger_better_job_takes_champion_promote_overrides(server_client, final_dir,
                                                                                tmp_path):
    client, base = server_client, "scenario-model"
    name = tracking.registered_name(base)
    first = register(client, tmp_path, report_for(final_dir, base, ppl=20.0, acc=0.70))
    assert (first["alias"], first["version"]) == ("champion", 1)
    assert "no champion yet" in first["reasons"][-1]

    worse = register(client, tmp_path, report_for(final_dir, base, ppl=24.0, acc=0.69))  # passes its gates
    assert worse["alias"] == "challenger" and champion_of(client, name) == 1
    tags = version_tags(client, name, worse["version"])
    assert tags["iterabre.promotion"] == "challenger"
    assert "wikitext word_perplexity 24 is worse than champion v1's 20" in tags["iterabre.promotion_reason"]
    assert "blimp acc 0.69" not in tags["iterabre.promotion_reason"]  # vs 0.70: within one standard error
    assert "worse than champion v1" in client.get_model_version(name, str(worse["version"])).description

    better = register(client, tmp_path, report_for(final_dir, base, ppl=18.0, acc=0.72))
    assert better["alias"] == "champion" and champion_of(client, name) == 3
    assert "not worse than champion v1" in version_tags(client, name, 3)["iterabre.promotion_reason"]

    result = runner.invoke(app, ["registry", "promote", name, "2", "--reason", "wins the human eval"])
    assert result.exit_code == 0, result.output
    assert champion_of(client, name) == 2
    override = version_tags(client, name, 2)["iterabre.override"]
    assert override.startswith("champion set by hand by ") and override.endswith(", replacing v3: wins the human eval")

    listing = runner.invoke(app, ["registry", "list", name])
    assert listing.exit_code == 0, listing.output
    header, *lines = [re.split(r"\s{2,}", line) for line in listing.output.splitlines()]
    rows = {row[1]: dict(zip(header, row)) for row in lines}
    assert list(rows) == ["3", "2", "1"] and all(r["model"] == name for r in rows.values())
    assert rows["2"]["aliases"] == "challenger,champion" and rows["2"]["decision"] == "set by hand"
    assert rows["3"]["aliases"] == "–" and rows["3"]["decision"] == "champion"  # its own decision stays
    assert (rows["1"]["blimp acc"], rows["2"]["wikitext ppl"], rows["1"]["blocks"]) == ("0.7 ± 0.01", "24", "4")


@pytest.mark.slow
def test_version_lineage_and_resume_reuses_the_version(server_client, final_dir, tmp_path):
    client, base = server_client, "lineage-model"
    name = tracking.registered_name(base)
    done = register(client, tmp_path, report_for(final_dir, base, ppl=20.0, acc=0.70))
    tags = version_tags(client, name, done["version"])
    assert tags["iterabre.base_model"] == base and tags["iterabre.base_revision"] == "none"
    assert tags["iterabre.removed_blocks"] == "3,4" and tags["iterabre.num_layers"] == "4"
    assert int(tags["iterabre.num_params"]) == modelcard.parameter_count(final_dir)
    assert tags["iterabre.recovery_method"] == CompressConfig().recovery.method  # the report's config: the default
    assert tags["iterabre.recovery_tokens"] == "256"
    assert tags["data.md5"] == "0123abcd.dir" and tags["prefect.flow_run_id"] == "flow-run-123"
    assert tags["git.commit"] == client.get_run(done["run_id"]).data.tags["git.commit"]
    assert (tags["final/blimp/acc"], tags["final/blimp/acc_stderr"], tags["final/wikitext/word_perplexity"]) == \
        ("0.7", "0.01", "20.0")
    assert tags["base/wikitext/word_perplexity"] == "10.0"

    # A job killed after registering resumes into the same parent run: same version, nothing logged twice.
    job = tracking.Job(client, done["run_id"], tracking.experiment_id(client))
    again = tracking.register_final(job, report_for(final_dir, base, ppl=20.0, acc=0.70))
    assert again["version"] == done["version"] and again["alias"] == "champion"
    assert len(client.search_model_versions(f"run_id = '{done['run_id']}'")) == 1
    logged = client.search_logged_models([job.experiment_id], filter_string=f"source_run_id = '{done['run_id']}'")
    assert len(logged) == 1


@pytest.mark.slow
def test_champion_loads_with_pyfunc_and_transformers_and_generates(server_client, final_dir, tmp_path):
    import mlflow

    base = "loadable-model"
    register(server_client, tmp_path, report_for(final_dir, base, ppl=20.0, acc=0.70))
    uri = f"models:/{tracking.registered_name(base)}@champion"
    generate = mlflow.pyfunc.load_model(uri)
    out = generate.predict(["Hello"], params={"max_new_tokens": 5})
    assert len(out) == 1 and out[0].startswith("Hello") and len(out[0]) > len("Hello")  # prompt + new text
    pipe = mlflow.transformers.load_model(uri)
    assert pipe("Hello", max_new_tokens=5)[0]["generated_text"].startswith("Hello")
    local = Path(mlflow.artifacts.download_artifacts(uri))
    assert "license: apache-2.0" in (local / "model_card_data.yaml").read_text()  # the card travels with it
    assert "Apache-2.0, inherited from the base model" in (local / "model_card.md").read_text()
    assert {"torch", "transformers"} <= {r.split("==")[0] for r in (local / "requirements.txt").read_text().split()}


@pytest.mark.slow
def test_mlflow_models_serve_answers_over_http(server_client, mlflow_server, final_dir, tmp_path):
    base = "served-model"
    register(server_client, tmp_path, report_for(final_dir, base, ppl=20.0, acc=0.70))
    port = _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": mlflow_server}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m",
                             f"models:/{tracking.registered_name(base)}@champion", "--env-manager", "local",
                             "--host", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
            data=json.dumps({"inputs": ["Hello"], "params": {"max_new_tokens": 4}}).encode())
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert answer["predictions"][0].startswith("Hello") and len(answer["predictions"][0]) > len("Hello")
    finally:
        stop_process_group(proc, timeout=20)
        log.close()


def test_registration_leaves_the_users_tracking_variable_as_it_was(final_dir, tmp_path, monkeypatch):
    """A job whose client is on another store than MLFLOW_TRACKING_URI names registers there and leaves the
    variable untouched."""
    import os

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'users.db'}")
    store = f"sqlite:///{tmp_path / 'jobs.db'}"
    done = register(tracking.connect(store), tmp_path, report_for(final_dir, "kept", 20.0, 0.7))
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'users.db'}"
    assert tracking.connect(store).get_model_version(done["name"], "1").run_id == done["run_id"]
