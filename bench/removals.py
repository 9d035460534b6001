"""How far each recipe's removal moves the model's output before any recovery, beside what recovery reached.

For every seed file of the equal-compute sets (bench/results/quality-equal-{6,8,10}b-seedK.json)
and every recipe in it, the blocks that run removed are taken out of the base model together and
scored by the IteRABRe criterion: 1 - cosine similarity of the final hidden states with and without
them (`iterabre.scorers.cosine_distance_terms`, the output scorer's term), on that run's own
calibration windows (same seed, same size). The rendered table sets it beside the run's wikitext
perplexity after recovery: whether a removal's distance before recovery ranks removals the way
recovery does, and so whether one criterion could choose between a contiguous run and a scattered
set. No training: six minutes for the 11 seed files of BENCHMARKS §5 on 2 cores.

    .venv/bin/python bench/removals.py [--sets quality-equal-6b,...] [--recipes ...]
"""

from __future__ import annotations

import argparse
import tempfile

import common
from quality import DEFAULT_RECIPE, recipe
from render import DEPTH_RECIPES, EQUAL_DEPTHS, seed_files

RECIPES = (DEFAULT_RECIPE, *DEPTH_RECIPES)  # the depth table's recipes (BENCHMARKS §5)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--sets", default=",".join(EQUAL_DEPTHS), help="comma list of equal-compute seed sets")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma list of recipes whose removals to score")
    p.add_argument("--name", default="removals", help="result file name (default removals)")
    return p.parse_args()


def calibration_tokens(name: str, s: dict) -> int:
    """How many wikitext calibration tokens recipe `name` scored on in a run with settings `s`."""
    overrides = recipe(name)[1]
    if overrides.get("calibration", "wikitext") != "wikitext":
        raise SystemExit(f"{name} scored on {overrides['calibration']} text, which this script does not regenerate: "
                         f"leave it out of --recipes")
    return overrides.get("calibration_tokens", s["calib_tokens"])


def calibration(s: dict, tokens: int, model_dir) -> "torch.Tensor":
    """The calibration windows [N, T] of `tokens` tokens a run with settings `s` scored on (prepare_data, same seed)."""
    from iterabre.config import CompressConfig
    from iterabre.steps import load_data, prepare_data

    cfg = CompressConfig(model=s["model"], seed=s["seed"], calibration_tokens=tokens, seq_len=s["seq_len"])
    with tempfile.TemporaryDirectory() as tmp:  # calibration does not depend on the recovery budget (split_windows)
        return load_data(prepare_data(cfg, model_dir, tmp, [0]))["calib"]


def final_states(model, ids) -> "torch.Tensor":
    """Final hidden states [N, T, d] of the model as it is (blocks_skipped may have taken some out); ids [N, T]."""
    import torch

    with torch.inference_mode():
        return model.base_model(input_ids=ids).last_hidden_state


def output_distance(model, ids, removed: list[int], dense=None) -> float:
    """Mean over tokens of 1 - cos(final hidden state without `removed`, with every block); ids [N, T].
    `dense`: final_states(model, ids) when already computed (every removal on the same windows shares it)."""
    import torch

    from iterabre.scorers import cosine_distance_terms
    from iterabre.surgery import blocks_skipped

    mask = torch.ones_like(ids)  # windows are full slices of one token stream
    dense = final_states(model, ids) if dense is None else dense
    with blocks_skipped(model, removed):  # base model: original index == position
        pruned = final_states(model, ids)
    total, count = cosine_distance_terms(pruned, dense, mask)
    return total / count


def main() -> None:
    args = parse_args()
    common.apply_threads(args.threads)
    from iterabre.models import load_model, model_folder

    recipes = args.recipes.split(",")
    for r in recipes:  # a bad recipe stops here, before any compute
        calibration_tokens(r, {"calib_tokens": 0})
    rows, models = [], {}
    for set_name in args.sets.split(","):
        for d in seed_files(set_name):
            s, windows = d["settings"], {}  # calibration tokens -> (ids [N, T], dense final states), per seed file
            if s["model"] not in models:
                models[s["model"]] = load_model(s["model"])[0].eval()
            for r in recipes:
                unit = d["units"].get(r)
                if not unit or not unit.get("removed"):  # not run on this seed, or its scoring used the budget
                    continue
                tokens = calibration_tokens(r, s)
                model = models[s["model"]]
                if tokens not in windows:
                    ids = calibration(s, tokens, model_folder(s["model"]))
                    windows[tokens] = ids, final_states(model, ids)
                ids, dense = windows[tokens]
                distance = output_distance(model, ids, unit["removed"], dense=dense)
                rows.append({"set": set_name, "blocks": s["blocks"], "seed": s["seed"], "recipe": r,
                             "removed": unit["removed"], "output_distance": distance})
                print(f"{set_name} seed {s['seed']} {r}: {distance:.4f}", flush=True)
    common.write_json(args.name, {"machine": common.machine_info(),
                                  "settings": {"sets": args.sets.split(","), "recipes": recipes}, "rows": rows})


if __name__ == "__main__":
    main()
