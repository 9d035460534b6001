"""Shared fixtures: offline environment, tiny random models, temporary service stores.

Every test session gets its own PREFECT_HOME, MLflow SQLite store and HF caches under a
temporary directory, so runs never see each other's cached state.
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="iterabre-tests-"))
# Set before anything imports prefect/mlflow/datasets: they read these at import time.
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": str(_SESSION_TMP / "prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "HF_DATASETS_CACHE": str(_SESSION_TMP / "hf-datasets"),
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_TMP / 'mlflow.db'}",
})

from iterabre.tiny import FAMILY_CONFIGS, byte_tokenizer, tiny_model  # noqa: E402

ALL_FAMILIES = list(FAMILY_CONFIGS)


def padded_calib(n: int = 3, t: int = 12, seed: int = 0):
    """Right-padded calibration batch (ids, mask) [n, t]: rows 1 and 2 end with padding (token 259, mask 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:], mask[2, 5:] = 0, 0
    return ids.masked_fill(mask == 0, 259), mask


def assert_scores_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    """Same blocks in the same order, every score finite and within atol of the reference."""
    import math

    assert list(got) == list(want)
    for k in want:
        assert math.isfinite(got[k]) and abs(got[k] - want[k]) <= atol, (k, got[k], want[k])


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_lm(request):
    """A tiny random Llama or Qwen2 model (6 blocks, float32, eval mode)."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M as a safetensors directory (pulled once; offline after)."""
    from iterabre.embedded import pull_embedded_model

    return pull_embedded_model("smollm2-135m")


# ---------------------------------------------------------------- flows (orchestration tests)

@pytest.fixture(scope="session")
def tiny_model_dir(session_tmp) -> Path:
    """A 6-block tiny Llama + byte tokenizer saved as a local model folder (a flow's `model`)."""
    path = session_tmp / "tiny-llama-6"
    if not path.exists():
        tiny_model("llama", 6).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
    return path


def stop_process_group(proc, timeout: float) -> None:
    """SIGTERM a process started with start_new_session=True and its children; SIGKILL if stuck."""
    import subprocess

    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(session_tmp):
    """A real `prefect server start` on a free 127.0.0.1 port; yields the env to reach it."""
    import subprocess
    import sys
    import time
    import urllib.request

    port, home = _free_port(), session_tmp / "prefect-server-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    log = open(session_tmp / "prefect-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"prefect server did not start; see {log.name}")
                time.sleep(1)
        yield env
    finally:
        stop_process_group(proc, timeout=20)
        log.close()


@pytest.fixture(autouse=True)
def _mlflow_global_uri_not_leaked():
    """A test that sets mlflow's global tracking URI must unset it: later tests would reach its (stopped) server."""
    yield
    if "mlflow" not in sys.modules:  # nothing imported mlflow (or it is not installed): nothing could be set
        return
    from mlflow.tracking._tracking_service import utils

    leaked, utils._tracking_uri = utils._tracking_uri, None
    assert leaked is None, f"this test left mlflow's global tracking URI set to {leaked}"
