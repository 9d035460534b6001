"""Fast block scoring (`score_blocks`) vs the naive reference (`naive_scores`), same data, one run.

For each model (SmolLM2-135M and a deep tiny Llama where block compute dominates) both
implementations score every block on the same calibration windows, alternating calls;
the table reports the median time ratio fast/naive (target <= 0.55), the largest score
difference (they should agree to float noise), and each one's peak memory, measured as
max RSS in a fresh child process per implementation.

    .venv/bin/python bench/scoring.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import common

MODELS = ("smollm2", "deep-tiny")
IMPLS = ("fast", "naive")
# Deep enough for the L^2 vs L^2/2 block-forward count to show, wide enough that block
# matmuls (not Python overhead per block call) dominate each forward.
DEEP_TINY = dict(num_hidden_layers=48, hidden_size=256, intermediate_size=768, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=512)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--scorer", default="output", help="scorer to time (output | perplexity | ...)")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the child-process memory runs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "<model>:<impl>" memory probe
    return p.parse_args()


def sizes(model: str, quick: bool) -> dict:
    """Calibration windows x tokens, batch size and repeats per model."""
    if model == "smollm2":
        return dict(windows=2, seq_len=64, batch_size=2, repeats=1) if quick else \
            dict(windows=4, seq_len=128, batch_size=4, repeats=3)
    return dict(windows=2, seq_len=64, batch_size=2, repeats=2) if quick else \
        dict(windows=4, seq_len=128, batch_size=4, repeats=5)


def deep_tiny_model():
    """A 48-block random Llama (hidden 256) built from iterabre.tiny's llama config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from iterabre.tiny import FAMILY_CONFIGS

    kwargs = {k: v for k, v in FAMILY_CONFIGS["llama"].items() if k != "model_type"}
    config = AutoConfig.for_model("llama", **{**kwargs, **DEEP_TINY})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def load(model: str, size: dict):
    """(model, input_ids [N,T], attention_mask [N,T]) for a bench model."""
    import torch

    if model == "smollm2":
        from iterabre.data import load_documents, token_windows
        from iterabre.models import load_model

        lm, tokenizer = load_model("smollm2-135m")
        ids = token_windows(tokenizer, load_documents("wikitext", "valid")[:20], size["seq_len"])[: size["windows"]]
    else:
        lm = deep_tiny_model()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (size["windows"], size["seq_len"]), generator=gen)
    return lm, ids, torch.ones_like(ids)


def score_fn(impl: str, lm, ids, mask, scorer: str, batch_size: int):
    """A closure calling one implementation; returns its scores."""
    from iterabre.scorers import naive_scores, score_blocks

    fn = score_blocks if impl == "fast" else naive_scores
    return lambda: fn(lm, ids, mask, scorer=scorer, n=1, batch_size=batch_size)


class _Count(logging.Handler):
    """Counts warnings from iterabre.scorers (a fallback to naive scoring would void the comparison)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        """Keep the message."""
        self.messages.append(record.getMessage())


def ranking(scores: dict) -> list[int]:
    """Block indices from least to most important (the order pruning would use)."""
    return sorted(scores, key=lambda i: (scores[i], i))


def compare(model: str, args) -> dict:
    """Time both implementations alternating; compare their scores."""
    size = sizes(model, args.quick)
    if args.repeats:
        size["repeats"] = args.repeats
    lm, ids, mask = load(model, size)
    fns = {impl: score_fn(impl, lm, ids, mask, args.scorer, size["batch_size"]) for impl in IMPLS}
    counter = _Count()
    logging.getLogger("iterabre.scorers").addHandler(counter)
    scores = {impl: fn() for impl, fn in fns.items()}  # doubles as the warm-up call
    times = common.alternate(fns, size["repeats"], warmup=False)
    logging.getLogger("iterabre.scorers").removeHandler(counter)
    diff = max(abs(scores["fast"][k] - scores["naive"][k]) for k in scores["naive"])
    scale = max(abs(v) for v in scores["naive"].values())
    med = {impl: common.median(t) for impl, t in times.items()}
    stats = common.ratio_stats(times["fast"], times["naive"])
    return {"sizes": size, "num_blocks": len(scores["naive"]), "seconds": times, "median_s": med,
            "ratio_fast_over_naive": stats["paired"], "ratio_stats": stats,
            "max_abs_score_diff": diff, "max_rel_score_diff": diff / scale if scale else 0.0,
            "same_ranking": ranking(scores["fast"]) == ranking(scores["naive"]),
            "scorer_warnings": counter.messages,
            "scores": {impl: {int(k): v for k, v in s.items()} for impl, s in scores.items()}}


def child(spec: str, args) -> None:
    """Memory probe: load, reset the peak-RSS mark, score once, read the peak; print as JSON."""
    model, impl = spec.split(":")
    size = sizes(model, args.quick)
    lm, ids, mask = load(model, size)
    # the peak mark is reset after loading: the peak is then the scoring call's own
    common.emit_child_result(common.peak_of(score_fn(impl, lm, ids, mask, args.scorer, size["batch_size"])))


def memory(model: str, args) -> dict:
    """Peak RSS of each implementation, each in its own fresh process."""
    extra = ["--scorer", args.scorer] + (["--quick"] if args.quick else []) + \
        (["--threads", str(args.threads)] if args.threads else [])
    children = {impl: f"{model}:{impl}" for impl in IMPLS}
    return common.child_memory(Path(__file__), children, extra, "scoring_mb")


def main() -> None:
    """Run every model, print the table, write the JSON."""
    args = parse_args()
    common.apply_threads(args.threads)
    if args.child:
        return child(args.child, args)
    results = {}
    for model in args.models.split(","):
        results[model] = compare(model, args)
        if not args.no_memory:
            results[model]["memory"] = memory(model, args)
    rows = []
    for model, r in results.items():
        mem = r.get("memory", {})
        rows.append([model, r["num_blocks"], f"{r['sizes']['windows']}x{r['sizes']['seq_len']}",
                     r["median_s"]["fast"], r["median_s"]["naive"], r["ratio_fast_over_naive"],
                     r["max_abs_score_diff"], "yes" if r["same_ranking"] else "NO",
                     mem.get("fast", {}).get("peak_mb"), mem.get("naive", {}).get("peak_mb"),
                     mem.get("fast", {}).get("scoring_mb"), mem.get("naive", {}).get("scoring_mb")])
    common.print_table(f"scorer={args.scorer}: score_blocks (fast) vs naive_scores",
                       ["model", "blocks", "tokens", "fast s", "naive s", "fast/naive", "max |diff|",
                        "same rank", "fast peak MiB", "naive peak MiB", "fast +MiB", "naive +MiB"], rows)
    path = common.write_json("scoring", {"machine": common.machine_info(), "quick": args.quick,
                                         "scorer": args.scorer, "target": "fast/naive <= 0.55",
                                         "deep_tiny_config": DEEP_TINY, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
