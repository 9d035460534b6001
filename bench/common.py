"""Shared helpers for the bench scripts: offline env, settings, flow jobs, timing, memory, result files.

Every script times its two variants in the same process, alternating them (A B B A ...)
so a neighbour's load spike hits both, and reports the median ratio, never an absolute
target. Peak memory is measured in a fresh child process per variant, because
`ru_maxrss` only ever grows and tracemalloc does not see torch's allocations.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "bench" / "results"
# A trial run (or a test) points this elsewhere, so it never overwrites hours of measurements.
RESULTS = Path(os.environ.get("ITERABRE_BENCH_RESULTS") or DEFAULT_RESULTS)

# Set before transformers / datasets / prefect / mlflow are imported: they read these once.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "ITERABRE_NO_PROGRESS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
_LOAD_AT_START = os.getloadavg()[0]  # the CPU is shared: record how busy it was around the run
if str(REPO) not in sys.path:  # so `flows` imports when the script runs as bench/<name>.py
    sys.path.insert(1, str(REPO))


# The KD learning rate of the saved quality tables (quality, quality-equal-*, recovery_methods): every
# recipe without its own `@lr=` trains at it, so a table resumed after the library's default changed is
# still one experiment. The library's default (RecoveryConfig.lr) is the recipe DEFAULT_RECIPE names.
TABLE_LR = 5e-5


def add_common_args(parser) -> None:
    """--quick and --threads, shared by every script."""
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy CPU")


def add_result_args(parser, default: str) -> None:
    """--name and --report-only of the scripts whose result file gathers finished units over runs."""
    parser.add_argument("--name", default=None, help=f"result file name (default {default}; quick: {default}-quick)")
    parser.add_argument("--report-only", action="store_true", help="print what is saved (tables, plots), run nothing")


def result_name(args, default: str) -> str:
    """The result file's name: --name, else the script's default (with -quick for a smoke run)."""
    return args.name or (f"{default}-quick" if args.quick else default)


def pick(value, full, small, quick: bool):
    """A setting: the value given on the command line, else the full or the --quick default."""
    return value if value is not None else (small if quick else full)


def parse_limits(text: str) -> dict[str, int | None]:
    """'wikitext=3,blimp=all' -> {"wikitext": 3, "blimp": None} (documents per leaf task; None = all)."""
    out = {}
    for item in text.split(","):
        task, _, limit = item.partition("=")
        out[task.strip()] = int(limit) if limit and limit != "all" else None
    return out


def apply_threads(threads: int | None) -> None:
    """Pin torch's thread count; oversubscribed OpenMP spin-waits can cost 10x on a shared CPU."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def device(name: str) -> str:
    """`--device` resolved as the library resolves it (auto -> cuda | cpu); a device this machine lacks
    stops the script with the library's one-line message and its fix."""
    from iterabre.devices import resolve_device
    from iterabre.errors import IterabreError

    try:
        return resolve_device(name)
    except IterabreError as e:
        raise SystemExit(str(e)) from None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What the numbers were measured on; stored next to them in every result file."""
    import torch
    import transformers

    from iterabre import files

    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m": {"start": round(_LOAD_AT_START, 2), "end": round(os.getloadavg()[0], 2)},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # a copy without .git (a lent GPU machine) names its commit in ITERABRE_BENCH_COMMIT
        "git": {"commit": os.environ.get("ITERABRE_BENCH_COMMIT") or files.git_commit(REPO),
                "dirty": files.git_dirty(REPO)},
    }


# ---------------------------------------------------------------- result files

def result_path(name: str) -> Path:
    """bench/results/<name>.json."""
    return RESULTS / f"{name}.json"


def write_json(name: str, payload: dict) -> Path:
    """Write bench/results/<name>.json with the project's one atomic writer; keys stay in the order given."""
    from iterabre import files

    return files.write_json(payload, result_path(name), indent=2, sort_keys=False)


def phase_mb(phase) -> dict:
    """A planner PhaseEstimate as a result file stores it: total and parts in MiB, and its note."""
    return {"estimate_mb": phase.per_process / 2**20, "parts_mb": {k: v / 2**20 for k, v in phase.parts.items()},
            "note": phase.note}


def rewrite_derived(name: str, derive) -> Path:
    """Re-derive what a result file computes from its measurements (e.g. the planner's estimates after a planner
    change), keeping the measurements and the machine line: `derive(result) -> result`."""
    from iterabre import files

    return write_json(name, derive(files.read_json(result_path(name))))


def previous(name: str, s: dict) -> dict:
    """The saved <name>.json if it was made with the settings `s`, else {}: the one resume rule."""
    from iterabre import files

    path = result_path(name)
    if not path.exists():
        return {}
    old = files.read_json(path)
    return old if old.get("settings") == json.loads(json.dumps(s)) else {}  # compared as stored (tuples -> lists)


@contextmanager
def locked(name: str):
    """An exclusive lock on <name>.json for a read-modify-write: two processes may share the file."""
    import fcntl

    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def save_units(name: str, s: dict, units: dict, pending: list[str], notes: str, merge: bool = False) -> dict:
    """Write {machine, settings, units, pending, notes} after a unit finishes; returns the units saved.

    merge: add `units` to those already in the file (re-read under the lock), so a second process
    working on the same file keeps what the first finished.
    """
    with locked(name):
        if merge:
            units = {**previous(name, s).get("units", {}), **units}
        write_json(name, {"machine": machine_info(), "settings": s, "units": units,
                          "pending": [u for u in pending if u not in units], "notes": notes})
    return units


# ---------------------------------------------------------------- jobs through the flow

def fresh_stores() -> Path:
    """A temp folder holding fresh Prefect and MLflow stores; must run before either is imported."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    os.environ.update({
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "HF_DATASETS_CACHE": str(tmp / "hf-datasets"),
    })
    return tmp


def run_flow(cfg, log_checkpoints: bool = False, **options) -> dict:
    """One compression job through the Prefect flow, as `iterabre compress` runs it; its report.

    The loop lives once, in flows/compress.py: every bench that prunes runs it from here.
    Checkpoints are not copied to MLflow by default: a bench throws its jobs away.
    """
    from flows.compress import compress, flow_parameters
    from flows.lifecycle import ensure_prefect_api

    ensure_prefect_api()  # started once per process; later calls return at once
    return compress(**flow_parameters(cfg, log_checkpoints=log_checkpoints, **options))


def run_units(plan: list[str], units: dict, run, save) -> dict:
    """Run each planned unit not in `units` yet, saving after each, with fresh Prefect / MLflow stores.

    run(uid, units, work) -> the unit's result (with its "seconds"); save(uid, result) -> every unit
    saved so far. The stores and the jobs' outputs live in `work`, thrown away at the end.
    """
    import shutil

    work = fresh_stores()
    try:
        for uid in plan:
            if uid in units:
                print(f"[skip] {uid}: finished in an earlier run", flush=True)
                continue
            print(f"[run ] {uid} ...", flush=True)
            done = run(uid, units, work)
            units = save(uid, done)
            print(f"[done] {uid} in {done.get('seconds', 0) / 60:.1f} min", flush=True)
        return units
    finally:
        shutil.rmtree(work, ignore_errors=True)


def recovery_phases(report: dict) -> list[dict]:
    """A flow report's recovery phases in order: one per step, then the 'final' schedule's last one."""
    return report["steps"] + ([report["final_recovery"]] if report.get("final_recovery") else [])


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """A rich table on stdout (plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col != columns[0] else "left")
    for row in rows:
        table.add_row(*[fmt(v) for v in row])
    Console(width=160).print(table)


def fmt(value) -> str:
    """Compact cell text: 4 significant digits for floats, whole numbers from 10,000 on (no exponents)."""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return "" if value is None else str(value)


def timed(fn) -> float:
    """Seconds one call of fn() takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(variants: dict, repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Time each variant `repeats` times, alternating order every round (ABBA) so drift hits both."""
    names = list(variants)
    if warmup:  # first calls pay for lazy init, page faults and allocator growth
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(timed(variants[name]))
    return times


def median(values: list[float]) -> float:
    """Median; the robust choice on a CPU shared with other jobs."""
    return statistics.median(values)


def ratio_stats(num: list[float], den: list[float]) -> dict:
    """num/den three ways; on a shared CPU the paired median is the steadiest.

    paired: median of num[i]/den[i] over rounds (each pair ran back to back, so a load
    spike mostly hits both); medians: ratio of the medians; best: ratio of the minima
    (the runs least disturbed by neighbours).
    """
    pairs = [a / b for a, b in zip(num, den)]
    return {"paired": median(pairs), "medians": median(num) / median(den), "best": min(num) / min(den),
            "pairs": pairs}


def run_child(script: Path, args: list[str], timeout: int = 3600, env: dict | None = None) -> dict:
    """Run `script` in a fresh interpreter and parse the JSON object on its last stdout line.

    `env` adds to (or, with a None value, removes from) this process's environment.
    """
    child_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env={k: v for k, v in child_env.items() if v is not None})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"child {script.name} {args} failed (rc={proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def child_memory(script: Path, children: dict[str, str], extra: list[str], key: str) -> dict:
    """Peak RSS of each `--child` run in a fresh process: {name: {...child result, key: peak - setup MiB}}."""
    out = {}
    for name, child in children.items():
        r = run_child(script, ["--child", child, *extra])
        out[name] = {**r, key: r["peak_mb"] - r["setup_mb"]}
    return out


def peak_of(fn, device: str = "cpu") -> dict:
    """Memory around one call of fn() (iterabre.memory's peak marks, MiB): the peak before it
    (loading), the level it starts from, and the peak while it runs (CUDA allocator or CPU RSS)."""
    import torch

    from iterabre.memory import peak_mb, start_peak

    dev = torch.device(device)
    loaded = peak_mb(dev, 0)  # nothing was reset yet: the process's peak so far
    baseline = start_peak(dev)
    setup = peak_mb(dev, baseline)  # right after the reset the peak mark is the current level
    fn()
    return {"load_peak_mb": loaded, "setup_mb": setup, "peak_mb": peak_mb(dev, baseline)}


def emit_child_result(result: dict) -> None:
    """Print the child's result as one JSON line for `run_child`."""
    print(json.dumps(result), flush=True)
