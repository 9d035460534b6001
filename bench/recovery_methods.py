"""Recovery methods side by side: none / reconstruct / kd / reconstruct+kd on SmolLM2.

Removes the same blocks once, then heals fresh copies of that pruned model with each
method on the same calibration windows (wikitext-2 valid) and measures, on disjoint
held-out windows: relative error of the final hidden states vs the dense model, the KD
loss, the perplexity, plus seconds and peak memory of the recovery call.

    .venv/bin/python bench/recovery_methods.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math

import common

METHODS = ("none", "reconstruct", "kd", "reconstruct+kd")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--removed", default="20", help="original block indices to remove, comma-separated")
    p.add_argument("--tokens", type=int, default=None, help="recovery tokens per method (default by size)")
    return p.parse_args()


def sizes(quick: bool) -> dict:
    """Calibration / held-out windows (128 tokens each) and the KD budget."""
    if quick:
        return dict(calib=4, heldout=2, tokens=256)
    return dict(calib=16, heldout=8, tokens=2048)


def heldout_perplexity(model, ids) -> float:
    """exp(mean next-token loss) on the held-out windows (no padding in them)."""
    import torch

    with torch.no_grad():
        return math.exp(float(model(input_ids=ids, labels=ids).loss))


def run_method(method: str, teacher, pruned, data: dict, removed: list[int], tokens: int) -> dict:
    """Heal a fresh copy of the pruned model with `method`; measure it on held-out text."""
    import torch

    from iterabre.config import RecoveryConfig
    from iterabre.reconstruct import relative_hidden_error
    from iterabre.recovery import kd_loss_on, recover

    student, cfg = copy.deepcopy(pruned), RecoveryConfig(method=method, tokens=tokens, lr=common.TABLE_LR)
    calib, held = data["calib"], data["heldout"]
    result = recover(student, teacher, calib, torch.ones_like(calib), cfg, removed)
    return dict(method=method, seconds=result.seconds, peak_mem_mb=result.peak_mem_mb, tokens=result.tokens,
                rel_error=relative_hidden_error(student, teacher, held),
                kd_loss=kd_loss_on(student, teacher, held, torch.ones_like(held), cfg),
                perplexity=heldout_perplexity(student, held))


def main() -> None:
    args = parse_args()
    common.apply_threads(args.threads)
    from iterabre.data import load_documents, split_windows, token_windows
    from iterabre.models import load_model
    from iterabre.surgery import remove_blocks

    size, removed = sizes(args.quick), [int(i) for i in args.removed.split(",")]
    tokens = args.tokens or size["tokens"]
    teacher, tokenizer = load_model("smollm2-135m")
    windows = token_windows(tokenizer, load_documents("wikitext", "valid"), 128)
    data = split_windows(windows, size["calib"], 0, size["heldout"], seed=0)
    pruned = remove_blocks(copy.deepcopy(teacher), removed)
    dense = dict(method="dense (30 blocks)", rel_error=0.0, kd_loss=0.0,
                 perplexity=heldout_perplexity(teacher, data["heldout"]))
    rows = [dense] + [run_method(m, teacher, pruned, data, removed, tokens) for m in METHODS]
    columns = ["method", "rel_error", "kd_loss", "perplexity", "tokens", "seconds", "peak_mem_mb"]
    common.print_table(f"SmolLM2 without blocks {removed}: recovery methods", columns,
                       [[common.fmt(r.get(c, "")) for c in columns] for r in rows])
    common.write_json("recovery_methods" + ("-quick" if args.quick else ""),
                      dict(machine=common.machine_info(), removed=removed, sizes=size, kd_tokens=tokens,
                           rows=rows))


if __name__ == "__main__":
    main()
