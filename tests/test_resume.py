"""Kill a compression job with SIGKILL mid-run, run it again: it resumes from cache and ends the same."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import tracking
from flows.compress import run_from_cli
from iterabre.config import CompressConfig, RecoveryConfig, normalise

RUN = ("import json, sys; from flows.compress import run_from_cli; from iterabre.config import CompressConfig; "
       "run_from_cli(CompressConfig.from_dict(json.loads(sys.argv[1])))")


def _config(model_dir, output) -> CompressConfig:
    """6 -> 3 blocks in three steps, slow enough to be killed in the middle."""
    return CompressConfig(model=str(model_dir), target_layers=3, calibration_tokens=128, recovery_tokens=1536,
                          seq_len=32, eval_tasks="", device="cpu", output=str(output),
                          schedule="iterative", recovery=RecoveryConfig(method="kd", batch_size=4, lr=1e-3))


def _start(cfg: CompressConfig, env: dict, log: Path) -> subprocess.Popen:
    """The job in a child process (against the test Prefect server), output to `log`."""
    return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(cfg.to_dict())], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 400) -> None:
    """Poll until `path` exists; fail if the job ends or hangs first."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "the job finished before it could be killed"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_matches_clean_run(tiny_model_dir, prefect_server, tmp_path):
    env = {**prefect_server, "ITERABRE_NO_PROGRESS": "1"}
    cfg = _config(tiny_model_dir, tmp_path / "killed")
    out = Path(cfg.output)
    first = _start(cfg, env, tmp_path / "first.log")
    # step 2's pruned model is written after step 1's recover task has returned and stored its result
    _wait_for(out / "work" / "step-02-pruned", first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "report.json").exists()
    step1 = {p: p.stat().st_mtime_ns for p in (out / "steps" / "step-01").rglob("*") if p.is_file()}

    second = _start(cfg, env, tmp_path / "second.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    for name in ("prepare-base", "prepare-data", "score", "prune", "recover"):
        assert re.search(rf"'{name}-\w+' - Finished in state Cached", log), f"{name} was not a cache hit"
    assert {p: p.stat().st_mtime_ns for p in step1} == step1  # step 1 was not recomputed

    clean = run_from_cli(_config(tiny_model_dir, tmp_path / "clean"))
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["removed_layers"] == clean["removed_layers"] and len(clean["removed_layers"]) == 3

    client = tracking.connect()
    parent = client.get_run(resumed["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags.get("iterabre.resumed") == "true"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags[tracking.TAG_STEP] for c in children) == ["1", "2", "3"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert normalise(cfg).fingerprint() == parent.data.tags[tracking.TAG_FINGERPRINT]
