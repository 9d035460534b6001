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
import dataclasses
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
    p.add_argument("--equal-compute", action="store_true",
                   help="equal-compute table instead: every recipe gets the same total FLOPs (scoring + recovery); "
                        "default 4 blocks, result file quality-equal")
    p.add_argument("--equal-flops", type=float, default=None,
                   help="the FLOP budget per recipe, in TFLOP (default: one-shot output scoring + --equal-kd-tokens "
                        "tokens of KD)")
    p.add_argument("--equal-kd-tokens", type=int, default=8192, help="KD tokens that define the default budget")
    p.add_argument("--equal-seed", type=int, default=0, help="seed of the equal-compute jobs (data split, training)")
    p.add_argument("--equal-recipes", default=EQUAL_DEFAULT,
                   help="comma list of: " + ", ".join(EQUAL_RECIPES) + "; RECIPE@lr=X (or @block_recon_lr=X, "
                        "@calibration=self-generated) changes that knob")
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
    out, device = {}, common.device(args.device)
    if device != "cpu":
        out["device"] = device
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
    rec = RecoveryConfig(method="none" if recovery == "none" else "kd", batch_size=batch, lr=common.TABLE_LR)
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


# ---------------------------------------------------------------- equal compute (--equal-compute)
#
# Every recipe gets the same total FLOPs F: its scoring passes plus its recovery work, counted
# as iterabre.flops counts them (matmuls and attention, from the shapes). F defaults to what
# one-shot output scoring plus `--equal-kd-tokens` tokens of KD cost. Each recipe's knob is
# solved from the per-token formulas so that it spends F; after the job the scoring and recovery
# FLOPs the flow recorded (report.json "compute", RecoveryResult.flops) replace the prediction. Left out of F
# for every recipe alike: the held-out KD loss `recover` measures before and after each phase
# for the report (it decides nothing), and reconstruct's Gram sums and solve (not matmul
# modules; ~3 % of its cost on SmolLM2). `scoring_flops` is the hand count the tests check.

EQUAL_RECIPES = {  # name -> (scorer, schedule, recovery method, when KD runs: "steps" | "end")
    "oneshot-kd": ("output", "one-shot", "kd", "steps"),
    "oneshot-lora-kd": ("output", "one-shot", "lora-kd", "steps"),
    "oneshot-reconstruct": ("output", "one-shot", "reconstruct", "steps"),
    "oneshot-block-recon": ("output", "one-shot", "block-recon", "steps"),
    "oneshot-block-recon+kd": ("output", "one-shot", "block-recon+kd", "steps"),
    "oneshot-reconstruct+kd": ("output", "one-shot", "reconstruct+kd", "steps"),  # least squares on a few windows, then KD
    "iterabre": ("output", "iterative", "kd", "steps"),  # the paper: KD after every removal (increasing budget)
    "iterative-block-recon+kd": ("output", "iterative", "block-recon+kd", "steps"),  # block-recon+kd after every removal
    "shortgpt-kd": ("block-influence", "one-shot", "kd", "steps"),  # ShortGPT's block influence, then KD
    "angular-kd": ("angular", "one-shot", "kd", "steps"),  # Gromov et al.'s contiguous run, then KD
    "angular-block-recon+kd": ("angular", "one-shot", "block-recon+kd", "steps"),  # that run, repaired by block-recon+kd
    "angular-reconstruct+kd": ("angular", "one-shot", "reconstruct+kd", "steps"),  # that run, least squares, then KD
    "sleb-kd": ("perplexity", "iterative", "kd", "end"),  # SLEB: re-scored after each removal, KD once at the end
    "select-auto": ("select", "one-shot", "auto", "steps"),  # output's or angular's set, whichever moves the output
    #                                                          less; least squares + KD on one gap, else block-recon+kd
}
# `recipe@knob=value`: a RecoveryConfig knob changed ...
VARIANT_KNOBS = {"lr": float, "block_recon_lr": float, "reconstruct_tokens": int, "ridge": float,
                 "block_recon_blocks": str, "calibration_tokens": int,
                 "calibration": str,  # ... or one of JOB_KNOBS, a CompressConfig knob
                 "kd_share": float}  # ... or one of PLAN_KNOBS, how the plan splits the budget
JOB_KNOBS = ("calibration", "calibration_tokens")
PLAN_KNOBS = ("kd_share",)
KD_SHARE = 0.5  # block-recon+kd: the share of the recovery FLOPs KD gets (block-recon the rest); @kd_share=


def recipe(name: str) -> tuple[tuple[str, str, str, str], dict]:
    """(EQUAL_RECIPES entry, knob overrides) of a recipe name such as `oneshot-kd@lr=2e-4` or
    `oneshot-block-recon+kd@calibration=self-generated`."""
    from iterabre.blockrecon import TRAINED_BLOCKS
    from iterabre.config import CALIBRATIONS

    base, *variant = name.split("@")
    if base not in EQUAL_RECIPES:
        raise SystemExit(f"unknown recipe {base!r}: use one of {', '.join(EQUAL_RECIPES)} (optionally @lr=...)")
    overrides = {}
    for part in variant:
        knob, _, value = part.partition("=")
        choices = {"calibration": CALIBRATIONS, "block_recon_blocks": TRAINED_BLOCKS}.get(knob)
        if knob not in VARIANT_KNOBS or not value or (choices and value not in choices):
            raise SystemExit(f"bad recipe variant {part!r} in {name!r}: use @KNOB=VALUE, KNOB one of "
                             f"{', '.join(VARIANT_KNOBS)} (calibration: {' | '.join(CALIBRATIONS)}; "
                             f"block_recon_blocks: {' | '.join(TRAINED_BLOCKS)})")
        try:
            overrides[knob] = VARIANT_KNOBS[knob](value)
        except ValueError:
            raise SystemExit(f"bad recipe variant {part!r} in {name!r}: {knob} takes a "
                             f"{VARIANT_KNOBS[knob].__name__}") from None
    if "kd_share" in overrides and not (0 < overrides["kd_share"] < 1 and EQUAL_RECIPES[base][2] == "block-recon+kd"):
        raise SystemExit(f"bad recipe variant in {name!r}: kd_share splits block-recon+kd's budget, so it needs a "
                         f"block-recon+kd recipe and a value between 0 and 1 (e.g. @kd_share=0.75)")
    return EQUAL_RECIPES[base], overrides


DEFAULT_RECIPE = "select-auto@lr=2e-4"  # `iterabre compress`'s defaults (tests/test_bench_quality.py
#                                                   holds them equal; recipes without @lr= train at common.TABLE_LR)


def default_as_run() -> str:
    """DEFAULT_RECIPE at `iterabre compress`'s own calibration size (the tables score on --calib-tokens)."""
    from iterabre.config import CompressConfig

    return f"{DEFAULT_RECIPE}@calibration_tokens={CompressConfig().calibration_tokens}"


BASELINES = ("iterabre", "shortgpt-kd", "angular-kd", "sleb-kd")  # the published recipes the default must beat
EQUAL_DEFAULT = "oneshot-kd,oneshot-reconstruct,oneshot-block-recon,oneshot-block-recon+kd"
REPORT_CHECKS = {"block-recon+kd": 4, "reconstruct+kd": 4}  # held-out KD losses per phase (2 for the others)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Per-token forward FLOPs of one decoder block and of the LM head of the base model."""

    blk: int
    head: int
    layers: int
    seq_len: int

    def model(self, blocks: int) -> int:
        """A whole forward of a model with `blocks` blocks, per token."""
        return blocks * self.blk + self.head


@functools.lru_cache(maxsize=None)
def shapes(model: str, seq_len: int) -> Shapes:
    """Shapes of the base model, counted on an empty (meta) copy built from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from iterabre.embedded import EMBEDDED, pull_embedded_model
    from iterabre.flops import block_flops_per_token, matmul_params
    from iterabre.surgery import decoder_blocks

    config = AutoConfig.from_pretrained(str(pull_embedded_model(model) if model in EMBEDDED else model))
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    blocks = decoder_blocks(net)
    head = 2 * (matmul_params(net) - len(blocks) * matmul_params(blocks[0]))  # all blocks alike (SmolLM2)
    return Shapes(block_flops_per_token(blocks[0], config, seq_len), head, len(blocks), seq_len)


def equal_settings(args) -> dict:
    """Everything that changes the equal-compute numbers (the result file resumes only when they match)."""
    pick = functools.partial(common.pick, quick=args.quick)
    s = {"model": args.model, "blocks": pick(args.blocks, 4, 2), "calib_tokens": pick(args.calib_tokens, 1024, 128),
         "seq_len": pick(args.seq_len, 128, 64), "kd_batch_size": args.kd_batch_size or 4,
         "eval": common.parse_limits(pick(args.eval, "wikitext=3,blimp=10,xcopa=20", "wikitext=1,blimp=1,xcopa=1")),
         "seed": args.equal_seed, "equal_kd_tokens": pick(None, args.equal_kd_tokens, 1024)}
    s["flops"] = args.equal_flops * 1e12 if args.equal_flops else reference_flops(s)
    return s


def scoring_flops(sh: Shapes, s: dict, scorer: str, schedule: str) -> int:
    """Block forwards per calibration token and scoring pass (one pass, or one per step at depth L):
    pair scorers (block-influence, angular) one pass over the stack, L; output L + L(L-1)/2 (the dense
    stream and every candidate's suffix); perplexity the same plus an LM head per candidate. The flow
    measures what ran (the table shows that); the perplexity scorer's identity-pass check adds two LM
    heads over one batch there, left out of this prediction."""
    calib = -(-s["calib_tokens"] // s["seq_len"]) * s["seq_len"]  # whole windows
    depths = [sh.layers] if schedule == "one-shot" else [sh.layers - i for i in range(s["blocks"])]
    per_pass = {"block-influence": lambda L: L * sh.blk, "angular": lambda L: L * sh.blk,
                "output": lambda L: (L + L * (L - 1) // 2) * sh.blk,
                "perplexity": lambda L: (L + L * (L - 1) // 2) * sh.blk + L * sh.head}
    if scorer == "select":  # every proposing rule, then the dense stream and each set's stream (the blocks after
        #                     its first removed one: at most L - k, the bound predicted here)
        from iterabre.config import select_rules

        rules = select_rules(SELECT_FROM)
        k = s["blocks"] if schedule == "one-shot" else 1
        return sum(calib * (sum(per_pass[r](L) for r in rules) + (L + len(rules) * (L - k)) * sh.blk)
                   for L in depths)
    return sum(calib * per_pass[scorer](L) for L in depths)


SELECT_FROM = "output,angular"  # the library's default select_from (tests/test_bench_quality.py holds them equal)


def kd_per_token(sh: Shapes, student_layers: int, lora: bool = False) -> int:
    """Teacher forward + student forward and backward: all weights train (3x forward), or with LoRA only
    input gradients pass the frozen weights (2x; the rank-r adapters are left out of the prediction)."""
    return sh.model(sh.layers) + (2 if lora else 3) * sh.model(student_layers)


def report_checks(sh: Shapes, s: dict, student_layers: int, method: str) -> int:
    """The held-out KD losses `recover` measures for the report in one phase (left out of the budget)."""
    held = -(-s["calib_tokens"] // s["seq_len"]) * s["seq_len"]  # the flow's held-out set is as big as calib
    return REPORT_CHECKS.get(method, 2) * held * (sh.model(student_layers) + sh.model(sh.layers))


def _units(sh: Shapes, removed: list[int], which: str = "before"):
    """The block-recon units (= reconstruct's fits for which='before') of a one-shot removal."""
    from iterabre.blockrecon import units_for

    kept = [i for i in range(sh.layers) if i not in removed]
    return units_for(kept, list(range(sh.layers)), removed, which)


def block_recon_flops(sh: Shapes, s: dict, removed: list[int], tokens: int, steps: int, which: str = "before") -> int:
    """Capture `tokens` pairs per unit, `steps` Adam steps per unit, held-out gap error before and after;
    `which`: the kept blocks each unit trains (RecoveryConfig.block_recon_blocks)."""
    held = -(-s["calib_tokens"] // s["seq_len"]) * s["seq_len"]
    tokens = -(-tokens // sh.seq_len) * sh.seq_len  # block-recon takes whole windows
    batch = _rc_default("block_recon_batch_size") * sh.seq_len
    total = 0
    for u in _units(sh, removed, which):
        capture = (u.positions[0] + u.target + 1) * sh.blk  # student blocks before the unit, teacher to the target
        unit = len(u.positions) * sh.blk
        total += tokens * capture + 2 * held * (capture + unit) + steps * batch * 3 * unit
    return total


def reconstruct_flops(sh: Shapes, removed: list[int], tokens: int) -> int:
    """One capture pass per fitted gap (down_proj only): student and teacher up to and including the blocks."""
    return sum(tokens * (u.positions[0] + 1 + u.target + 1) * sh.blk for u in _units(sh, removed))


def _rc_default(name: str):
    """A RecoveryConfig default (the recipes use the library's defaults for every other knob)."""
    from iterabre.config import RecoveryConfig

    return getattr(RecoveryConfig(), name)


def generation_flops(sh: Shapes, s: dict, method: str, calibration: str, **recovery) -> int:
    """Sampling the self-generated text (scoring windows, then block-recon's `block_recon_tokens` or
    reconstruct's `reconstruct_tokens`, RecoveryConfig knobs in `recovery`): one
    forward of the base model per token. An upper bound: with a KV cache iterabre.flops counts each
    step's attention at T=1, this at T=seq_len (~2 % of a SmolLM2 forward)."""
    from iterabre.config import CompressConfig, RecoveryConfig
    from iterabre.planning import recon_windows

    if calibration != "self-generated":
        return 0
    cfg = CompressConfig(calibration=calibration, seq_len=s["seq_len"], recovery=RecoveryConfig(method=method, **recovery))
    windows = -(-s["calib_tokens"] // s["seq_len"]) + recon_windows(cfg)  # as steps.prepare_data generates
    return windows * s["seq_len"] * sh.model(sh.layers)


def reference_flops(s: dict) -> int:
    """The default budget: one-shot output scoring + equal_kd_tokens tokens of KD of the pruned model."""
    sh = shapes(s["model"], s["seq_len"])
    return scoring_flops(sh, s, "output", "one-shot") + s["equal_kd_tokens"] * kd_per_token(sh, sh.layers - s["blocks"])


def _whole(tokens: float, unit: int) -> int:
    """Tokens rounded down to whole units (micro-batches or windows), never negative."""
    return max(0, int(tokens // unit) * unit)


def capture_tokens(sh: Shapes, s: dict, removed: list[int], budget: float, mb: int, which: str = "before") -> int:
    """block_recon_tokens' default, or fewer whole micro-batches when capturing them would take more than
    half of block-recon's `budget` (the rest is for its Adam steps)."""
    checks = block_recon_flops(sh, s, removed, 0, 0, which)  # held-out gap errors before and after
    per_token = (block_recon_flops(sh, s, removed, mb, 0, which) - checks) / mb
    return min(_whole(_rc_default("block_recon_tokens"), mb), _whole((budget / 2 - checks) / per_token, mb))


def iterative_block_recon_kd(sh: Shapes, s: dict, removed: list[int], left: float, mb: int,
                             which: str = "before", share: float = KD_SHARE) -> tuple[int, int, int]:
    """(KD tokens, predicted FLOPs, Adam steps per gap) of block-recon+kd after every removal, `share` of
    `left` for KD and the rest for block-recon.

    The budget is split equally over the steps (budget_schedule=equal): block-recon captures from each
    step's own recovery windows, and the increasing split would leave the first steps too few to fit
    on. The gaps are predicted as the one-shot removal `removed`, one per step, each in the full-depth
    model (the measured FLOPs replace the prediction; the shallower students make it an upper bound).
    """
    from iterabre.planning import step_budgets

    S = s["blocks"]
    per = sum(kd_per_token(sh, sh.layers - i) for i in range(1, S + 1)) / S
    tokens = _whole(left * share / per, mb)
    budgets = step_budgets(tokens, S, "equal", unit=mb)  # as the flow splits them
    kd = sum(b * kd_per_token(sh, sh.layers - i) for i, b in enumerate(budgets, 1))
    caps = [min(_rc_default("block_recon_tokens"), max(b, sh.seq_len)) for b in budgets]  # capped by the windows
    fixed = sum(block_recon_flops(sh, s, [r], c, 0, which) for r, c in zip(removed, caps))
    per_step = sum(block_recon_flops(sh, s, [r], c, 1, which) for r, c in zip(removed, caps)) - fixed
    steps = max(0, int((left - kd - fixed) // per_step))
    return tokens, int(kd + fixed + steps * per_step), steps


def recipe_settings(s: dict, name: str) -> dict:
    """The bench settings as a recipe runs them: its `@calibration_tokens=` replaces the bench's."""
    return {**s, "calib_tokens": recipe(name)[1].get("calibration_tokens", s["calib_tokens"])}


def equal_plan(name: str, s: dict, removed: list[int] | None) -> dict:
    """The recipe's knobs that spend the budget, and the FLOPs it is predicted to spend.

    -> {"fields": CompressConfig fields, "recovery": RecoveryConfig overrides, "scoring", "recovery_flops",
    "feasible"}; `removed` (the one-shot removal, same for every one-shot recipe) sizes reconstruct and block-recon.
    """
    sh = shapes(s["model"], s["seq_len"])
    (scorer, schedule, named, when), overrides = recipe(name)
    method = named
    if named == "auto":  # sized as the method it will run on this removal's gaps
        from iterabre.recovery import auto_method

        method = auto_method(len(_units(sh, removed)))
    job = {k: v for k, v in overrides.items() if k in JOB_KNOBS}
    s = recipe_settings(s, name)  # a recipe's own calibration size scores, and sizes the held-out set
    which = overrides.get("block_recon_blocks", _rc_default("block_recon_blocks"))
    scoring, Ls = scoring_flops(sh, s, scorer, schedule), sh.layers - s["blocks"]
    fit = overrides.get("reconstruct_tokens",  # reconstruct+kd: block-recon's size; auto: the library's default
                        _rc_default("reconstruct_tokens" if named == "auto" else "block_recon_tokens"))
    generated = generation_flops(sh, s, named, job.get("calibration", "wikitext"), reconstruct_tokens=fit)
    left, mb = s["flops"] - scoring - generated, s["kd_batch_size"] * s["seq_len"]
    rec = {"method": named, "batch_size": s["kd_batch_size"], "lr": common.TABLE_LR,
           **{k: v for k, v in overrides.items() if k not in JOB_KNOBS + PLAN_KNOBS}}
    share = overrides.get("kd_share", KD_SHARE)
    tokens, spent = 0, 0
    fields = {"scorer": scorer, "schedule": schedule, "budget_schedule": "increasing", **job}
    if method == "kd" and schedule == "iterative" and when == "steps":  # step i of S gets i / (S(S+1)/2)
        S = s["blocks"]
        per = sum(i * kd_per_token(sh, sh.layers - i) for i in range(1, S + 1)) / (S * (S + 1) / 2)
        tokens = _whole(left / per, mb)
        spent = tokens * per
    elif method in ("kd", "lora-kd"):  # one phase after the last removal
        per = kd_per_token(sh, Ls, lora=method == "lora-kd")
        tokens = _whole(left / per, mb)
        spent = tokens * per
        if schedule == "iterative":  # 'final' schedule whose share rounds to every micro-batch
            fields.update(budget_schedule="final", final_share=1 - 1 / (4 * max(1, tokens // mb)))
    elif method == "reconstruct":
        tokens = _whole(left / (reconstruct_flops(sh, removed, 1)), mb)
        rec["reconstruct_tokens"] = tokens  # the fit reads every window the budget buys
        spent = reconstruct_flops(sh, removed, tokens)
    elif method == "block-recon":
        tokens = capture_tokens(sh, s, removed, left, mb, which)
        rec["block_recon_tokens"] = tokens
        fixed = block_recon_flops(sh, s, removed, tokens, 0, which)
        per_step = block_recon_flops(sh, s, removed, tokens, 1, which) - fixed
        rec["block_recon_steps"] = max(0, int((left - fixed) // per_step))
        spent = block_recon_flops(sh, s, removed, tokens, rec["block_recon_steps"], which)
    elif method == "reconstruct+kd":  # the fit reads the first `reconstruct_tokens` KD windows, KD the rest
        tokens = _whole((left - reconstruct_flops(sh, removed, fit)) / kd_per_token(sh, Ls), mb)
        rec["reconstruct_tokens"] = min(fit, tokens)  # the fit cannot read windows KD does not have (nor, to keep
        #                                               plans alike, more self-generated text than that)
        spent = reconstruct_flops(sh, removed, rec["reconstruct_tokens"]) + tokens * kd_per_token(sh, Ls)
    elif method == "block-recon+kd" and schedule == "iterative":  # after every removal: its gap, then KD
        tokens, spent, rec["block_recon_steps"] = iterative_block_recon_kd(sh, s, removed, left, mb, which, share)
        fields.update(budget_schedule="equal")  # every step gets windows to capture from (see the function)
    elif method == "block-recon+kd":  # `share` of the recovery FLOPs for KD; block-recon captures from its windows
        tokens = _whole(left * share / kd_per_token(sh, Ls), mb)
        rec["block_recon_tokens"] = min(capture_tokens(sh, s, removed, left - tokens * kd_per_token(sh, Ls), mb, which),
                                        tokens)
        fixed = block_recon_flops(sh, s, removed, rec["block_recon_tokens"], 0, which)
        per_step = block_recon_flops(sh, s, removed, rec["block_recon_tokens"], 1, which) - fixed
        rec["block_recon_steps"] = max(0, int((left - tokens * kd_per_token(sh, Ls) - fixed) // per_step))
        spent = block_recon_flops(sh, s, removed, rec["block_recon_tokens"], rec["block_recon_steps"], which)
        spent += tokens * kd_per_token(sh, Ls)
    fields["recovery_tokens"] = tokens
    return {"fields": fields, "recovery": rec, "method": method, "scoring": scoring, "generation": generated,
            "recovery_flops": int(spent), "feasible": tokens >= mb}


def measured_recovery_flops(report: dict, s: dict) -> int:
    """The recovery FLOPs the flow recorded, less the report-only held-out KD checks (as planned)."""
    sh = shapes(s["model"], s["seq_len"])
    total = 0
    for phase in common.recovery_phases(report):
        r = phase["recovery"]
        if not r.get("tokens"):  # a step the 'final' schedule gave nothing: no recovery ran
            continue
        total += r.get("flops", 0) - report_checks(sh, s, phase["num_layers"], r["method"])
    return total


def equal_unit(name: str, s: dict, work: Path, removed: list[int] | None) -> dict:
    """One recipe through the flow at the budget, evaluated as the quality table is."""
    from iterabre.config import CompressConfig, RecoveryConfig

    start, plan = time.perf_counter(), equal_plan(name, s, removed)
    if not plan["feasible"]:
        return {"label": name, "feasible": False, "plan": plan, "seconds": 0.0, "removed": []}
    out, s = work / name, recipe_settings(s, name)
    cfg = CompressConfig(model=s["model"], target_layers=base_layers(s["model"]) - s["blocks"],
                         seq_len=s["seq_len"], seed=s["seed"], eval_tasks="", output=str(out),
                         recovery=RecoveryConfig(**plan["recovery"]),
                         **{"calibration_tokens": s["calib_tokens"], **plan["fields"]})
    report = common.run_flow(cfg)
    ev = evaluate_saved(report["final_dir"], s["eval"], s)
    shutil.rmtree(out, ignore_errors=True)
    phases = [{key: p["recovery"].get(key) for key in (*RECOVERY_KEYS, "flops")}
              for p in common.recovery_phases(report)]
    rec_flops = measured_recovery_flops(report, s)
    scoring = report["compute"]["scoring_flops"]  # what the flow's scoring passes ran (iterabre.flops)
    generated = report["compute"].get("generation_flops", 0)  # self-generated calibration text
    kd_tokens = plan["fields"]["recovery_tokens"] if "kd" in plan.get("method", plan["recovery"]["method"]) else 0
    return {"label": name, "feasible": True, "plan": plan, "removed": report["removed_layers"],
            "recovery": phases, "kd_tokens": kd_tokens, "scoring_flops": scoring, "generation_flops": generated,
            "recovery_flops": rec_flops, "total_flops": generated + scoring + rec_flops, "eval": ev, **headline(ev),
            "seconds": time.perf_counter() - start}


def _oneshot_removal(s: dict, units: dict, work: Path, scorer: str = "output", like: str | None = None) -> list[int]:
    """The one-shot removal of `scorer` on the calibration size recipe `like` scores on: from a finished one-shot
    unit that scored the same wikitext windows, else by scoring once as the flow does."""
    calib = recipe_settings(s, like)["calib_tokens"] if like else s["calib_tokens"]
    done = [u["removed"] for k, u in units.items() if recipe(k)[0][:2] == (scorer, "one-shot")
            and "calibration" not in recipe(k)[1] and recipe_settings(s, k)["calib_tokens"] == calib
            and u.get("removed")]  # scored on the same wikitext windows
    if done:
        return done[0]
    s = {**s, "calib_tokens": calib}
    from iterabre import steps
    from iterabre.config import CompressConfig
    from iterabre.embedded import EMBEDDED, pull_embedded_model

    model = str(pull_embedded_model(s["model"]) if s["model"] in EMBEDDED else s["model"])
    cfg = CompressConfig(model=s["model"], calibration_tokens=s["calib_tokens"], seq_len=s["seq_len"], seed=s["seed"])
    data = steps.prepare_data(cfg, model, work / "prescore", [])
    return steps.score(model, data, scorer, s["blocks"], "cpu")["remove"]  # as the flow chooses


def equal_rows(units: dict, s: dict) -> list[list]:
    """One row per recipe: FLOPs (scoring, recovery, total / budget), what it trained, quality, time."""
    rows = []
    for uid, u in units.items():
        if not u.get("feasible", True):
            rows.append([uid, "", "", "", "cannot afford any recovery at this budget", "", "", "", "", "", ""])
            continue
        rec = u["plan"]["recovery"]
        rows.append([uid, (u["scoring_flops"] + u.get("generation_flops", 0)) / 1e12, u["recovery_flops"] / 1e12,
                     u["total_flops"] / s["flops"],
                     u.get("kd_tokens", 0), rec.get("block_recon_steps", ""), u["wikitext_word_ppl"],
                     _pm(u["blimp_acc"], u["blimp_stderr"]), _pm(u["xcopa_acc"], u["xcopa_stderr"]),
                     ",".join(map(str, u["removed"])), u["seconds"] / 60])
    return rows


def run_equal(args) -> None:
    """The equal-compute table: run each recipe not yet finished, saving after each; print the table."""
    s = equal_settings(args)
    name = args.name or ("quality-equal-quick" if args.quick else "quality-equal")
    recipes = [r.strip() for r in args.equal_recipes.split(",") if r.strip()]
    for r in recipes:
        recipe(r)  # an unknown recipe or variant stops here, before any unit runs
    units = {} if args.fresh else common.previous(name, s).get("units", {})
    notes = ("FLOPs per iterabre.flops; budget = scoring + recovery work, report-only held-out KD checks left "
             "out; scoring as the flow measured it")
    if not args.report_only:
        def run(uid, done, work):
            scorer, schedule, method, _ = recipe(uid)[0]
            # a repair is sized by the gaps: the one-shot removal's (an iterative recipe's predicted gaps, too)
            sized = method not in ("kd", "lora-kd") and (schedule == "one-shot" or method.startswith("block-recon"))
            return equal_unit(uid, s, work, _oneshot_removal(s, done, work, scorer, like=uid) if sized else None)

        def save(uid, done):
            units[uid] = done
            return common.save_units(name, s, units, recipes, notes)

        units = common.run_units(recipes, units, run, save)
    common.print_table(f"{s['model']} minus {s['blocks']} blocks, {s['flops'] / 1e12:.2f} TFLOP per recipe "
                       f"(scoring + recovery), eval limits {s['eval']}",
                       ["recipe", "scoring (+ generated text) TFLOP", "recovery TFLOP", "total / budget", "KD tokens",
                        "block-recon steps", "wiki word ppl", "BLiMP acc", "XCOPA acc", "removed", "minutes"],
                       equal_rows(units, s))
    print(f"wrote {common.result_path(name)}")


def main() -> None:
    """Run every unit not yet finished, saving after each; then print the tables and plot."""
    args = parse_args()
    common.apply_threads(args.threads)
    if args.equal_compute:
        run_equal(args)
        return
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
