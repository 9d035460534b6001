"""Quality table on SmolLM2-135M: IteRABRe vs one-shot and SLEB-style baselines, same recovery budget.

Every method is a job of the Prefect flow `iterabre` (the code `iterabre compress` runs, so
the loop exists once), set up by a CompressConfig: it removes `--blocks` blocks from the
30-block base and gets the same total recovery budget (`--budget` tokens of KD from the base
model, the library's default RecoveryConfig otherwise), on the calibration / recovery /
held-out windows the flow cuts (`iterabre.steps.prepare_data`):

    iterabre        output scorer, iterative (1 block per step), KD after every step (budget split equally)
    block-influence ShortGPT: one-shot, lowest 1 - cos(block input, block output)
    angular         Gromov et al.: one-shot contiguous run with the lowest angular distance
    perplexity      SLEB-style: iterative, re-scored after each removal, no training in between
    output          output scorer, iterative, no recovery (the IteRABRe schedule without healing)

plus a "+ KD" row for the first three baselines: the same pruning, then the whole budget as
one KD phase after the last removal. The flow evaluates nothing (eval_tasks=''); each final
model gets this script's lm-eval evaluation (wikitext word perplexity, BLiMP, XCOPA; `--eval`
per-task limits) and a cheaper "curve" evaluation at every block count the method passes
through (each step's checkpoint; one job per count for the one-shot methods), for the plot
docs/quality_vs_blocks.png. Units of work are saved to bench/results/quality.json as they
finish; a rerun with the same settings skips finished units (use --fresh to redo them).

    .venv/bin/python bench/quality.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import shutil
import time
from pathlib import Path

import common

# name -> (scorer, schedule, recovery, label); recovery: see `recovery_fields`
METHODS = {
    "iterabre": ("output", "iterative", "each-step", "IteRABRe (output, iterative, KD each step)"),
    "block-influence": ("block-influence", "one-shot", "none", "ShortGPT block-influence, one-shot"),
    "angular": ("angular", "one-shot", "none", "angular distance, one-shot contiguous"),
    "perplexity": ("perplexity", "iterative", "none", "SLEB-style perplexity, iterative"),
    "output": ("output", "iterative", "none", "output scorer, iterative"),
}
KD_AFTER = ("block-influence", "angular", "perplexity")  # baselines that also get a "+ KD" row
XCOPA_LANGS = ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")
PLOT = common.REPO / "docs" / "quality_vs_blocks.png"
RECOVERY_KEYS = ("loss_before", "loss_after", "tokens", "steps", "seconds", "tokens_per_s", "aborted", "reason",
                 "peak_mem_mb")
NOTES = "avg_acc = mean(BLiMP acc, XCOPA acc); limits are documents per leaf task"


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
    common.add_result_args(p, "quality")
    return p.parse_args()


def settings(args) -> dict:
    """Everything that changes the numbers; a result file is resumed only when these match."""
    pick = functools.partial(common.pick, quick=args.quick)
    blocks = pick(args.blocks, 6, 2)
    ks = pick(args.oneshot_ks, "2,4", "1")
    return {"model": args.model, "blocks": blocks, "budget": pick(args.budget, 24576, 1024),
            "calib_tokens": pick(args.calib_tokens, 1024, 128), "seq_len": pick(args.seq_len, 128, 64),
            "eval": common.parse_limits(pick(args.eval, "wikitext=3,blimp=10,xcopa=20", "wikitext=1,blimp=1,xcopa=1")),
            "curve_eval": common.parse_limits(pick(args.curve_eval, "wikitext=2", "blimp=1")),
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


# ---------------------------------------------------------------- evaluation

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


def evaluate_saved(model: str, limits: dict, s: dict) -> dict:
    """`evaluate` on a model loaded from a spec or folder (a job's checkpoint) onto the bench's device."""
    from iterabre.models import load_model

    return evaluate(*load_model(str(model), device=s.get("device", "cpu")), limits)


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


def curve_point(removed: list[int], model: str, s: dict) -> dict:
    """One point of the plot: a model after `removed`, under the cheap curve evaluation."""
    return {"blocks_removed": len(removed), "removed": list(removed),
            **headline(evaluate_saved(model, s["curve_eval"], s))}


# ---------------------------------------------------------------- jobs through the flow

@functools.lru_cache(maxsize=None)
def base_layers(model: str) -> int:
    """Decoder blocks of the base model (a job's target is the blocks it keeps)."""
    from iterabre import steps
    from iterabre.embedded import EMBEDDED, pull_embedded_model

    return steps.num_layers(pull_embedded_model(model) if model in EMBEDDED else model)


def recovery_fields(recovery: str, s: dict) -> dict:
    """A job's CompressConfig fields for its recovery (RecoveryConfig defaults, KD from the base model).

    each-step: KD after every removal, the budget split equally over the steps (IteRABRe);
    none:      no training at all;
    at-end:    the whole budget as one KD phase after the last removal (the "+ KD" rows): the
               'final' budget schedule with a share that rounds to every micro-batch, so the
               steps before it get 0 tokens and train nothing (a one-shot job's one step gets it all).
    """
    from iterabre.config import RecoveryConfig

    batch = s.get("kd_batch_size") or RecoveryConfig.batch_size
    rec = RecoveryConfig(method="none" if recovery == "none" else "kd", batch_size=batch)
    if recovery == "none":
        return {"recovery": rec, "recovery_tokens": 0, "budget_schedule": "equal"}
    if recovery == "each-step":
        return {"recovery": rec, "recovery_tokens": s["budget"], "budget_schedule": "equal"}
    units = max(1, s["budget"] // (batch * s["seq_len"]))  # micro-batches in the budget
    # round(units * share) == units, and share stays below 1 as the config requires
    return {"recovery": rec, "recovery_tokens": s["budget"], "budget_schedule": "final",
            "final_share": 1 - 1 / (4 * units)}


def job_config(s: dict, scorer: str, schedule: str, recovery: str, blocks: int, out: Path):
    """The CompressConfig of one job: the flow's defaults except the bench's sizes, the method and its recovery."""
    from iterabre.config import CompressConfig

    return CompressConfig(model=s["model"], target_layers=base_layers(s["model"]) - blocks, scorer=scorer,
                          schedule=schedule, calibration_tokens=s["calib_tokens"], seq_len=s["seq_len"],
                          seed=s["seed"], device=s.get("device", "cpu"), eval_tasks="", output=str(out),
                          **recovery_fields(recovery, s))


def unit_spec(uid: str, method: str) -> tuple[str, str, str, str]:
    """(scorer, schedule, recovery, label) of a unit: its method's, or for a "+kd" row the same
    pruning with the whole budget spent after the last removal."""
    scorer, schedule, recovery, label = METHODS[method]
    if uid.endswith("+kd"):
        return scorer, schedule, "at-end", f"{label} + KD"
    return scorer, schedule, recovery, label


def curve(report: dict, s: dict, every_step: bool) -> list[dict]:
    """Curve points of a job: every step's checkpoint, or only its final model."""
    if not every_step:
        return [curve_point(report["removed_layers"], report["final_dir"], s)]
    points, removed = [], []
    for step in report["steps"]:
        removed = removed + step["removed"]
        points.append(curve_point(removed, step["checkpoint"], s))
    return points


# ---------------------------------------------------------------- units of work

def unit_base(s: dict) -> dict:
    """The unpruned model: final and curve evaluation."""
    ev = evaluate_saved(s["model"], s["eval"], s)
    return {"label": f"base ({base_layers(s['model'])} blocks)", "removed": [], "eval": ev, **headline(ev),
            "curve": [curve_point([], s["model"], s)]}


def unit_method(uid: str, method: str, s: dict, work: Path) -> dict:
    """Prune (and heal) through the flow, one job per block count of the curve; evaluate the last job's model."""
    scorer, schedule, recovery, label = unit_spec(uid, method)
    # a one-shot method's intermediate counts are separate jobs; an iterative job passes through them
    counts = s["oneshot_ks"] if schedule == "one-shot" and recovery != "at-end" else [s["blocks"]]
    points = []
    for k in counts:
        out = work / f"{uid}-{k}"
        report = common.run_flow(job_config(s, scorer, schedule, recovery, k, out))
        points += curve(report, s, every_step=recovery != "at-end")  # +KD: the healed model only
        if k != counts[-1]:
            shutil.rmtree(out, ignore_errors=True)
    ev = evaluate_saved(report["final_dir"], s["eval"], s)
    shutil.rmtree(out, ignore_errors=True)
    recoveries = [{key: p["recovery"].get(key) for key in RECOVERY_KEYS}
                  for p in common.recovery_phases(report) if p["recovery"].get("tokens")]
    return {"label": label, "removed": report["removed_layers"], "recovery": recoveries,
            "recovery_tokens": sum(r["tokens"] for r in recoveries), "eval": ev, **headline(ev), "curve": points}


def plan_units(methods: list[str]) -> list[tuple[str, str]]:
    """(unit id, method) in run order: base, IteRABRe, then each baseline and its + KD row."""
    units = [("base", "base")]
    for m in methods:
        units.append((m, m))
        if m in KD_AFTER:
            units.append((f"{m}+kd", m))
    return units


def run_unit(unit: str, method: str, s: dict, work: Path) -> dict:
    """Dispatch one unit and time it."""
    start = time.perf_counter()
    out = unit_base(s) if unit == "base" else unit_method(unit, method, s, work)
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


def run_all(name: str, s: dict, units: dict, plan: list[tuple[str, str]]) -> dict:
    """Run every planned unit that is not finished yet, saving the result file after each."""
    methods, order = dict(plan), [uid for uid, _ in plan]

    def save(uid: str, done: dict) -> dict:
        units[uid] = done
        return common.save_units(name, s, units, order, NOTES)

    return common.run_units(order, units, lambda uid, _, work: run_unit(uid, methods[uid], s, work), save)


def main() -> None:
    """Run every unit not yet finished, saving after each; then print the tables and plot."""
    args = parse_args()
    common.apply_threads(args.threads)
    s, name = settings(args), common.result_name(args, "quality")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    units = {} if args.fresh else common.previous(name, s).get("units", {})
    if not args.report_only:
        units = run_all(name, s, units, plan_units(methods))
    title = f"{s['model']} minus {s['blocks']} blocks, KD budget {s['budget']} tokens, eval limits {s['eval']}"
    common.print_table(title,
                       ["unit", "removed", "KD tokens", "wiki word ppl", "BLiMP acc", "XCOPA acc", "avg acc",
                        "blocks", "minutes"], table_rows(units))
    common.print_table("XCOPA accuracy per language", ["unit", *XCOPA_LANGS], lang_rows(units))
    # Only the default full run redraws the documented plot; a smoke, named or trial run keeps its own.
    documented = name == "quality" and common.RESULTS == common.DEFAULT_RESULTS
    print(f"plot: {plot(units, s, PLOT if documented else common.RESULTS / f'{name}.png')}")
    print(f"wrote {common.result_path(name)}")


if __name__ == "__main__":
    main()
