"""prefect.yaml deployments, the watch flow, and a real server + process worker running `compress`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import stop_process_group
from flows import tracking, watch
from iterabre.config import validate
from iterabre.errors import IterabreError
from iterabre.paths import REPO_ROOT

PREFECT = [sys.executable, "-m", "prefect"]


def _deployments() -> dict:
    doc = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in doc["deployments"]}


def test_prefect_yaml_deployments_are_valid():
    deps = _deployments()
    assert deps["compress"]["entrypoint"] == "flows/compress.py:compress"
    assert deps["watch"]["entrypoint"] == "flows/watch.py:watch"
    assert isinstance(deps["watch"]["schedules"], list) and deps["watch"]["schedules"][0]["cron"]
    assert deps["compress"]["work_pool"]["name"] == deps["watch"]["work_pool"]["name"]
    validate(watch.entry_config(deps["compress"]["parameters"]))  # defaults make a valid job


def test_repo_watchlist_entries_are_valid_jobs():
    entries = watch.load_watchlist(REPO_ROOT / "watchlist.yaml")
    assert entries
    for entry in entries:
        validate(watch.entry_config(entry))


def test_watchlist_refuses_unknown_keys(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("models:\n  - model: m\n    target_layers: 3\n    learning_rate: 1\n")
    with pytest.raises(IterabreError, match="learning_rate"):
        watch.load_watchlist(path)
    with pytest.raises(IterabreError, match="does not exist"):
        watch.load_watchlist(tmp_path / "missing.yaml")


def test_watch_starts_only_entries_without_a_finished_run(tmp_path, monkeypatch):
    path = tmp_path / "watchlist.yaml"
    path.write_text("defaults:\n  eval_tasks: ''\nmodels:\n"
                    "  - {model: watch-model-a, revision: v1, target_layers: 3}\n"
                    "  - {model: watch-model-a, revision: v2, target_layers: 3}\n"
                    "  - {model: watch-model-b, target_ratio: 0.5, overrides: {scorer: angular}}\n")
    entries = watch.load_watchlist(path)
    client = tracking.connect()
    done = tracking.start_job(client, watch.entry_config(entries[0]), {}, None)  # entry 0 already finished
    tracking.finish_job(done, [])
    tracking.start_job(client, watch.entry_config(entries[1]), {}, None)  # entry 1 only RUNNING
    started = []

    class FakeRun:
        id = "fake-id"

    def fake_run_deployment(name, parameters, timeout):
        started.append((name, parameters, timeout))
        return FakeRun()
    monkeypatch.setattr(watch, "run_deployment", fake_run_deployment)
    result = watch.watch(watchlist=str(path))
    assert [p.get("revision") for _, p, _ in started] == ["v2", None]
    assert all(name == "iterabre/compress" and timeout == 0 for name, _, timeout in started)
    assert started[1][1]["scorer"] == "angular" and started[1][1]["output"].startswith(str(REPO_ROOT / "outputs"))
    assert [r["model"] for r in result] == ["watch-model-a", "watch-model-b"]


def _cli(args: list[str], env: dict, timeout: float = 180) -> str:
    out = subprocess.run(PREFECT + args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_deployment_run_on_a_process_worker(prefect_server, tiny_model_dir, tmp_path):
    env = {**prefect_server, "PWD": str(REPO_ROOT), "ITERABRE_NO_PROGRESS": "1"}
    pool = _deployments()["compress"]["work_pool"]["name"]
    _cli(["work-pool", "create", pool, "--type", "process", "--overwrite"], env)
    _cli(["--no-prompt", "deploy", "--all"], env)
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(PREFECT + ["worker", "start", "--pool", pool], cwd=REPO_ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        params = dict(model=str(tiny_model_dir), target_layers=4, calibration_tokens=128, recovery_tokens=128,
                      seq_len=32, eval_tasks="", device="cpu", output=str(tmp_path / "out"),
                      log_checkpoints=False)
        _cli(["deployment", "run", "iterabre/compress", "--params", json.dumps(params), "--watch",
              "--watch-timeout", "400"], env, timeout=450)
    finally:
        stop_process_group(worker, timeout=30)
        log.close()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["final_num_layers"] == 4
    run = tracking.connect().get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["prefect.flow_run_id"] != "none"
    assert Path(report["final_dir"]).exists()
