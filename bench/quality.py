"""Quality table on SmolLM2-135M: IteRABRe vs one-shot and SLEB-style baselines, same recovery budget.

Every method removes `--blocks` blocks from the 30-block base and gets the same total
recovery budget (`--budget` tokens of KD from the base model, the library's default
RecoveryConfig otherwise), on the same calibration / recovery / held-out windows that
`iterabre.steps.prepare_data` cuts for a compression job:

    iterabre        output scorer, iterative (1 block per step), KD after every step (budget split equally)
    block-influence ShortGPT: one-shot, lowest 1 - cos(block input, block output); then KD
    angular         Gromov et al.: one-shot contiguous run with the lowest angular distance; then KD
    perplexity      SLEB-style: iterative, re-scored after each removal, no training in between; then KD
    output          output scorer, iterative, no recovery (the IteRABRe schedule without healing)

plus a no-recovery row for every scorer. Each model gets the same lm-eval evaluation
(wikitext word perplexity, BLiMP, XCOPA; `--eval` per-task limits) and a cheaper "curve"
evaluation at every block count the method passes through, for the plot
docs/quality_vs_blocks.png. Units of work are saved to bench/results/quality.json as they
finish; a rerun with the same settings skips finished units (use --fresh to redo them).

    .venv/bin/python bench/quality.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import common

# name -> (scorer, schedule, recover_between_steps, label)
METHODS = {
    "iterabre": ("output", "iterative", True, "IteRABRe (output, iterative, KD each step)"),
    "block-influence": ("block-influence", "one-shot", False, "ShortGPT block-influence, one-shot"),
    "angular": ("angular", "one-shot", False, "angular distance, one-shot contiguous"),
    "perplexity": ("perplexity", "iterative", False, "SLEB-style perplexity, iterative"),
    "output": ("output", "iterative", False, "output scorer, iterative"),
}
KD_AFTER = ("block-influence", "angular", "perplexity")  # baselines that also get a "+ KD" row
XCOPA_LANGS = ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")
PLOT = common.REPO / "docs" / "quality_vs_blocks.png"


def parse_args() -> argparse.Namespace:
    """Command-line options; --quick shrinks everything for a smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", type=int, default=None, help="blocks to remove (default 6; quick 2)")
    p.add_argument("--budget", type=int, default=None, help="total recovery tokens per method (default 24576)")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens for scoring (default 1024)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 128)")
    p.add_argument("--eval", default=None, help="final eval limits per task (default wikitext=3,blimp=10,xcopa=20)")
    p.add_argument("--curve-eval", default=None, help="per-point eval limits (default wikitext=2)")
    p.add_argument("--oneshot-ks", default=None, help="extra block counts for one-shot curves (default 2,4)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (CUDA: KD runs in bf16 autocast)")
    p.add_argument("--kd-batch-size", type=int, default=None, help="KD micro-batch (default: RecoveryConfig's)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    p.add_argument("--fresh", action="store_true", help="ignore finished units in the result file")
    p.add_argument("--name", default=None, help="result file name (default quality, quick: quality-quick)")
    p.add_argument("--report-only", action="store_true", help="print tables and redraw the plot from the JSON")
    return p.parse_args()


def settings(args) -> dict:
    """Everything that changes the numbers; a result file is resumed only when these match."""
    quick = args.quick
    pick = lambda value, full, small: value if value is not None else (small if quick else full)  # noqa: E731
    blocks = pick(args.blocks, 6, 2)
    ks = pick(args.oneshot_ks, "2,4", "1")
    return {"model": args.model, "blocks": blocks, "budget": pick(args.budget, 24576, 1024),
            "calib_tokens": pick(args.calib_tokens, 1024, 128), "seq_len": pick(args.seq_len, 128, 64),
            "eval": parse_limits(pick(args.eval, "wikitext=3,blimp=10,xcopa=20", "wikitext=1,blimp=1,xcopa=1")),
            "curve_eval": parse_limits(pick(args.curve_eval, "wikitext=2", "blimp=1")),
            "oneshot_ks": sorted({int(k) for k in ks.split(",") if k and int(k) < blocks} | {blocks}),
            "seed": 0, **optional_settings(args)}


def optional_settings(args) -> dict:
    """Settings that only appear when changed, so CPU result files made before they existed still resume."""
    from iterabre.devices import resolve_device

    out = {}
    if resolve_device(args.device) != "cpu":
        out["device"] = resolve_device(args.device)
    if args.kd_batch_size:
        out["kd_batch_size"] = args.kd_batch_size
    return out


def parse_limits(text: str) -> dict[str, int]:
    """'wikitext=3,blimp=all' -> {"wikitext": 3, "blimp": None} (documents per leaf task; None = all)."""
    out = {}
    for item in text.split(","):
        task, _, limit = item.partition("=")
        out[task.strip()] = int(limit) if limit and limit != "all" else None
    return out


# ---------------------------------------------------------------- data, evaluation

def prepare(s: dict, work: Path):
    """(base model, tokenizer, data dict) with the flow's own data split."""
    from iterabre import planning, steps
    from iterabre.config import CompressConfig
    from iterabre.embedded import pull_embedded_model
    from iterabre.models import load_model

    base, tokenizer = load_model(s["model"], device=s.get("device", "cpu"))
    cfg = CompressConfig(model=s["model"], calibration_tokens=s["calib_tokens"], seq_len=s["seq_len"],
                         seed=s["seed"], target_layers=1)
    budgets = planning.step_budgets(s["budget"], s["blocks"])
    data = steps.load_data(steps.prepare_data(cfg, pull_embedded_model(s["model"]), work, budgets))
    return base, tokenizer, data


def evaluate(model, tokenizer, limits: dict, batch_size: int = 32) -> dict:
    """lm-eval metrics per task, each task with its own document limit, on the model's device.

    Batch 32: BLiMP / XCOPA requests are 10-40 tokens, and batches of 8 leave the CPU matmuls too
    small (docs/EVALUATION.md); the numbers do not depend on it beyond float rounding.
    """
    from iterabre.evaluation import evaluate as run_eval

    device = str(next(model.parameters()).device)
    out = {}
    for task, limit in limits.items():
        out.update(run_eval(model, tokenizer, task, limit=limit, batch_size=batch_size, device=device))
    return out


def headline(ev: dict) -> dict:
    """The table's numbers from an evaluation: perplexity, accuracies, stderrs, average."""
    get = lambda task, metric: ev.get(task, {}).get(metric)  # noqa: E731
    row = {"wikitext_word_ppl": get("wikitext", "word_perplexity"),
           "blimp_acc": get("blimp", "acc"), "blimp_stderr": get("blimp", "acc_stderr"),
           "xcopa_acc": get("xcopa", "acc"), "xcopa_stderr": get("xcopa", "acc_stderr")}
    accs = [row["blimp_acc"], row["xcopa_acc"]]
    row["avg_acc"] = sum(accs) / 2 if None not in accs else None
    row["xcopa_langs"] = {lang: [get(f"xcopa_{lang}", "acc"), get(f"xcopa_{lang}", "acc_stderr")]
                          for lang in XCOPA_LANGS if f"xcopa_{lang}" in ev}
    return row


# ---------------------------------------------------------------- pruning and recovery

def ones(ids):
    """All-ones attention mask: windows are full slices of one token stream."""
    import torch

    return torch.ones_like(ids)


def scores_for(model, data: dict, scorer: str, n: int = 1):
    """Block scores (original index -> importance) on the calibration windows."""
    from iterabre.scorers import score_blocks

    calib = data["calib"]
    return score_blocks(model, calib, ones(calib), scorer=scorer, n=n, batch_size=4)


def heal(student, teacher, data: dict, removed: list[int], tokens: int, window: tuple[int, int], s: dict) -> dict:
    """KD recovery with the library defaults and `tokens` budget on one slice of the recovery windows."""
    from iterabre.config import RecoveryConfig
    from iterabre.recovery import recover

    cfg = dataclasses.replace(RecoveryConfig(), tokens=tokens)
    if s.get("kd_batch_size"):
        cfg.batch_size = s["kd_batch_size"]
    ids, held = data["recovery"][window[0]:window[1]], data["heldout"]
    res = recover(student, teacher, ids, ones(ids), cfg, removed=removed, heldout_ids=held, heldout_mask=ones(held),
                  device=s.get("device", "cpu"))
    keep = ("loss_before", "loss_after", "tokens", "steps", "seconds", "tokens_per_s", "aborted", "reason",
            "peak_mem_mb")
    return {k: getattr(res, k) for k in keep}


def iterative(name: str, base, tokenizer, data: dict, s: dict, curve: list) -> tuple:
    """Remove one block per step, re-scoring each time; KD between steps for IteRABRe."""
    from iterabre import planning, steps
    from iterabre.surgery import remove_blocks

    scorer, _, heal_between, _ = METHODS[name]
    model, removed, recoveries = copy.deepcopy(base), [], []
    budgets = planning.step_budgets(s["budget"], s["blocks"])
    ranges = planning.recovery_ranges(budgets, s["seq_len"])
    for step in range(s["blocks"]):
        scores = scores_for(model, data, scorer)
        remove = planning.plan_removal(scores, 1, scorer, scores.order)
        remove_blocks(model, remove)
        removed += remove
        if heal_between:
            recoveries.append(heal(model, base, data, remove, budgets[step], ranges[step], s))
        curve.append({"blocks_removed": step + 1, "removed": list(removed),
                      **headline(evaluate(model, tokenizer, s["curve_eval"]))})
    return model, removed, recoveries


def one_shot(name: str, base, tokenizer, data: dict, s: dict, curve: list) -> tuple:
    """Score the base once (runs of k blocks for angular) and remove the k lowest, for each k."""
    from iterabre import planning, steps
    from iterabre.surgery import remove_blocks

    scorer = METHODS[name][0]
    plain = None if scorer == "angular" else scores_for(base, data, scorer)
    for k in s["oneshot_ks"]:
        scores = scores_for(base, data, scorer, n=k) if scorer == "angular" else plain
        removed = planning.plan_removal(scores, k, scorer, scores.order)
        model = remove_blocks(copy.deepcopy(base), removed)
        curve.append({"blocks_removed": k, "removed": list(removed),
                      **headline(evaluate(model, tokenizer, s["curve_eval"]))})
    return model, removed, []


# ---------------------------------------------------------------- units of work

def unit_base(base, tokenizer, data, s) -> dict:
    """The unpruned model: final and curve evaluation."""
    ev = evaluate(base, tokenizer, s["eval"])
    curve = [{"blocks_removed": 0, "removed": [], **headline(evaluate(base, tokenizer, s["curve_eval"]))}]
    return {"label": "base (30 blocks)", "removed": [], "eval": ev, **headline(ev), "curve": curve}


def unit_method(name: str, base, tokenizer, data, s) -> dict:
    """Prune with one method (healing between steps for IteRABRe), then evaluate the result."""
    curve: list = []
    run = iterative if METHODS[name][1] == "iterative" else one_shot
    model, removed, recoveries = run(name, base, tokenizer, data, s, curve)
    ev = evaluate(model, tokenizer, s["eval"])
    tokens = sum(r["tokens"] for r in recoveries)
    return {"label": METHODS[name][3], "removed": removed, "recovery": recoveries, "recovery_tokens": tokens,
            "eval": ev, **headline(ev), "curve": curve}


def unit_kd(name: str, done: dict, base, tokenizer, data, s) -> dict:
    """A baseline's pruned model (same removed blocks) healed with the whole budget at once."""
    from iterabre.surgery import remove_blocks

    removed = done[name]["removed"]
    model = remove_blocks(copy.deepcopy(base), removed)
    window = (0, math.ceil(s["budget"] / s["seq_len"]))
    recovery = heal(model, base, data, removed, s["budget"], window, s)
    ev = evaluate(model, tokenizer, s["eval"])
    curve = [{"blocks_removed": len(removed), "removed": removed,
              **headline(evaluate(model, tokenizer, s["curve_eval"]))}]
    return {"label": f"{METHODS[name][3]} + KD", "removed": removed, "recovery": [recovery],
            "recovery_tokens": recovery["tokens"], "eval": ev, **headline(ev), "curve": curve}


def plan_units(methods: list[str]) -> list[tuple[str, str]]:
    """(unit id, method) in run order: base, IteRABRe, then each baseline and its + KD row."""
    units = [("base", "base")]
    for m in methods:
        units.append((m, m))
        if m in KD_AFTER:
            units.append((f"{m}+kd", m))
    return units


def run_unit(unit: str, method: str, done: dict, base, tokenizer, data, s) -> dict:
    """Dispatch one unit and time it."""
    start = time.perf_counter()
    if unit == "base":
        out = unit_base(base, tokenizer, data, s)
    elif unit.endswith("+kd"):
        out = unit_kd(method, done, base, tokenizer, data, s)
    else:
        out = unit_method(method, base, tokenizer, data, s)
    return {**out, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- output

def table_rows(units: dict) -> list[list]:
    """One row per finished unit: method, blocks, recovery tokens, metrics, wall time."""
    rows = []
    for uid, u in units.items():
        xs = u.get("xcopa_stderr")
        rows.append([uid, len(u["removed"]), u.get("recovery_tokens", 0), u["wikitext_word_ppl"],
                     _pm(u["blimp_acc"], u["blimp_stderr"]), _pm(u["xcopa_acc"], xs), u["avg_acc"],
                     ",".join(map(str, u["removed"])), u["seconds"] / 60])
    return rows


def _pm(value, stderr) -> str:
    """'0.712 ± 0.014' (or '' when missing)."""
    if value is None:
        return ""
    return f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}"


def lang_rows(units: dict) -> list[list]:
    """Per-language XCOPA accuracy ± stderr, one row per unit."""
    return [[uid] + [_pm(*u["xcopa_langs"][lang]) if lang in u["xcopa_langs"] else "" for lang in XCOPA_LANGS]
            for uid, u in units.items()]


def plot(units: dict, s: dict, path: Path) -> Path:
    """Word perplexity and BLiMP accuracy vs blocks removed, one line per method (curve evaluation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(k, label) for k, label in (("wikitext_word_ppl", "wikitext word perplexity (log)"),
                                           ("blimp_acc", "BLiMP accuracy"))
               if any(p.get(k) is not None for u in units.values() for p in u["curve"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    base_pt = units.get("base", {}).get("curve", [])
    for uid, u in units.items():
        if uid == "base":
            continue
        kd = uid.endswith("+kd")  # a single point: the baseline's final model after KD
        pts = u["curve"] if kd else sorted(base_pt + u["curve"], key=lambda p: p["blocks_removed"])
        style = dict(marker="*", markersize=12, linestyle="none") if kd else dict(marker="o")
        for ax, (key, _) in zip(axes[0], metrics):
            xy = [(p["blocks_removed"], p[key]) for p in pts if p.get(key) is not None]
            if xy:
                ax.plot(*zip(*xy), label=uid, **style)
    for ax, (key, label) in zip(axes[0], metrics):
        ax.set(ylabel=label, xlabel="blocks removed", yscale="log" if "ppl" in key else "linear")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{s['model']}: quality vs blocks removed\n(curve eval limits {s['curve_eval']}; "
                 f"KD budget {s['budget']} tokens per method)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def load_previous(name: str, s: dict, fresh: bool) -> dict:
    """Finished units from an earlier run with identical settings."""
    path = common.RESULTS / f"{name}.json"
    if fresh or not path.exists():
        return {}
    old = json.loads(path.read_text())
    return old.get("units", {}) if old.get("settings") == json.loads(json.dumps(s)) else {}


def save(name: str, s: dict, units: dict, pending: list[str]) -> None:
    """Write the result file after every unit, so partial runs keep what they finished."""
    common.write_json(name, {"machine": common.machine_info(), "settings": s, "units": units, "pending": pending,
                             "notes": "avg_acc = mean(BLiMP acc, XCOPA acc); limits are documents per leaf task"})


def run_all(name: str, s: dict, units: dict, plan: list[tuple[str, str]]) -> None:
    """Run every planned unit that is not finished yet, saving the result file after each."""
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as work:
        base, tokenizer, data = prepare(s, Path(work))
        for uid, method in plan:
            if uid in units:
                print(f"[skip] {uid}: finished in an earlier run", flush=True)
                continue
            print(f"[run ] {uid} ...", flush=True)
            units[uid] = run_unit(uid, method, units, base, tokenizer, data, s)
            save(name, s, units, [u for u, _ in plan if u not in units])
            print(f"[done] {uid} in {units[uid]['seconds'] / 60:.1f} min", flush=True)


def main() -> None:
    """Run every unit not yet finished, saving after each; then print the tables and plot."""
    args = parse_args()
    common.apply_threads(args.threads)
    s, name = settings(args), args.name or ("quality-quick" if args.quick else "quality")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    units = load_previous(name, s, args.fresh)
    if not args.report_only:
        run_all(name, s, units, plan_units(methods))
    title = f"{s['model']} minus {s['blocks']} blocks, KD budget {s['budget']} tokens, eval limits {s['eval']}"
    common.print_table(title,
                       ["unit", "removed", "KD tokens", "wiki word ppl", "BLiMP acc", "XCOPA acc", "avg acc",
                        "blocks", "minutes"], table_rows(units))
    common.print_table("XCOPA accuracy per language", ["unit", *XCOPA_LANGS], lang_rows(units))
    # A smoke run must not overwrite the documented plot.
    print(f"plot: {plot(units, s, common.RESULTS / 'quality-quick.png' if args.quick else PLOT)}")
    print(f"wrote {common.RESULTS / (name + '.json')}")


if __name__ == "__main__":
    main()
