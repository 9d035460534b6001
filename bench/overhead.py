"""Orchestration overhead: what the Prefect + MLflow flow costs on top of the library steps it runs.

Per job. The flow (what `iterabre compress` runs) compresses a tiny job on purpose (a random
6-block Llama with the byte tokenizer, 2 blocks removed one per step, no evaluation), so the
fixed cost shows. Every `iterabre.steps` function a flow task calls is wrapped in a timer for
the run, so one run gives both the job's wall time and the time spent inside the library
steps (which already write every checkpoint to disk); the difference is what the flow adds:
Prefect task states, result persistence, cache-key hashing, artifacts, MLflow runs, registry
and report files. The loop runs once, in the flow; there is no second copy to compare with.

Per CLI process. Before a job, `iterabre compress` makes sure a Prefect API answers
(`flows.lifecycle.ensure_prefect_api`). Each of these is measured in a fresh interpreter,
followed by an empty flow (the first API round trips):

    cold    in-process API server, new PREFECT_HOME (its SQLite database is created and migrated)
    warm    in-process API server again, same PREFECT_HOME
    server  PREFECT_API_URL of a `prefect server start` already running: nothing to start

plus the one-off start of that server. Prefect and MLflow use fresh stores in a temp folder.

    .venv/bin/python bench/overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import common

API_MODES = ("cold", "warm", "server")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--repeats", type=int, default=None, help="timed jobs (default 5; quick 2)")
    p.add_argument("--api-repeats", type=int, default=None, help="fresh processes per API mode (default 3; quick 1)")
    p.add_argument("--child", choices=["api"], help=argparse.SUPPRESS)
    return p.parse_args()


# ---------------------------------------------------------------- per job: flow vs the steps inside it

def job_config(model_dir: Path, out: Path, quick: bool):
    """The tiny compression job."""
    from iterabre.config import CompressConfig, RecoveryConfig

    return CompressConfig(model=str(model_dir), target_layers=4, scorer="output", schedule="iterative",
                          calibration_tokens=256, recovery_tokens=512 if quick else 2048, seq_len=64,
                          device="cpu", eval_tasks="", eval_limit=None, output=str(out),
                          recovery=RecoveryConfig(method="kd", batch_size=4))


def tiny_model_dir(tmp: Path) -> Path:
    """A random 6-block Llama + byte tokenizer saved as a safetensors folder."""
    from iterabre.models import save_model
    from iterabre.tiny import byte_tokenizer, tiny_model

    return save_model(tiny_model("llama", num_layers=6), byte_tokenizer(), tmp / "tiny-llama")


def _timer(fn, name: str, spent: dict):
    """`fn`, adding the seconds each call takes to spent[name]."""
    @functools.wraps(fn)
    def timed_fn(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
    return timed_fn


@contextmanager
def timed_steps(spent: dict):
    """Time every `iterabre.steps` function a flow task calls (the tasks look them up at call time)."""
    from flows.compress import TASKS
    from iterabre import steps

    originals = {t.fn.__name__: getattr(steps, t.fn.__name__) for t in TASKS}
    for name, fn in originals.items():
        setattr(steps, name, _timer(fn, name, spent))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(steps, name, fn)


def one_job(cfg) -> dict:
    """One flow run: its wall time, the seconds inside each library step, the blocks it removed."""
    spent: dict = {}
    with timed_steps(spent):
        start = time.perf_counter()
        report = common.run_flow(cfg, log_checkpoints=True)  # as `iterabre compress` runs it
        wall = time.perf_counter() - start
    return {"flow_s": wall, "steps_s": sum(spent.values()), "overhead_s": wall - sum(spent.values()),
            "per_step_s": spent, "removed_layers": report["removed_layers"]}


def jobs(tmp: Path, repeats: int, quick: bool) -> list[dict]:
    """`repeats` timed jobs on fresh output folders, after one untimed job that warms caches."""
    model_dir = tiny_model_dir(tmp)
    runs = [one_job(job_config(model_dir, tmp / f"run-{r:02d}", quick)) for r in range(repeats + 1)]
    return runs[1:]  # run 0 pays for tokenizer, data and code-hash caches once per process


def job_summary(runs: list[dict]) -> dict:
    """Medians over the timed jobs; the overhead is the median of each run's own difference."""
    med = lambda key: common.median([r[key] for r in runs])  # noqa: E731
    overhead = med("overhead_s")
    return {"median_s": {"flow": med("flow_s"), "steps": med("steps_s")}, "overhead_s": overhead,
            "overhead_pct": 100 * overhead / med("steps_s"),
            "steps_median_s": {k: common.median([r["per_step_s"].get(k, 0.0) for r in runs])
                               for k in runs[0]["per_step_s"]}}


# ---------------------------------------------------------------- per CLI process: the Prefect API

def api_child() -> None:
    """In a fresh interpreter: import, ensure_prefect_api(), one empty flow; print the seconds as JSON."""
    start = time.perf_counter()
    from prefect import flow

    from flows.lifecycle import ensure_prefect_api

    @flow(name="bench-empty")
    def empty() -> int:
        return 1

    imported = time.perf_counter()
    ensure_prefect_api()
    ready = time.perf_counter()
    empty()
    common.emit_child_result({"imports_s": imported - start, "ensure_s": ready - imported,
                              "first_flow_s": time.perf_counter() - ready})


def api_run(home: Path, api_url: str | None = None) -> dict:
    """One `api_child` with this PREFECT_HOME (and server URL); adds the whole process's wall time."""
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": api_url}  # None: unset, the in-process server
    start = time.perf_counter()
    out = common.run_child(Path(__file__), ["--child", "api"], timeout=900, env=env)
    return {**out, "process_s": time.perf_counter() - start}


def _free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    """Poll the server's /health until it answers; fail if it exits or takes longer than `timeout`."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`prefect server start` did not answer at {url}; see {log}") from None
            time.sleep(0.2)


@contextmanager
def prefect_server(home: Path):
    """A `prefect server start` of our own on a free local port; yields (its API URL, seconds to answer)."""
    port = str(_free_port())
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **common.OFFLINE_ENV, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    log = home.with_suffix(".log")
    home.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", port], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: stopped with its workers
        try:
            _wait_healthy(proc, url, log)
            yield url, time.perf_counter() - start
        finally:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


def api_starts(tmp: Path, repeats: int) -> dict:
    """Each API mode in `repeats` fresh processes (cold and warm alternate on their own homes)."""
    runs = {mode: [] for mode in API_MODES}
    for i in range(repeats):
        home = tmp / f"prefect-home-{i}"
        runs["cold"].append(api_run(home))
        runs["warm"].append(api_run(home))
    with prefect_server(tmp / "prefect-server-home") as (url, ready_s):
        runs["server"] = [api_run(tmp / f"prefect-client-home-{i}", url) for i in range(repeats)]
    keys = ("imports_s", "ensure_s", "first_flow_s", "process_s")
    median = {mode: {k: common.median([r[k] for r in rs]) for k in keys} for mode, rs in runs.items()}
    return {"runs": runs, "median_s": median, "server_ready_s": ready_s}


# ---------------------------------------------------------------- driver

def print_tables(result: dict) -> None:
    """The per-job and per-process tables."""
    med = result["median_s"]
    common.print_table("tiny job (6 -> 4 blocks, 2 steps): flow wall time vs time inside iterabre.steps",
                       ["what", "median s", "runs"],
                       [["inside the library steps", med["steps"], result["repeats"]],
                        ["whole flow run", med["flow"], result["repeats"]],
                        ["overhead (s)", result["overhead_s"], None], ["overhead (%)", result["overhead_pct"], None],
                        ["one-off: import prefect+mlflow+flow", result["imports_s"], 1]])
    api = result["api_start"]
    common.print_table("Prefect API per CLI process (medians, s)",
                       ["mode", "ensure_prefect_api", "first empty flow", "imports", "whole process"],
                       [[m, *[api["median_s"][m][k] for k in ("ensure_s", "first_flow_s", "imports_s", "process_s")]]
                        for m in API_MODES] + [["server start (once)", api["server_ready_s"], None, None, None]])


def main() -> None:
    """API start-up in child processes first, then the timed jobs in this one."""
    args = parse_args()
    if args.child:
        return api_child()
    common.apply_threads(args.threads)
    tmp = common.fresh_stores()
    try:
        api = api_starts(tmp, args.api_repeats or (1 if args.quick else 3))
        start = time.perf_counter()
        import flows.compress  # noqa: F401  (import cost is not part of any job)
        imports = time.perf_counter() - start
        runs = jobs(tmp, args.repeats or (2 if args.quick else 5), args.quick)
        result = {"repeats": len(runs), "jobs": runs, **job_summary(runs), "imports_s": imports, "api_start": api,
                  "config": job_config(Path("tiny-llama"), Path("x"), args.quick).to_dict()}
        print_tables(result)
        path = common.write_json("overhead-quick" if args.quick else "overhead",
                                 {"machine": common.machine_info(), "quick": args.quick,
                                  "target": "flow overhead <= 10% or a few seconds", **result})
        print(f"wrote {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
