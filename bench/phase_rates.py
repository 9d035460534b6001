"""Achieved FLOP/s of each phase of a compression job: does equal compute mean equal time?

The equal-compute tables (BENCHMARKS §5) give every recipe the same FLOPs, counted from the
shapes by `iterabre.flops`. On the CPU a FLOP costs about the same in every phase; on a GPU a
phase made of small matmuls (one block at a time) may run far below the peak. This script runs
each phase the default recipe is made of -- output scoring (`score_blocks`), block-wise
reconstruction (`recover`, method block-recon) and KD of all weights (`recover`, method kd) --
on one model in a fresh child process each, with the library's own FLOP counter around the call,
and reports seconds, TFLOP, TFLOP/s, MFU (on a GPU with a known peak) and peak memory.

Weights are random (rates depend on the shapes, not the values): SmolLM2-135M's config, a 1.1B
Llama (configs/models/llama-1b-random) and, on CUDA only, Llama-3.1-8B (configs/models/llama-3.1-8b).
On CUDA the models are bf16 and recovery trains in bf16 autocast with float32 masters, as a job does.

    .venv/bin/python bench/phase_rates.py [--quick] [--device cuda] [--only UNIT,...] [--report-only]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common

NAME = "phase_rates"
# model -> config folder (the first that exists; .gpu/ is where the config travels to a lent GPU)
MODELS = {"smollm2": ("models/smollm2-135m", ".gpu/smollm2-135m"), "llama1b": ("configs/models/llama-1b-random",),
          "llama8b": ("configs/models/llama-3.1-8b",)}
PHASES = ("score-output", "block-recon", "kd", "lora-kd")
TRAINING = ("kd", "lora-kd")  # phases whose optimizer steps are timed one by one
# sizes per device: calibration windows scored, KD micro-batch and steps, block-recon tokens and Adam steps
SIZES = {
    "cpu": dict(seq=128, calib=8, batch=4, kd_steps=4, recon_tokens=2048, recon_steps=20),
    "cuda": dict(seq=512, calib=32, batch=8, kd_steps=16, recon_tokens=16384, recon_steps=100),
}
QUICK = dict(seq=64, calib=2, batch=2, kd_steps=2, recon_tokens=256, recon_steps=4)
CPU_MODELS, CUDA_MODELS = ("smollm2",), ("smollm2", "llama1b", "llama8b")
BATCH_8B = 2  # full KD of 8B on one 141 GB GPU fits at 2 x 512 (BENCHMARKS §8), not at 8 x 512
NOTES = ("Each unit: one call in a fresh child, random weights with the model's shapes, the library's FLOP "
         "counter (iterabre.flops.count_flops) around it. Seconds: wall time of the call (recover's held-out "
         "checks included, as its flops are). Peak: CUDA allocator peak / CPU peak RSS during the call.")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    common.add_result_args(p, NAME)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--only", default=None, help="comma list of units MODEL/PHASE to run")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: table)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # unit id: run it here, print JSON
    return p.parse_args()


def plan(device: str, quick: bool) -> dict[str, dict]:
    """unit id -> its sizes, for every model of this device and every phase."""
    models = ("smollm2",) if quick else (CUDA_MODELS if device == "cuda" else CPU_MODELS)
    base = QUICK if quick else SIZES[device]
    out = {}
    for m in models:
        for ph in PHASES:
            size = dict(base, batch=BATCH_8B) if m == "llama8b" and ph == "kd" else dict(base)
            out[f"{m}/{ph}"] = {"model": m, "phase": ph, **size}
    return out


def config_folder(model: str) -> Path:
    """The first existing config folder of `model`."""
    for rel in MODELS[model]:
        if (common.REPO / rel / "config.json").exists():
            return common.REPO / rel
    raise SystemExit(f"no config.json for {model} in {', '.join(MODELS[model])}: run `make setup` "
                     f"(or copy the model's config there)")


def build(model: str, device: str):
    """(teacher, student with the middle block removed), random weights, on `device` in its working dtype."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from iterabre.models import working_dtype
    from iterabre.planner import read_config
    from iterabre.surgery import remove_blocks

    torch.manual_seed(0)
    dtype = getattr(torch, working_dtype("auto", device))
    with torch.device(device):  # built where it runs: an 8B model is not first made on the CPU
        teacher = AutoModelForCausalLM.from_config(read_config(config_folder(model) / "config.json"),
                                                   dtype=dtype).eval()
    middle = teacher.config.num_hidden_layers // 2
    return teacher, remove_blocks(copy.deepcopy(teacher), [middle]), [middle]


def run_phase(unit: dict, device: str) -> dict:
    """Run one phase; its tokens, seconds and counted FLOPs."""
    import time

    import torch

    from iterabre.config import RecoveryConfig
    from iterabre.flops import count_flops
    from iterabre.recovery import recover
    from iterabre.scorers import score_blocks

    teacher, student, removed = build(unit["model"], device)
    gen = torch.Generator().manual_seed(0)
    vocab, seq = teacher.config.vocab_size, unit["seq"]
    if unit["phase"] == "score-output":
        ids = torch.randint(0, vocab, (unit["calib"], seq), generator=gen)  # [N, T]
        del student
        start = time.perf_counter()
        with count_flops() as counted:
            score_blocks(teacher, ids, torch.ones_like(ids), scorer="output", batch_size=unit["batch"])
        if device == "cuda":
            torch.cuda.synchronize()
        return {"tokens": ids.numel(), "seconds": time.perf_counter() - start, "flops": counted.total}
    kd = unit["phase"] in TRAINING
    rows = unit["batch"] * unit["kd_steps"] if kd else unit["recon_tokens"] // seq
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    held = ids[: unit["batch"]]  # one micro-batch of held-out checks before and after, as a job runs them
    cfg = RecoveryConfig(method=unit["phase"], tokens=ids.numel() if kd else 0, batch_size=unit["batch"],
                         block_recon_tokens=unit["recon_tokens"], block_recon_steps=unit["recon_steps"],
                         max_loss_ratio=1e9)
    marks = []  # (seconds, FLOPs counted so far) at the end of every optimizer step

    def mark(_info: dict) -> None:
        marks.append((time.perf_counter(), counted.total))  # the loss was read: the step has finished

    with count_flops() as counted:
        r = recover(student, teacher, ids, torch.ones_like(ids), cfg, removed, progress=mark, device=device,
                    heldout_ids=held, heldout_mask=torch.ones_like(held))
    out = {"tokens": r.tokens if kd else unit["recon_tokens"], "seconds": r.seconds, "flops": r.flops,
           "steps": r.steps}
    if kd and len(marks) > 2:  # from the end of step 1 (warm-up, first allocations behind) to the last
        (t0, f0), (t1, f1) = marks[1], marks[-1]
        out.update(step_seconds=[b[0] - a[0] for a, b in zip(marks, marks[1:])], steady_flops=f1 - f0,
                   steady_seconds=t1 - t0, steady_tokens=(len(marks) - 2) * unit["batch"] * seq)
    return out


def child(uid: str, args) -> None:
    """Measure one unit in this (fresh) process and print it as JSON."""
    device = common.device(args.device)
    unit = plan(device, args.quick)[uid]
    out = {}
    mem = common.peak_of(lambda: out.update(run_phase(unit, device)), device)
    common.emit_child_result({**out, "peak_mb": mem["peak_mb"]})


def derive(u: dict, peak: float | None) -> dict:
    """TFLOP/s and MFU of a measured unit."""
    if "failed" in u:
        return u
    rate = u["flops"] / u["seconds"]
    out = {**u, "tflop": u["flops"] / 1e12, "tflops_per_s": rate / 1e12, "mfu": rate / (peak * 1e12) if peak else None}
    if "steady_seconds" in u:  # optimizer steps only, after the first
        steady = u["steady_flops"] / u["steady_seconds"]
        out.update(steady_tflops_per_s=steady / 1e12, steady_mfu=steady / (peak * 1e12) if peak else None,
                   steady_tokens_per_s=u["steady_tokens"] / u["steady_seconds"])
    return out


def rows(units: dict) -> list[list]:
    """The table: one row per unit."""
    return [[uid, f"{u['batch']} x {u['seq']}", u.get("tokens"), u.get("seconds"), u.get("tflop"), u.get("tflops_per_s"), u.get("mfu"),
             u.get("steady_tokens_per_s"), u.get("steady_tflops_per_s"), u.get("steady_mfu"), u.get("peak_mb"),
             u.get("failed", "")] for uid, u in units.items()]


COLUMNS = ["unit", "batch", "tokens", "seconds", "TFLOP", "TFLOP/s", "MFU", "steady tok/s", "steady TFLOP/s", "steady MFU",
           "peak MiB", "failed"]


def main() -> None:
    """Run the units not finished yet, each in a fresh child; print and save."""
    args = parse_args()
    common.apply_threads(args.threads)
    if args.child:
        return child(args.child, args)
    from iterabre.flops import peak_tflops

    device = common.device(args.device)
    name = common.result_name(args, NAME + ("-cuda" if device == "cuda" else ""))
    machine = common.machine_info()
    peak = peak_tflops(machine.get("cuda"), args.peak_tflops)
    units_plan = plan(device, args.quick)
    wanted = args.only.split(",") if args.only else list(units_plan)
    unknown = [u for u in wanted if u not in units_plan]
    if unknown:
        raise SystemExit(f"unknown unit(s) {', '.join(unknown)}: use some of {', '.join(units_plan)}")
    s = {"device": device, "units": units_plan, "peak_tflops": peak}
    units = common.previous(name, s).get("units", {})
    for uid in [] if args.report_only else wanted:
        if uid in units and not units[uid].get("failed"):  # finished in an earlier run; a failed one runs again
            continue
        extra = ["--quick"] if args.quick else []
        try:
            measured = common.run_child(Path(__file__), ["--child", uid, "--device", device] + extra, timeout=3600)
        except RuntimeError as e:  # e.g. out of memory
            measured = {"failed": str(e).splitlines()[-1]}
        units = common.save_units(name, s, {uid: derive({**units_plan[uid], **measured}, peak)}, list(units_plan),
                                  NOTES, merge=True)
        print(f"[done] {uid}: {units[uid].get('tflops_per_s', units[uid].get('failed'))} TFLOP/s", flush=True)
    common.print_table(f"Phase rates on {device}", COLUMNS, rows(units))


if __name__ == "__main__":
    main()
