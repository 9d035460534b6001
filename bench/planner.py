"""The memory planner's recovery estimate vs the measured peak memory of a real KD recovery.

Each unit runs `iterabre.recovery.recover` (method kd) for a few optimizer steps in a fresh child
process (the peak mark reset after the imports and the models are built) and compares the child's
peak during the call with `iterabre.planner`'s recovery estimate for the same job. On the CPU the
peak is the process's RSS. On CUDA (`--device cuda`, result file planner-cuda) the models are in
the product's CUDA dtype (bf16 weights, float32 masters for what trains) and the peak is what the
process holds on the GPU: the allocator's peak reservation plus the CUDA context, read with
torch.cuda.mem_get_info before any model exists. CPU models:
SmolLM2-135M (models/smollm2-135m: full KD, LoRA, adjacent, and a bigger batch with and without
gradient checkpointing at 4 x 512) and a random Llama of 1.1B parameters built from
configs/models/llama-1b-random (hidden 2048, 22 blocks; LoRA and adjacent in float32: full KD does
not fit 24 GiB, bf16 or not, see the notes). CUDA units: the same SmolLM2 and 1.1B jobs at the
planner tables' micro-batch (8 x 512), and a random Llama-3.1-8B (configs/models/llama-3.1-8b).
Random weights stand in where the real ones are absent (memory does not depend on their values).
Target: |estimate / measured - 1| <= 25 %.

    .venv/bin/python bench/planner.py [--quick] [--only UNIT,...] [--report-only] [--device cuda]
    .venv/bin/python bench/planner.py [--device cuda] --refresh-estimates   # after a planner change
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common

REPO = common.REPO
NAME = "planner"
SMOL, LLAMA_1B, LLAMA_8B = "models/smollm2-135m", "configs/models/llama-1b-random", "configs/models/llama-3.1-8b"
# unit -> the job: model, what trains, micro-batch, sequence length, optimizer steps, held-out windows
UNITS = {
    "smollm2/kd-all": dict(model=SMOL, trainable="all", batch=4, seq=128, steps=2, heldout=8),
    "smollm2/kd-lora": dict(model=SMOL, trainable="lora", batch=4, seq=128, steps=2, heldout=8),
    "smollm2/kd-adjacent": dict(model=SMOL, trainable="adjacent", batch=4, seq=128, steps=2, heldout=8),
    "smollm2/kd-all-4x512": dict(model=SMOL, trainable="all", batch=4, seq=512, steps=2, heldout=2),
    "smollm2/kd-all-4x512-ckpt": dict(model=SMOL, trainable="all", batch=4, seq=512, steps=2, heldout=2,
                                      ckpt=True),
    "llama1b/kd-lora": dict(model=LLAMA_1B, trainable="lora", batch=2, seq=128, steps=2, heldout=1),
    "llama1b/kd-adjacent": dict(model=LLAMA_1B, trainable="adjacent", batch=2, seq=128, steps=2, heldout=1),
}
# On a GPU: the planner tables' micro-batch (docs/SCALING.md), up to an 8B model on one GPU.
CUDA_UNITS = {
    "smollm2/kd-all-8x512": dict(model=SMOL, trainable="all", batch=8, seq=512, steps=2, heldout=2),
    "smollm2/kd-lora-8x512": dict(model=SMOL, trainable="lora", batch=8, seq=512, steps=2, heldout=2),
    "smollm2/kd-adjacent-8x512": dict(model=SMOL, trainable="adjacent", batch=8, seq=512, steps=2, heldout=2),
    "llama1b/kd-all-8x512": dict(model=LLAMA_1B, trainable="all", batch=8, seq=512, steps=2, heldout=2),
    "llama8b/kd-lora-8x512": dict(model=LLAMA_8B, trainable="lora", batch=8, seq=512, steps=2, heldout=2),
    "llama8b/kd-adjacent-8x512": dict(model=LLAMA_8B, trainable="adjacent", batch=8, seq=512, steps=2, heldout=2),
    "llama8b/kd-all-2x512": dict(model=LLAMA_8B, trainable="all", batch=2, seq=512, steps=2, heldout=2),
}
QUICK = ("smollm2/kd-lora",)
CUDA_QUICK = ("smollm2/kd-lora-8x512",)
# SmolLM2: the output scorer's first pick (BENCHMARKS §5); the others: a middle block
REMOVED = {SMOL: 14, LLAMA_1B: 10, LLAMA_8B: 16}
NOTES = ("Peak RSS (VmHWM) of a fresh child per unit, the mark reset after the imports and the models are built, "
         "over one recover() call (held-out KD before and after, the optimizer steps). The estimate is the "
         "planner's recovery phase for the same job (iterative, one block removed, float32, CPU).")
CUDA_NOTES = ("GPU memory of a fresh child per unit over one recover() call (held-out KD before and after, the "
              "optimizer steps): the CUDA allocator's peak reservation, the counter reset after the models are "
              "built, plus the CUDA context (device memory in use minus the allocator's reservation, before any "
              "model). The estimate is the planner's recovery phase for the same job (iterative, one block "
              "removed, dtype auto: bf16 weights with float32 masters, one GPU).")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    common.add_result_args(p, NAME)
    p.add_argument("--only", default=None, help="comma-separated units to run (default: all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the recoveries run")
    p.add_argument("--refresh-estimates", action="store_true",
                   help="rewrite the saved estimates with the current planner (measurements and machine kept)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def job_of(unit: dict, device: str = "cpu"):
    """The planner's Job for a unit: what the child runs (KD; float32 on the CPU, dtype auto on CUDA)."""
    from iterabre.planner import Job, counts_for

    layers = counts_for(str(REPO / unit["model"])).num_layers
    return Job(target_layers=layers - 1, method="kd", trainable=unit["trainable"],
               dtype="float32" if device == "cpu" else "auto", device=device,
               batch_size=unit["batch"], seq_len=unit["seq"], grad_checkpointing=unit.get("ckpt", False),
               calibration_tokens=unit["heldout"] * unit["seq"])  # the held-out set is as big as calibration


def estimate(unit: dict, device: str = "cpu") -> dict:
    """The planner's recovery estimate for the unit (bytes by part, and the total)."""
    from iterabre import planner

    m = planner.counts_for(str(REPO / unit["model"]))
    return common.phase_mb(planner.recovery_phase(m, job_of(unit, device), unit.get("ckpt", False)))


# ---------------------------------------------------------------- the child

def _models(unit: dict, device: str):
    """(teacher, student without the unit's block) on `device`: float32 on the CPU, bf16 on CUDA."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from iterabre.models import load_model, working_dtype
    from iterabre.planner import read_config
    from iterabre.surgery import remove_blocks

    dtype = working_dtype("auto" if device == "cuda" else "float32", device)
    folder = REPO / unit["model"]
    if (folder / "model.safetensors").exists():  # loaded twice, as the recovery step loads them
        teacher, _ = load_model(str(folder), device=device, dtype=dtype)
        student, _ = load_model(str(folder), device=device, dtype=dtype)
    else:  # random weights: memory does not depend on their values
        torch.manual_seed(0)
        with torch.device(device):  # built where they run: an 8B model is not first made on the CPU
            teacher = AutoModelForCausalLM.from_config(read_config(folder / "config.json"),
                                                       dtype=getattr(torch, dtype)).eval()
        student = copy.deepcopy(teacher)
    return teacher, remove_blocks(student, [REMOVED[unit["model"]]])


def _cuda_context_mb() -> float:
    """MiB the process holds on the GPU outside the allocator's reservation: the CUDA context, cuBLAS, ..."""
    import torch

    torch.zeros(1, device="cuda")  # create the context
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / 2**20


def child(uid: str, device: str) -> None:
    """Build the models, reset the peak mark, run one recover() call; print the result as JSON."""
    import torch

    from iterabre.config import RecoveryConfig
    from iterabre.recovery import recover

    runtime_mb = common.peak_of(lambda: None)["setup_mb"]  # RSS after the imports, before any model
    context_mb = _cuda_context_mb() if device == "cuda" else None
    unit = (CUDA_UNITS if device == "cuda" else UNITS)[uid]
    teacher, student = _models(unit, device)
    vocab = teacher.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (unit["batch"] * unit["steps"], unit["seq"]), generator=gen)  # [N, T]
    held = torch.randint(0, vocab, (unit["heldout"], unit["seq"]), generator=gen)
    cfg = RecoveryConfig(method="kd", tokens=ids.numel(), batch_size=unit["batch"], trainable=unit["trainable"],
                         grad_checkpointing=unit.get("ckpt", False), max_loss_ratio=1e9)
    out = {}

    def run():
        out["result"] = recover(student, teacher, ids, torch.ones_like(ids), cfg, [REMOVED[unit["model"]]],
                                device=device, heldout_ids=held, heldout_mask=torch.ones_like(held))

    mem = common.peak_of(run, device)
    r = out["result"]
    if device == "cuda":  # what the process holds on the GPU at its peak: reservation + context
        reserved_mb = torch.cuda.max_memory_reserved() / 2**20
        mem = {**mem, "allocated_peak_mb": mem["peak_mb"], "reserved_peak_mb": reserved_mb,
               "context_mb": context_mb, "peak_mb": reserved_mb + context_mb}
    common.emit_child_result({**mem, "runtime_mb": context_mb if device == "cuda" else runtime_mb,
                              "steps": r.steps, "tokens": r.tokens, "aborted": r.aborted, "seconds": r.seconds,
                              "dtype": r.dtype})


# ---------------------------------------------------------------- the parent

def _estimated(measured: dict, unit: dict, device: str) -> dict:
    """A unit's measurement with the current planner's estimate and, unless it failed, their ratio."""
    est = estimate(unit, device)
    return {**measured, **est, **({} if measured.get("failed") else {"ratio": est["estimate_mb"] / measured["peak_mb"]})}


def with_estimates(result: dict, device: str) -> dict:
    """The result with every unit's estimate (and ratio) from the current planner."""
    table = CUDA_UNITS if device == "cuda" else UNITS
    return {**result, "units": {uid: _estimated(u, table[uid], device) for uid, u in result["units"].items()}}


def run_unit(uid: str, device: str) -> dict:
    """One unit in a fresh child: measured peak next to the estimate (or why the child failed)."""
    unit = (CUDA_UNITS if device == "cuda" else UNITS)[uid]
    try:
        measured = common.run_child(Path(__file__), ["--child", uid, "--device", device], timeout=7200)
    except RuntimeError as e:  # e.g. out of memory: the estimate said it fits, the device did not agree
        measured = {"failed": str(e).splitlines()[-1]}
    return _estimated({**unit, **measured}, unit, device)


def rows(units: dict) -> list[list]:
    """Table rows: unit, job, estimate, measured, ratio and the three largest parts."""
    out = []
    for uid, u in units.items():
        big = sorted(u["parts_mb"].items(), key=lambda kv: -kv[1])[:3]
        failed = u.get("failed")
        out.append([uid, f"{u['batch']}x{u['seq']}{' ckpt' if u.get('ckpt') else ''}", u["steps"],
                    None if failed else round(u["runtime_mb"]), round(u["estimate_mb"]),
                    f"failed: {failed[:100]}" if failed else round(u["peak_mb"]),
                    None if failed else f"{100 * (u['ratio'] - 1):+.1f} %", ", ".join(f"{k} {v:.0f}" for k, v in big)])
    return out


COLUMNS = ["unit", "batch", "steps", "runtime MiB", "estimate MiB", "measured peak MiB", "estimate error",
           "largest parts of the estimate (MiB)"]


def main() -> None:
    args = parse_args()
    if args.child:
        common.apply_threads(args.threads)
        child(args.child, args.device)
        return
    cuda = args.device == "cuda"
    name, table = result_name(args), CUDA_UNITS if cuda else UNITS
    settings = {"units": table, "removed": {m: REMOVED[m] for m in {u["model"] for u in table.values()}}}
    if cuda:
        settings["device"] = "cuda"
    notes = CUDA_NOTES if cuda else NOTES
    if args.refresh_estimates:
        common.rewrite_derived(name, lambda result: with_estimates(result, args.device))
    units = common.previous(name, settings).get("units", {})
    if not args.report_only and not args.refresh_estimates:
        plan = list((CUDA_QUICK if cuda else QUICK) if args.quick else table)
        if args.only:
            plan = [u for u in plan if u in args.only.split(",")]
        for uid in plan:
            if uid in units and not units[uid].get("failed"):  # a failed unit runs again
                print(f"[skip] {uid}", flush=True)
                continue
            print(f"[run ] {uid} ...", flush=True)
            units = common.save_units(name, settings, {uid: run_unit(uid, args.device)}, list(table), notes,
                                      merge=True)
    common.print_table(f"planner recovery estimate vs measured peak ({args.device})", COLUMNS, rows(units))


def result_name(args) -> str:
    return common.result_name(args, NAME if args.device == "cpu" else f"{NAME}-cuda")


if __name__ == "__main__":
    sys.exit(main())
