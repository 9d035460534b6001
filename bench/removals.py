"""How far each recipe's removal moves the model's output before any recovery, beside what recovery reached.

For every seed file of the equal-compute sets (bench/results/quality-equal-{6,8,10}b-seedK.json)
and every recipe in it, the blocks that run removed are taken out of the base model together and
scored by the IteRABRe criterion: 1 - cosine similarity of the final hidden states with and without
them (`iterabre.scorers.set_distances`, what `--scorer select` compares), on that run's own
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


def main() -> None:
    args = parse_args()
    common.apply_threads(args.threads)
    import torch

    from iterabre.models import load_model, model_folder
    from iterabre.scorers import set_distances

    recipes = args.recipes.split(",")
    for r in recipes:  # a bad recipe stops here, before any compute
        calibration_tokens(r, {"calib_tokens": 0})
    rows, models = [], {}
    for set_name in args.sets.split(","):
        for d in seed_files(set_name):
            s, by_size = d["settings"], {}  # calibration tokens -> {recipe: removed}, per seed file
            if s["model"] not in models:
                models[s["model"]] = load_model(s["model"])[0].eval()
            for r in recipes:
                unit = d["units"].get(r)
                if unit and unit.get("removed"):  # run on this seed, and its scoring left budget for a removal
                    by_size.setdefault(calibration_tokens(r, s), {})[r] = unit["removed"]
            for tokens, sets in by_size.items():  # every removal scored on the same windows in one pass
                ids = calibration(s, tokens, model_folder(s["model"]))
                distances = set_distances(models[s["model"]], ids, torch.ones_like(ids), sets, device="cpu")
                for r, removed in sets.items():
                    rows.append({"set": set_name, "blocks": s["blocks"], "seed": s["seed"], "recipe": r,
                                 "removed": removed, "output_distance": distances[r]})
                    print(f"{set_name} seed {s['seed']} {r}: {distances[r]:.4f}", flush=True)
    common.write_json(args.name, {"machine": common.machine_info(),
                                  "settings": {"sets": args.sets.split(","), "recipes": recipes}, "rows": rows})


if __name__ == "__main__":
    main()
