"""Shared helpers for the bench scripts: offline env, machine info, timing, memory, output.

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
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

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


def add_common_args(parser) -> None:
    """--quick and --threads, shared by every script."""
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy CPU")


def apply_threads(threads: int | None) -> None:
    """Pin torch's thread count; oversubscribed OpenMP spin-waits can cost 10x on a shared CPU."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    """HEAD commit and whether the working tree has uncommitted changes."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain"))}


def machine_info() -> dict:
    """What the numbers were measured on; stored next to them in every result file."""
    import torch
    import transformers

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
        "git": git_commit(),
    }


def write_json(name: str, payload: dict) -> Path:
    """Write bench/results/<name>.json atomically (temp file in the same folder, then rename)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by everyone
    os.replace(tmp, path)
    return path


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
    """Compact cell text: 4 significant digits for floats."""
    if isinstance(value, float):
        return f"{value:.4g}"
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


def run_child(script: Path, args: list[str], timeout: int = 3600) -> dict:
    """Run `script` in a fresh interpreter and parse the JSON object on its last stdout line."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **OFFLINE_ENV})
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


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def max_rss_mb() -> float:
    """Peak RSS of this process's address space so far, in MiB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork/exec,
    so a child of a big parent would report the parent's size.
    """
    import resource

    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> float:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); returns the current RSS in MiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # no reset: the peak then also covers setup, which only overstates memory
    return _status_mb("VmRSS") or max_rss_mb()


def emit_child_result(result: dict) -> None:
    """Print the child's result as one JSON line for `run_child`."""
    print(json.dumps(result), flush=True)
