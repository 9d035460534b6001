"""Faults a job can meet, in real processes on tiny models: kills, signals, damaged files, a full disk,
two jobs on one folder, a slow Prefect start-up and a tracking server that does not answer.

docs/PIPELINE.md's "What survives what" table is this file in words.
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows import lifecycle, tracking
from flows.compress import run_from_cli
from iterabre.config import CompressConfig, RecoveryConfig
from iterabre.errors import IterabreError
from iterabre.files import LOCK_NAME, output_lock

# The job in a child process. `kill_at` = "<task>:<n>": SIGKILL right after the n-th call of that
# task (or of MLflow registration, "register") returned, i.e. exactly at a task boundary.
RUN = r"""
import json, os, signal, sys
from flows import compress as flow
from iterabre.config import CompressConfig

cfg, kill_at, counts = json.loads(sys.argv[1]), sys.argv[2], {}

def killing(name, fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        counts[name] = counts.get(name, 0) + 1
        if f"{name}:{counts[name]}" == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapper

call, register = flow.Run.call, flow.tracking.register_final
flow.Run.call = lambda self, name, **p: killing(name, lambda: call(self, name, **p))()
flow.tracking.register_final = killing("register", register)
flow.run_from_cli(CompressConfig.from_dict(cfg))
"""
BOUNDARIES = ["prepare_data:1", "score:1", "prune:1", "recover:1", "publish:1", "register:1"]
TASK_STATE = re.compile(r"Task run '([a-z-]+)-\w+' - Finished in state (Completed|Cached)")


def _config(model_dir, output, tokens: int = 256, **kw) -> CompressConfig:
    """6 -> 4 blocks in two steps; no evaluation, so every task is cheap."""
    return CompressConfig(model=str(model_dir), target_layers=4, calibration_tokens=128, recovery_tokens=tokens,
                          seq_len=32, eval_tasks="", device="cpu", output=str(output),
                          schedule="iterative", recovery=RecoveryConfig(method="kd", batch_size=4, lr=1e-3), **kw)


def _start(cfg: CompressConfig, env: dict, log: Path, kill_at: str = "none") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(cfg.to_dict()), kill_at], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _completed(log: Path) -> Counter:
    """Task name -> how many times it was computed (not a cache hit) in this log."""
    return Counter(name for name, state in TASK_STATE.findall(log.read_text()) if state == "Completed")


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_sigkill_at_every_task_boundary_then_resume(tiny_model_dir, prefect_server, tmp_path):
    env = {**prefect_server, "ITERABRE_NO_PROGRESS": "1"}
    clean_cfg, cfg = _config(tiny_model_dir, tmp_path / "clean"), _config(tiny_model_dir, tmp_path / "killed")
    clean = _start(clean_cfg, env, tmp_path / "clean.log")
    assert clean.wait(timeout=600) == 0, (tmp_path / "clean.log").read_text()[-3000:]

    computed = Counter()
    for i, boundary in enumerate(BOUNDARIES):
        log = tmp_path / f"run-{i}.log"
        proc = _start(cfg, env, log, kill_at=boundary)
        assert proc.wait(timeout=600) == -signal.SIGKILL, f"{boundary}: {log.read_text()[-3000:]}"
        assert not (Path(cfg.output) / "report.json").exists()
        computed += _completed(log)
    last = _start(cfg, env, tmp_path / "last.log")
    assert last.wait(timeout=600) == 0, (tmp_path / "last.log").read_text()[-3000:]
    computed += _completed(tmp_path / "last.log")

    # every task was computed exactly as often as in the uninterrupted job: nothing finished was redone
    assert computed == _completed(tmp_path / "clean.log") and computed["recover"] == 2
    killed = json.loads((Path(cfg.output) / "report.json").read_text())
    assert killed["removed_layers"] == json.loads((tmp_path / "clean" / "report.json").read_text())["removed_layers"]
    assert _same_weights(Path(cfg.output) / "final", tmp_path / "clean" / "final")
    client = tracking.connect(env["MLFLOW_TRACKING_URI"]) if "MLFLOW_TRACKING_URI" in env else tracking.connect()
    versions = client.search_model_versions(f"run_id = '{killed['mlflow_run_id']}'")
    assert len(versions) == 1  # killed right after registering: the resume reused that version
    assert not list(Path(cfg.output).rglob("*.tmp-*")) and not (Path(cfg.output) / LOCK_NAME).exists()


@pytest.mark.slow
def test_signal_stops_the_job_cleanly(tiny_model_dir, prefect_server, tmp_path, sig=signal.SIGTERM):
    # SIGINT (Ctrl-C) takes the same handler (flows.lifecycle._raise_interrupt): the test below
    # sends both to a process whose clean-up hangs; one real job is stopped here.
    env = {**prefect_server, "ITERABRE_NO_PROGRESS": "1"}
    cfg = _config(tiny_model_dir, tmp_path / "out", tokens=200_000)  # long enough to be stopped mid-recovery
    out, log = Path(cfg.output), tmp_path / "job.log"
    proc = _start(cfg, env, log)
    deadline = time.time() + 300
    while not (out / "work" / "step-01-pruned").exists():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(2)  # inside the recover task
    sent = time.time()
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running 60 s after {sig.name}:\n{log.read_text()[-3000:]}")
    assert time.time() - sent < 20 and code != 0, log.read_text()[-3000:]
    assert not list(out.rglob("*.tmp-*")) and not (out / "steps" / "step-01").exists()
    assert not (out / LOCK_NAME).exists()
    client = tracking.connect()
    runs = client.search_runs([tracking.experiment_id(client)],
                              f"tags.`{tracking.TAG_OUTPUT}` = '{out.resolve()}' and tags.`{tracking.TAG_KIND}` = 'job'")
    assert [r.info.status for r in runs] == ["KILLED"]


STUCK = """
import signal, sys, time
from flows import lifecycle
lifecycle.STOP_GRACE_S = float(sys.argv[1])
with lifecycle.signals_as_interrupts():
    try:
        print("ready", flush=True)  # inside the try: the signal may come before the sleep starts
        time.sleep(60)
    except KeyboardInterrupt:
        print("unwinding", flush=True)
        if sys.argv[2] == "again":
            signal.raise_signal(signal.SIGINT)  # a second Ctrl-C while unwinding
        time.sleep(60)  # a clean-up call that never returns
"""


@pytest.mark.parametrize("second", ["none", "again"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_job_whose_clean_up_hangs_still_ends(sig, second):
    # The first signal unwinds the job and arms a watchdog; the process ends STOP_GRACE_S later
    # (or at once on a second signal) even though its clean-up never returns. With a second signal
    # the grace is long, so "at once" (milliseconds) stays apart from the watchdog on a loaded CI box.
    grace = 15 if second == "again" else 2
    proc = subprocess.Popen([sys.executable, "-c", STUCK, str(grace), second], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    sent = time.time()
    proc.send_signal(sig)
    assert proc.stdout.readline().strip() == "unwinding"
    last = signal.SIGINT if second == "again" else sig  # the exit code names the signal that ended it
    assert proc.wait(timeout=30) == 128 + last
    took = time.time() - sent
    assert took < 10 if second == "again" else 1.9 < took < 20


@pytest.mark.slow
def test_damaged_checkpoint_is_detected_and_made_again(tiny_model_dir, tmp_path, caplog):
    cfg = _config(tiny_model_dir, tmp_path / "out")
    first = run_from_cli(cfg)
    ckpt = tmp_path / "out" / "steps" / "step-01" / "model.safetensors"
    original = ckpt.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped bit pattern in the data section, same size
    ckpt.write_bytes(bytes(damaged))

    caplog.clear()
    again = run_from_cli(cfg)
    assert ckpt.read_bytes() == original  # recovery ran again and wrote the same weights
    assert any("changed since recover made it" in r.getMessage() for r in caplog.records)
    assert again["removed_layers"] == first["removed_layers"]
    computed = [r for r in caplog.records
                if r.name == "prefect.task_runs" and "Finished in state Completed" in r.getMessage()]
    # only step 1 ran again: its recovery, and the pruned model it starts from (deleted after use)
    assert len(computed) == 2 and "prune" in str(vars(computed[0])) and "recover" in str(vars(computed[1]))


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_state(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    cfg = _config(tiny_model_dir, tmp_path / "out")
    save = PreTrainedModel.save_pretrained

    def full_disk(self, path, *a, **k):
        if "step-02" in str(path):  # step 2's checkpoint: half-written, then the disk is full
            (Path(path) / "model.safetensors").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, path, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(IterabreError) as err:
        run_from_cli(cfg)
    assert "ran out of space" in str(err.value) and "step-02" in str(err.value) and "\n" not in str(err.value)
    out = Path(cfg.output)
    assert not (out / "steps" / "step-02").exists() and not list(out.rglob("*.tmp-*"))
    step1 = (out / "steps" / "step-01" / "model.safetensors").read_bytes()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)  # space freed
    report = run_from_cli(cfg)
    assert report["final_num_layers"] == 4 and (out / "steps" / "step-01" / "model.safetensors").read_bytes() == step1


@pytest.mark.slow
def test_second_job_on_a_busy_output_folder_is_refused(tiny_model_dir, prefect_server, tmp_path):
    env = {**prefect_server, "ITERABRE_NO_PROGRESS": "1"}
    cfg = _config(tiny_model_dir, tmp_path / "out", tokens=200_000)
    first = _start(cfg, env, tmp_path / "first.log")
    try:
        deadline = time.time() + 300
        while not (Path(cfg.output) / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "iterabre.cli", "compress", "--model", str(tiny_model_dir),
                                 "--target-layers", "4", "--output", cfg.output, "--eval-tasks", ""],
                                env=env, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert "in use by another iterabre job" in lines[0] and f"pid {first.pid}" in lines[0]


def test_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path):
    folder = tmp_path / "job"
    with output_lock(folder):
        with pytest.raises(IterabreError, match="in use by another iterabre job"):
            with output_lock(folder):
                pass
    assert not folder.exists()  # nothing was written: the folder the lock made is gone again
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    with output_lock(folder) as lock:  # its owner is gone: stale, taken over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()


# ---------------------------------------------------------------- start-up of the services

def test_prefect_api_start_is_retried_once(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer

    tries = []

    def start(self, timeout=None):
        tries.append(timeout)
        if len(tries) == 1:
            raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")
    monkeypatch.setattr(lifecycle, "_api_url", lambda: None)
    monkeypatch.setattr(SubprocessASGIServer, "start", start)
    monkeypatch.setattr(SubprocessASGIServer, "stop", lambda self: None)
    monkeypatch.delenv(lifecycle.STARTUP_ENV, raising=False)
    lifecycle.ensure_prefect_api()
    assert tries == [lifecycle.STARTUP_DEFAULT_S] * 2


def test_prefect_api_that_never_starts_is_one_line(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer

    def start(self, timeout=None):
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")
    monkeypatch.setattr(lifecycle, "_api_url", lambda: None)
    monkeypatch.setattr(SubprocessASGIServer, "start", start)
    monkeypatch.setattr(SubprocessASGIServer, "stop", lambda self: None)
    monkeypatch.setenv(lifecycle.STARTUP_ENV, "7")
    with pytest.raises(IterabreError) as err:
        lifecycle.ensure_prefect_api()
    text = str(err.value)
    assert "did not start" in text and "=7" in text and "PREFECT_API_URL" in text and "\n" not in text
    monkeypatch.setenv(lifecycle.STARTUP_ENV, "soon")
    with pytest.raises(IterabreError, match="not a number"):
        lifecycle.startup_timeout()


def test_tracking_server_that_does_not_answer_is_one_line():
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.time()
        with pytest.raises(IterabreError) as err:
            tracking._probe_server(uri, timeout_s=1)
    assert time.time() - started < 15
    assert "did not answer (2 tries" in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)


@pytest.mark.slow
def test_compress_on_a_loaded_machine_with_a_fresh_prefect_home(tiny_model_dir, tmp_path):
    """Two busy processes and a cold PREFECT_HOME: the in-process API must still come up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.pop(lifecycle.STARTUP_ENV, None)  # the default iterabre sets, not the test suite's
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), ITERABRE_NO_PROGRESS="1")
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        job = subprocess.run([sys.executable, "-m", "iterabre.cli", "compress", "--model", str(tiny_model_dir),
                              "--target-layers", "5", "--calibration-tokens", "64", "--recovery-tokens", "128",
                              "--seq-len", "32", "--eval-tasks", "", "--device", "cpu",
                              "--output", str(tmp_path / "out")],
                             env=env, capture_output=True, text=True, timeout=900)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert job.returncode == 0, job.stderr[-3000:]
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()
