"""Inference speed of the pruned SmolLM2 (24 blocks) vs the 30-block base, in one run.

Forward throughput on a batch of real wikitext windows and greedy KV-cache generation
throughput are timed for both models, alternating, and reported as the speed-up ratio
against the ideal 30/24 = 1.25 (all compute in the blocks) and against a matmul-count
ideal that also counts the LM head, which block removal does not shrink.

    .venv/bin/python bench/pruned_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import copy

import common

REMOVED = [20, 21, 22, 23, 24, 25]  # a fixed late run: speed does not depend on which blocks go


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=None)
    return p.parse_args()


def sizes(quick: bool) -> dict:
    """Batch / sequence / generation sizes and repeat count."""
    if quick:
        return dict(batch=4, seq_len=128, prompt=32, new_tokens=16, repeats=3)
    return dict(batch=4, seq_len=256, prompt=32, new_tokens=64, repeats=7)


def matmul_params(model) -> int:
    """Weights used in a matmul per token: every Linear incl. the LM head (embedding lookups are free)."""
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def make_inputs(tokenizer, size: dict):
    """Forward batch [B,T] and generation prompt [1,P] cut from wikitext valid."""
    from iterabre.data import load_documents, token_windows

    windows = token_windows(tokenizer, load_documents("wikitext", "valid")[:40], size["seq_len"])
    return windows[: size["batch"]], windows[size["batch"], : size["prompt"]].unsqueeze(0)


def forward_fn(model, ids):
    """A closure running one no-cache forward pass of ids [B,T]."""
    import torch

    mask = torch.ones_like(ids)

    def run():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return run


def generate_fn(model, prompt, new_tokens: int):
    """A closure generating exactly `new_tokens` greedy tokens with the KV cache."""
    import torch

    mask = torch.ones_like(prompt)

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        assert out.shape[1] == prompt.shape[1] + new_tokens  # a short run would inflate tokens/s
    return run


def measure(base, pruned, ids, prompt, size: dict) -> dict:
    """Median seconds per call for forward and generation, both models alternating."""
    fwd = common.alternate({"base": forward_fn(base, ids), "pruned": forward_fn(pruned, ids)}, size["repeats"])
    gen = common.alternate({"base": generate_fn(base, prompt, size["new_tokens"]),
                            "pruned": generate_fn(pruned, prompt, size["new_tokens"])}, size["repeats"])
    return {"forward": fwd, "generate": gen}


def summarise(times: dict, size: dict, n_base: int, n_pruned: int, flop_ideal: float) -> dict:
    """Tokens/s per model and the speed-up (paired median of base/pruned time) vs the ideals."""
    tokens = {"forward": size["batch"] * size["seq_len"], "generate": size["new_tokens"]}
    rows = {}
    for kind, per_model in times.items():
        med = {m: common.median(v) for m, v in per_model.items()}
        stats = common.ratio_stats(per_model["base"], per_model["pruned"])
        speedup = stats["paired"]
        rows[kind] = {"tokens_per_call": tokens[kind], "seconds": per_model,
                      "base_tokens_per_s": tokens[kind] / med["base"],
                      "pruned_tokens_per_s": tokens[kind] / med["pruned"],
                      "speedup": speedup, "speedup_stats": stats,
                      "fraction_of_block_ideal": speedup / (n_base / n_pruned),
                      "fraction_of_matmul_ideal": speedup / flop_ideal}
    return rows


def main() -> None:
    """Load, prune a copy, time both, print and save."""
    args = parse_args()
    common.apply_threads(args.threads)
    size = sizes(args.quick)
    if args.repeats:
        size["repeats"] = args.repeats
    from iterabre.models import load_model
    from iterabre.surgery import num_blocks, remove_blocks

    base, tokenizer = load_model(args.model)
    pruned = remove_blocks(copy.deepcopy(base), REMOVED)
    n_base, n_pruned = num_blocks(base), num_blocks(pruned)
    flop_ideal = matmul_params(base) / matmul_params(pruned)
    ids, prompt = make_inputs(tokenizer, size)
    rows = summarise(measure(base, pruned, ids, prompt, size), size, n_base, n_pruned, flop_ideal)
    table = [[kind, r["base_tokens_per_s"], r["pruned_tokens_per_s"], r["speedup"],
              r["speedup_stats"]["best"], n_base / n_pruned, r["fraction_of_block_ideal"], flop_ideal,
              r["fraction_of_matmul_ideal"]] for kind, r in rows.items()]
    common.print_table(f"{args.model}: {n_base} vs {n_pruned} blocks (removed {REMOVED})",
                       ["pass", "base tok/s", "pruned tok/s", "speed-up", "speed-up (min t)", "ideal (blocks)",
                        "of ideal", "ideal (matmuls)", "of matmul ideal"], table)
    path = common.write_json("pruned_speed", {
        "machine": common.machine_info(), "quick": args.quick, "model": args.model, "sizes": size,
        "removed": REMOVED, "base_blocks": n_base, "pruned_blocks": n_pruned,
        "block_ideal": n_base / n_pruned, "matmul_ideal": flop_ideal, "results": rows,
        "target": "speed-up >= 0.9 x 30/24"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
