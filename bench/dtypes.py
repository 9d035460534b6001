"""Float32 masters vs bf16 trained weights: the state's bytes, and what a KD phase keeps (docs/SCALING.md).

SmolLM2-135M with block 17 removed (the block the output scorer removes first), KD from the
base model, library defaults otherwise. Two measurements per variant:

- `state`: bytes of teacher, student, gradients and AdamW moments after one optimizer step, in
  the real dtypes (no compute).
- `train`: held-out KD loss before and after a KD phase (TOKENS tokens, lr LR). bf16 *storage* is
  emulated: weights (and, for `bf16`, the AdamW moments) are rounded to bf16 values after every
  step, teacher and starting weights hold bf16 values, and compute runs in float32, because bf16
  matrix products on this project's CPU (no AVX512-BF16 or AMX) run about 60x slower than float32.

Variants: fp32 (everything float32, the CPU default) | masters (bf16 teacher and frozen weights,
float32 trained weights and AdamW: what iterabre ships) | bf16-fp32state (bf16 trained weights,
float32 moments) | bf16 (bf16 weights and moments).

    .venv/bin/python bench/dtypes.py                      # every unit not yet in bench/results/dtypes.json
    .venv/bin/python bench/dtypes.py --only train:masters:8192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common

VARIANTS = ("fp32", "masters", "bf16-fp32state", "bf16")
UNITS = [f"state:{v}" for v in VARIANTS] + [f"train:{v}:2048" for v in VARIANTS] + \
    ["train:masters:8192", "train:bf16-fp32state:8192"]
REMOVED, LR = [17], 5e-5
WORK = common.REPO / "bench" / "work" / "dtypes"  # student folder and data, made once


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma list of units (default: every unit not yet measured)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one unit, in a fresh process
    return p.parse_args()


def prepare() -> None:
    """The pruned student and the flow's data split (seed 0, 128-token windows), once."""
    from iterabre import steps
    from iterabre.config import CompressConfig

    base = common.REPO / "models" / "smollm2-135m"
    if not (WORK / "student").exists():
        steps.prune(base, REMOVED, WORK / "student")
    if not (WORK / "data.pt").exists():
        steps.prepare_data(CompressConfig(model="x", target_layers=27, calibration_tokens=2048, seq_len=128),
                           base, WORK, budgets=[8192])


def state(variant: str) -> dict:
    """Bytes of the recovery state after one AdamW step, in the variant's real dtypes."""
    import torch

    import iterabre.recovery as rec
    from iterabre.models import load_model

    dtype = "float32" if variant == "fp32" else "bfloat16"
    teacher, _ = load_model(str(common.REPO / "models" / "smollm2-135m"), dtype=dtype)
    student, _ = load_model(str(WORK / "student"), dtype=dtype)
    params = list(student.parameters())
    if variant == "masters":
        rec.float32_masters(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=LR)
    opt.step()
    moments = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    adam = sum(t.numel() * 4 for t in moments) if variant == "bf16-fp32state" else nbytes(moments)
    out = {"teacher": nbytes(teacher.parameters()), "student": nbytes(params),
           "grads": nbytes(p.grad for p in params), "adam": adam}
    return {**out, "total": sum(out.values())}


def train(variant: str, tokens: int) -> dict:
    """Held-out KD loss before/after one KD phase, bf16 storage emulated (see the module docstring)."""
    import torch

    import iterabre.recovery as rec
    from iterabre.config import RecoveryConfig
    from iterabre.models import load_model
    from iterabre.steps import load_data

    bf = torch.bfloat16
    teacher, _ = load_model(str(common.REPO / "models" / "smollm2-135m"))
    student, _ = load_model(str(WORK / "student"))
    if variant != "fp32":  # teacher and starting weights hold bf16 values
        with torch.no_grad():
            for p in [*teacher.parameters(), *student.parameters()]:
                p.copy_(p.to(bf).float())
    class Rounded(torch.optim.Optimizer):
        """AdamW whose weights (and, with `moments`, its moments) are rounded to bf16 values after each step."""

        def __init__(self, inner, moments: bool):
            self.inner, self.moments = inner, moments
            self.param_groups, self.state, self.defaults = inner.param_groups, inner.state, inner.defaults

        @torch.no_grad()
        def step(self, closure=None):
            self.inner.step()
            for group in self.param_groups:
                for p in group["params"]:
                    p.copy_(p.to(bf).float())
                    if self.moments:
                        for key in ("exp_avg", "exp_avg_sq"):
                            self.state[p][key].copy_(self.state[p][key].to(bf).float())

        def zero_grad(self, set_to_none=True):
            self.inner.zero_grad(set_to_none=set_to_none)

    if variant in ("bf16-fp32state", "bf16"):  # plain AdamW whose update lands on bf16 values
        rec.make_optimizer = lambda params, cfg: Rounded(torch.optim.AdamW(params, lr=cfg.lr), variant == "bf16")
    data = load_data(WORK / "data.pt")
    ids, held = data["recovery"][: tokens // 128], data["heldout"]
    start = time.perf_counter()
    r = rec.recover(student, teacher, ids, torch.ones_like(ids), RecoveryConfig(tokens=tokens, batch_size=4, lr=LR),
                    REMOVED, heldout_ids=held, heldout_mask=torch.ones_like(held))
    return {"tokens": r.tokens, "lr": LR, "loss_before": r.loss_before, "loss_after": r.loss_after,
            "seconds": time.perf_counter() - start, "aborted": r.aborted}


def child(unit: str) -> None:
    kind, variant, *rest = unit.split(":")
    result = state(variant) if kind == "state" else train(variant, int(rest[0]))
    print(json.dumps({"unit": unit, **result}))


def main() -> None:
    args = parse_args()
    common.apply_threads(args.threads)
    if args.child:
        return child(args.child)
    path = common.result_path("dtypes")
    saved = json.loads(path.read_text()) if path.exists() else {"units": {}}
    prepare()
    todo = args.only.split(",") if args.only else [u for u in UNITS if u not in saved["units"]]
    for unit in todo:
        out = subprocess.run([sys.executable, __file__, "--child", unit, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        saved["units"][unit] = json.loads(out.stdout.strip().splitlines()[-1])
        saved["machine"] = common.machine_info()
        common.write_json("dtypes", saved)
        print(unit, saved["units"][unit])


if __name__ == "__main__":
    main()
