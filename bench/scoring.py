"""Block scoring: the fast path (`score_blocks`), the naive reference and the streamed scorer, same data.

For each model every chosen implementation scores every block on the same calibration
windows, alternating calls. `fast` and `naive` score a model already loaded in memory;
`streamed` (`streamed_scores`) reads the model folder one block at a time inside the timed
call, so its time includes reading the weights. The table reports median times, the paired
ratios fast/naive (target <= 0.55) and streamed/fast (target <= 1.0), the largest score
difference to the fast path, and each implementation's peak memory in a fresh child process:
for fast/naive the process peak with the whole model loaded and what scoring adds to it; for
streamed what the whole call adds (no model is loaded first), beside the formula of
`iterabre.streaming.streamed_memory` (2 blocks + streams + embedding/head + one block call).

Models: SmolLM2-135M (30 blocks), a deep tiny Llama (48 blocks, hidden 256; fast vs naive only)
and a random ~1.1B Llama built from a config (TinyLlama's shape: hidden 2048, 22 blocks),
saved once in bfloat16 to a temp safetensors folder and scored in float32.

    .venv/bin/python bench/scoring.py [--quick] [--models smollm2,llama-1b] [--impls fast,streamed]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import common

MODELS = ("smollm2", "deep-tiny", "llama-1b")
IMPLS = ("fast", "naive", "streamed")
# What each model is run with unless --impls says otherwise (naive on 1B parameters would take an hour).
DEFAULT_IMPLS = {"smollm2": ("fast", "naive", "streamed"), "deep-tiny": ("fast", "naive"),
                 "llama-1b": ("fast", "streamed")}
# Deep enough for the L^2 vs L^2/2 block-forward count to show, wide enough that block
# matmuls (not Python overhead per block call) dominate each forward.
DEEP_TINY = dict(num_hidden_layers=48, hidden_size=256, intermediate_size=768, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=512)
# TinyLlama-1.1B's shape with random weights: 22 blocks of 44M parameters, 32k vocabulary, untied head.
LLAMA_1B = dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
LLAMA_1B_DIR = Path(tempfile.gettempdir()) / "iterabre-bench-llama-1b"


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--scorer", default="output", help="scorer to time (output | perplexity | ...)")
    p.add_argument("--models", default="smollm2,deep-tiny", help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--impls", default=None, help="comma list of: " + ", ".join(IMPLS) + " (default per model)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--name", default=None, help="result file name (default scoring)")
    p.add_argument("--no-memory", action="store_true", help="skip the child-process memory runs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "<model>:<impl>" memory probe
    return p.parse_args()


def sizes(model: str, quick: bool) -> dict:
    """Calibration windows x tokens, batch size and repeats per model."""
    if model == "smollm2":
        return dict(windows=2, seq_len=64, batch_size=2, repeats=1) if quick else \
            dict(windows=4, seq_len=128, batch_size=4, repeats=3)
    if model == "llama-1b":  # a few tokens: each block forward is ~44M parameters x tokens
        return dict(windows=1, seq_len=32, batch_size=1, repeats=1) if quick else \
            dict(windows=1, seq_len=64, batch_size=1, repeats=2)
    return dict(windows=2, seq_len=64, batch_size=2, repeats=2) if quick else \
        dict(windows=4, seq_len=128, batch_size=4, repeats=5)


def impls_of(model: str, args) -> tuple[str, ...]:
    """The implementations run on `model`: --impls, else its default."""
    return tuple(args.impls.split(",")) if args.impls else DEFAULT_IMPLS[model]


def _llama_config(overrides: dict):
    """A Llama config from iterabre.tiny's llama with `overrides`."""
    from transformers import AutoConfig

    from iterabre.tiny import FAMILY_CONFIGS

    kwargs = {k: v for k, v in FAMILY_CONFIGS["llama"].items() if k != "model_type"}
    return AutoConfig.for_model("llama", **{**kwargs, **overrides})


def deep_tiny_model():
    """A 48-block random Llama (hidden 256) built from iterabre.tiny's llama config."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_llama_config(DEEP_TINY), dtype=torch.float32).eval()


def llama_1b_dir() -> Path:
    """The random 1.1B Llama as a bf16 safetensors folder, made once (about 2.2 GB, a minute or two)."""
    import torch
    from transformers import AutoModelForCausalLM

    from iterabre.files import atomic_dir

    done = LLAMA_1B_DIR / "config.json"
    if not done.exists():
        print(f"building the random 1.1B Llama in {LLAMA_1B_DIR} ...", flush=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_llama_config(LLAMA_1B), dtype=torch.bfloat16)
        with atomic_dir(LLAMA_1B_DIR) as tmp:  # sharded: the streamed loader reads through the index
            model.save_pretrained(tmp, max_shard_size="500MB")
    return LLAMA_1B_DIR


def folder_of(model: str) -> Path | None:
    """The safetensors folder a model is loaded or streamed from (None: built in memory)."""
    if model == "smollm2":
        from iterabre.embedded import pull_embedded_model

        return pull_embedded_model("smollm2-135m")
    return llama_1b_dir() if model == "llama-1b" else None


def calibration(model: str, size: dict):
    """(input_ids [N, T], attention_mask [N, T]) for a bench model."""
    import torch

    if model == "smollm2":
        from transformers import AutoTokenizer

        from iterabre.data import load_documents, token_windows

        tokenizer = AutoTokenizer.from_pretrained(folder_of(model))
        ids = token_windows(tokenizer, load_documents("wikitext", "valid")[:20], size["seq_len"])[: size["windows"]]
    else:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (size["windows"], size["seq_len"]), generator=gen)
    return ids, torch.ones_like(ids)


def whole_model(model: str):
    """The whole model in memory in float32 (what fast and naive score)."""
    import torch
    from transformers import AutoModelForCausalLM

    if model == "deep-tiny":
        return deep_tiny_model()
    return AutoModelForCausalLM.from_pretrained(folder_of(model), dtype=torch.float32).eval()


def score_fn(impl: str, model: str, lm, ids, mask, scorer: str, batch_size: int):
    """A closure calling one implementation; returns its scores."""
    from iterabre.scorers import naive_scores, score_blocks, streamed_scores

    if impl == "streamed":
        folder = folder_of(model)
        return lambda: streamed_scores(folder, ids, mask, scorer=scorer, n=1, batch_size=batch_size, device="cpu")
    fn = score_blocks if impl == "fast" else naive_scores
    return lambda: fn(lm, ids, mask, scorer=scorer, n=1, batch_size=batch_size)


class _Count(logging.Handler):
    """Counts warnings from iterabre.scorers (a fallback to another path would void the comparison)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        """Keep the message."""
        self.messages.append(record.getMessage())


def ranking(scores: dict) -> list[int]:
    """Block indices from least to most important (the order pruning would use)."""
    return sorted(scores, key=lambda i: (scores[i], i))


def formula_mib(model: str, size: dict, scorer: str) -> dict:
    """`streamed_memory`'s parts (MiB) for this run, read from a meta-device shell (no weights)."""
    import torch

    from iterabre.streaming import build_shell, plan_streams, streamed_memory
    from iterabre.surgery import decoder_blocks

    from iterabre.scorers import SCORERS

    shell = build_shell(folder_of(model), torch.float32)
    rows = [min(size["batch_size"], size["windows"] - s) for s in range(0, size["windows"], size["batch_size"])]
    blocks = len(decoder_blocks(shell))
    per_row = blocks + 1 if SCORERS[scorer].kind == "resume" else 2  # streams per calibration row (n = 1)
    plan = plan_streams(shell.config, torch.device("cpu"), rows, size["seq_len"], per_row, torch.float32)
    parts = streamed_memory(shell, size["windows"] * size["seq_len"], size["seq_len"], size["batch_size"], scorer,
                            per_call=plan.per_call)
    whole = sum(p.numel() for p in {id(p): p for p in shell.parameters()}.values()) * 4
    return {**{k: v / 2**20 for k, v in parts.items()}, "whole_model": whole / 2**20, "per_call": plan.per_call}


def compare(model: str, args) -> dict:
    """Time the implementations alternating; compare their scores with the fast path's."""
    import time

    size = sizes(model, args.quick)
    if args.repeats:
        size["repeats"] = args.repeats
    impls = impls_of(model, args)
    ids, mask = calibration(model, size)
    start = time.perf_counter()
    lm = whole_model(model) if set(impls) & {"fast", "naive"} else None
    load_s = time.perf_counter() - start
    fns = {impl: score_fn(impl, model, lm, ids, mask, args.scorer, size["batch_size"]) for impl in impls}
    counter = _Count()
    logging.getLogger("iterabre.scorers").addHandler(counter)
    scores = {impl: fn() for impl, fn in fns.items()}  # doubles as the warm-up call
    times = common.alternate(fns, size["repeats"], warmup=False)
    logging.getLogger("iterabre.scorers").removeHandler(counter)
    ref = "fast" if "fast" in scores else impls[0]
    scale = max(abs(v) for v in scores[ref].values())
    out = {"sizes": size, "impls": list(impls), "num_blocks": len(scores[ref]), "load_s": load_s,
           "seconds": times, "median_s": {impl: common.median(t) for impl, t in times.items()}}
    for impl in impls:
        if impl == ref:
            continue
        diff = max(abs(scores[impl][k] - scores[ref][k]) for k in scores[ref])
        out[f"{impl}_over_{ref}"] = common.ratio_stats(times[impl], times[ref])
        out[f"{impl}_max_abs_diff"], out[f"{impl}_max_rel_diff"] = diff, diff / scale if scale else 0.0
        out[f"{impl}_same_ranking"] = ranking(scores[impl]) == ranking(scores[ref])
    if "naive" in impls and "fast" in impls:  # the keys of earlier result files
        out["ratio_fast_over_naive"] = common.ratio_stats(times["fast"], times["naive"])["paired"]
        out["ratio_stats"] = common.ratio_stats(times["fast"], times["naive"])
        out["max_abs_score_diff"] = out["naive_max_abs_diff"]
        out["same_ranking"] = out["naive_same_ranking"]
    if "streamed" in impls:
        out["formula_mib"] = formula_mib(model, size, args.scorer)
    out["scorer_warnings"] = counter.messages
    out["scores"] = {impl: {int(k): v for k, v in s.items()} for impl, s in scores.items()}
    return out


def child(spec: str, args) -> None:
    """Memory probe: prepare, reset the peak-RSS mark, score once, read the peak; print as JSON.

    fast / naive load the whole model before the reset (their peak_mb includes it); streamed
    loads nothing first: its weights are read inside the measured call.
    """
    model, impl = spec.split(":")
    size = sizes(model, args.quick)
    ids, mask = calibration(model, size)
    if impl == "streamed":  # import the model's code before the mark, as loading it does for fast / naive
        import torch

        from iterabre.streaming import build_shell

        build_shell(folder_of(model), torch.float32)
    lm = None if impl == "streamed" else whole_model(model)
    common.emit_child_result(common.peak_of(score_fn(impl, model, lm, ids, mask, args.scorer, size["batch_size"])))


def memory(model: str, args) -> dict:
    """Peak RSS of each implementation, each in its own fresh process."""
    extra = ["--scorer", args.scorer] + (["--quick"] if args.quick else []) + \
        (["--threads", str(args.threads)] if args.threads else [])
    children = {impl: f"{model}:{impl}" for impl in impls_of(model, args)}
    return common.child_memory(Path(__file__), children, extra, "scoring_mb")


def table_rows(results: dict) -> tuple[list[str], list[list]]:
    """Columns and rows of the printed table: one row per model and implementation."""
    rows = []
    for model, r in results.items():
        ref = "fast" if "fast" in r["median_s"] else r["impls"][0]
        mem, formula = r.get("memory", {}), r.get("formula_mib", {})
        for impl in r["impls"]:
            stats = r.get(f"{impl}_over_{ref}", {})
            rows.append([model, impl, r["num_blocks"], f"{r['sizes']['windows']}x{r['sizes']['seq_len']}",
                         r["median_s"][impl], stats.get("paired"), r.get(f"{impl}_max_abs_diff"),
                         mem.get(impl, {}).get("peak_mb"), mem.get(impl, {}).get("scoring_mb"),
                         formula.get("total") if impl == "streamed" else None])
    return ["model", "impl", "blocks", "tokens", "median s", "ratio to fast (paired)", "max |diff| to fast",
            "peak MiB", "+MiB scoring", "formula MiB"], rows


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
    columns, rows = table_rows(results)
    common.print_table(f"scorer={args.scorer}: score_blocks (fast) vs naive_scores vs streamed_scores", columns, rows)
    name = args.name or ("scoring-quick" if args.quick else "scoring")
    path = common.write_json(name, {"machine": common.machine_info(), "quick": args.quick, "scorer": args.scorer,
                                    "target": "fast/naive <= 0.55; streamed/fast <= 1.0, streamed +MiB <= formula",
                                    "deep_tiny_config": DEEP_TINY, "llama_1b_config": LLAMA_1B,
                                    "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
