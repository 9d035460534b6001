"""`make serve` / `make serve-stop`: a real server and worker, the user's Prefect profile untouched."""

import os
import subprocess
import sys
import urllib.request

import pytest

from conftest import _free_port
from iterabre.paths import REPO_ROOT


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_serve_then_stop_leaves_compress_on_its_own_api(tiny_model_dir, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_PORT=str(port), ITERABRE_SERVE_STATE=str(tmp_path / "state"),
               PATH=f"{REPO_ROOT / '.venv' / 'bin'}:{env['PATH']}", ITERABRE_NO_PROGRESS="1")
    try:
        up = subprocess.run(["scripts/serve.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5)
        pids = [int((tmp_path / "state" / f"{n}.pid").read_text()) for n in ("server", "worker")]
        assert all(_alive(p) for p in pids)
        profile = tmp_path / "home" / "profiles.toml"
        assert not profile.exists() or "PREFECT_API_URL" not in profile.read_text()  # profile untouched
    finally:
        down = subprocess.run(["scripts/serve-stop.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0 and "stopped 2" in down.stdout, down.stdout + down.stderr
    assert not any(_alive(p) for p in pids)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)

    job = subprocess.run([sys.executable, "-m", "iterabre.cli", "compress", "--model", str(tiny_model_dir),
                          "--target-layers", "5", "--calibration-tokens", "64", "--recovery-tokens", "128",
                          "--seq-len", "32", "--eval-tasks", "", "--device", "cpu", "--output", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "Starting temporary server" in job.stderr + job.stdout  # its own in-process API, not the dead server
