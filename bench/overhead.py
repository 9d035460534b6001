"""Orchestration overhead: the Prefect + MLflow flow vs the same library steps in a plain loop.

The job is tiny on purpose (a random 6-block Llama with the byte tokenizer, 2 blocks
removed one per step, no evaluation), so the fixed cost of orchestration shows. Both
variants call the same `iterabre.steps` functions (which already write every checkpoint
to disk); the flow adds Prefect task states, result persistence, cache-key hashing,
artifacts and MLflow runs, registry and report files. The one-off start of Prefect's
ephemeral API server is measured separately with an empty flow, before anything else.
Prefect and MLflow use fresh stores in a temp folder.

    .venv/bin/python bench/overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import common



def fresh_stores() -> Path:
    """A temp folder holding fresh Prefect and MLflow stores; must run before either is imported."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    os.environ.update({
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "HF_DATASETS_CACHE": str(tmp / "hf-datasets"),
    })
    return tmp


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--repeats", type=int, default=None)
    return p.parse_args()


def job_config(model_dir: Path, out: Path, quick: bool):
    """The tiny compression job both variants run."""
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


def plain_loop(cfg) -> dict:
    """The flow's algorithm with direct calls to the same steps: prepare, score, prune, recover, publish."""
    import dataclasses

    from iterabre import files, planning, steps

    out, device = Path(cfg.output), cfg.device
    base = steps.prepare_base(cfg.model, cfg.revision, out / "work")
    plan = planning.num_steps_for(cfg, steps.num_layers(base))
    budgets = planning.step_budgets(cfg.recovery_tokens, len(plan), cfg.budget_schedule)
    data = steps.prepare_data(cfg, base, out / "work", budgets)
    current, records = base, []
    for step, (k, window) in enumerate(zip(plan, planning.recovery_ranges(budgets, cfg.seq_len)), 1):
        scored = steps.score(current, data, cfg.scorer, 1, device)
        remove = planning.plan_removal(scored["scores"], k, cfg.scorer, scored["order"])
        pruned = steps.prune(current, remove, out / "work" / f"step-{step:02d}-pruned")
        current = out / "steps" / f"step-{step:02d}"
        rec = steps.recover(pruned, base, data, {**dataclasses.asdict(cfg.recovery), "tokens": budgets[step - 1]},
                            remove, window, current, device)
        shutil.rmtree(pruned, ignore_errors=True)
        records.append({"step": step, "removed": remove, "scores": scored["scores"], "recovery": rec})
    final = steps.publish(current, out / "final")
    report = {"removed_layers": [i for r in records for i in r["removed"]], "steps": records,
              "final_num_layers": steps.num_layers(final)}
    files.write_json(report, out / "report.json")
    return report


def flow_run(cfg) -> dict:
    """The Prefect flow (what `iterabre compress` runs), in this process."""
    from flows.compress import compress, flow_parameters

    return compress(**flow_parameters(cfg))


def server_start() -> dict:
    """Seconds for an empty flow with a cold ephemeral server, then with a warm one."""
    from prefect import flow

    @flow(name="bench-empty")
    def empty() -> int:
        return 1

    cold = common.timed(empty)
    warm = common.timed(empty)
    return {"empty_flow_cold_s": cold, "empty_flow_warm_s": warm, "server_start_s": cold - warm}


def main() -> None:
    """Start the server, then alternate flow and plain runs on fresh output folders."""
    args = parse_args()
    common.apply_threads(args.threads)
    tmp = fresh_stores()
    repeats = args.repeats or (2 if args.quick else 5)
    start = time.perf_counter()
    import flows.compress  # noqa: F401  (import cost is not part of either variant)
    from iterabre import steps  # noqa: F401
    imports = time.perf_counter() - start
    server = server_start()
    model_dir = tiny_model_dir(tmp)
    runners = {"flow": flow_run, "plain": plain_loop}
    times, removed, count = {k: [] for k in runners}, {}, 0
    for r in range(repeats + 1):  # round 0 warms caches (tokenizer, data files) and is dropped
        for name in runners if r % 2 == 0 else reversed(list(runners)):
            count += 1
            cfg = job_config(model_dir, tmp / f"run-{count:02d}-{name}", args.quick)
            t0 = time.perf_counter()
            report = runners[name](cfg)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
            removed[name] = report["removed_layers"]
    med = {k: common.median(v) for k, v in times.items()}
    overhead = med["flow"] - med["plain"]
    result = {"repeats": repeats, "seconds": times, "median_s": med, "overhead_s": overhead,
              "overhead_pct": 100 * overhead / med["plain"], "imports_s": imports, **server,
              "removed_layers": removed, "config": job_config(model_dir, tmp / "x", args.quick).to_dict()}
    common.print_table("tiny job (6 -> 4 blocks, 2 steps): flow vs plain loop of the same steps",
                       ["variant", "median s", "runs"],
                       [["plain loop", med["plain"], len(times["plain"])],
                        ["Prefect + MLflow flow", med["flow"], len(times["flow"])],
                        ["overhead (s)", overhead, None], ["overhead (%)", result["overhead_pct"], None],
                        ["one-off: ephemeral server start", server["server_start_s"], 1],
                        ["one-off: import prefect+mlflow+flow", imports, 1]])
    path = common.write_json("overhead", {"machine": common.machine_info(), "quick": args.quick,
                                          "target": "flow overhead <= 10% or a few seconds", **result})
    print(f"wrote {path}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
