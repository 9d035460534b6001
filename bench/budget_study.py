"""Budget study (issue #9): iterative IteRABRe under each budget schedule vs one-shot, same total tokens.

Every unit is one real compression job through the Prefect flow `iterabre` (the code users
run), on SmolLM2-135M, with the same total recovery budget; only the method differs:

    iter-equal        output scorer, 1 block per step, budget split equally over the steps
    iter-increasing   ... step i gets a share proportional to i (later, harder steps get more)
    iter-final        ... equal split of (1 - final_share), then a final recovery after the last removal
    iter-adaptive     ... equal shares; a step stops when its held-out KD loss plateaus, the rest carries on
    oneshot-output    output scorer on the base once, remove all blocks, recover once with the whole budget
    oneshot-bi        ShortGPT block influence, one-shot, recover once

Experiments: `lr` (one-shot output, seed 0, a few peak learning rates; the one with the
lowest held-out KD loss is used everywhere else), `main` (4 blocks, every method, seeds
0-2: different calibration / recovery windows and data order), `deep` (8 blocks, seed 0)
and `large` (4 blocks, 2x the budget, seed 0). Each finished unit is saved to
bench/results/budget_study.json at once; a rerun with the same settings resumes.

    nohup .venv/bin/python bench/budget_study.py --threads 1 > bench/results/budget_study.log 2>&1 &
    .venv/bin/python bench/budget_study.py --report-only
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import time
from pathlib import Path

import common

METHODS = {  # name -> CompressConfig fields
    "iter-equal": dict(scorer="output", schedule="iterative", budget_schedule="equal"),
    "iter-increasing": dict(scorer="output", schedule="iterative", budget_schedule="increasing"),
    "iter-final": dict(scorer="output", schedule="iterative", budget_schedule="final"),
    "iter-adaptive": dict(scorer="output", schedule="iterative", budget_schedule="adaptive"),
    "oneshot-output": dict(scorer="output", schedule="one-shot", budget_schedule="equal"),
    "oneshot-bi": dict(scorer="block-influence", schedule="one-shot", budget_schedule="equal"),
}
EXPERIMENTS = ("lr", "main", "deep", "large")


def parse_args() -> argparse.Namespace:
    """Command-line options; --quick shrinks everything for a smoke run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--budget", type=int, default=None, help="total recovery tokens per job (default 8192)")
    p.add_argument("--lrs", default=None, help="peak lrs tried in the lr experiment (default 5e-5,2e-4)")
    p.add_argument("--seeds", default=None, help="seeds of the main table (default 0,1,2)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma list of: " + ", ".join(EXPERIMENTS))
    p.add_argument("--eval", default=None, help="eval limits per task (default wikitext=2,blimp=10)")
    common.add_result_args(p, "budget_study")
    return p.parse_args()


def settings(args) -> dict:
    """Everything that changes the numbers; a result file is resumed only when these match."""
    q = args.quick
    pick = functools.partial(common.pick, quick=q)
    return {"model": "smollm2-135m", "blocks": 2 if q else 4, "deep_blocks": 3 if q else 8,
            "budget": pick(args.budget, 8192, 512), "large_factor": 2, "calib_tokens": 128 if q else 256,
            "seq_len": 64 if q else 128, "lrs": [float(x) for x in pick(args.lrs, "5e-5,2e-4", "2e-4").split(",")],
            "seeds": [int(x) for x in pick(args.seeds, "0,1,2", "0,1").split(",")],
            "eval": common.parse_limits(pick(args.eval, "wikitext=2,blimp=10", "wikitext=1,blimp=1")),
            "adaptive_eval_tokens": 128 if q else 1024, "final_share": 0.2}


# ---------------------------------------------------------------- units

def plan_units(s: dict, experiments: list[str]) -> list[dict]:
    """Units in run order: the lr check first (it fixes the lr), then each experiment's jobs."""
    units = []
    if "lr" in experiments:
        units += [dict(id=f"lr/{lr:g}", exp="lr", method="oneshot-output", seed=0, blocks=s["blocks"],
                       budget=s["budget"], lr=lr) for lr in s["lrs"]]
    if "main" in experiments:
        units += [dict(id=f"main/{m}/s{seed}", exp="main", method=m, seed=seed, blocks=s["blocks"],
                       budget=s["budget"]) for seed in s["seeds"] for m in METHODS]
    for exp, blocks, budget in (("deep", s["deep_blocks"], s["budget"]),
                                ("large", s["blocks"], s["budget"] * s["large_factor"])):
        if exp in experiments:
            units += [dict(id=f"{exp}/{m}/s0", exp=exp, method=m, seed=0, blocks=blocks, budget=budget)
                      for m in METHODS]
    return units


def chosen_lr(done: dict, s: dict) -> float:
    """The lr experiment's winner (lowest held-out KD loss after recovery); the first lr until it ran."""
    tried = [(u["recovery"][-1]["loss_after"], u["lr"]) for uid, u in done.items() if uid.startswith("lr/")]
    return min(tried)[1] if tried else s["lrs"][0]


def job_config(unit: dict, s: dict, lr: float, out: Path):
    """The CompressConfig of one unit: the flow's defaults except the study's sizes and the method."""
    from iterabre.config import CompressConfig, RecoveryConfig

    return CompressConfig(model=s["model"], target_layers=30 - unit["blocks"], **METHODS[unit["method"]],
                          calibration_tokens=s["calib_tokens"], recovery_tokens=unit["budget"],
                          seq_len=s["seq_len"], seed=unit["seed"], final_share=s["final_share"],
                          adaptive_eval_tokens=s["adaptive_eval_tokens"], device="cpu", eval_tasks="",
                          output=str(out), recovery=RecoveryConfig(lr=lr, seed=unit["seed"]))


def phase_summary(report: dict) -> list[dict]:
    """Per recovery phase: what was removed, tokens given/used, held-out KD loss before/after."""
    keep = ("loss_before", "loss_after", "tokens", "seconds", "stopped_early", "aborted")
    return [{"removed": p["removed"], "budget": p["budget"], **{k: p["recovery"].get(k) for k in keep}}
            for p in common.recovery_phases(report)]


def run_unit(unit: dict, s: dict, lr: float, work: Path) -> dict:
    """One compression job through the flow, then the study's evaluation of its final model."""
    from quality import evaluate_saved, headline

    out = work / unit["id"].replace("/", "_")
    start = time.perf_counter()
    report = common.run_flow(job_config(unit, s, lr, out))
    ev = evaluate_saved(report["final_dir"], s["eval"], s)
    shutil.rmtree(out, ignore_errors=True)
    return {**unit, "lr": lr, "removed": report["removed_layers"], "recovery": phase_summary(report),
            "tokens_used": report["budget"]["used_total"], "eval": ev, **headline(ev),
            "seconds": time.perf_counter() - start}


def run_base(s: dict) -> dict:
    """The unpruned model under the same evaluation."""
    from quality import evaluate_saved, headline

    ev = evaluate_saved(s["model"], s["eval"], s)
    return {"id": "base", "exp": "base", "method": "base", "removed": [], "eval": ev, **headline(ev)}


# ---------------------------------------------------------------- tables

METRICS = (("wikitext_word_ppl", "wiki ppl"), ("blimp_acc", "BLiMP"), ("xcopa_acc", "XCOPA"), ("avg_acc", "avg acc"))


def mean_spread(values: list[float]) -> str:
    """'0.712 ± 0.014 (n=3)': mean ± sample standard deviation over seeds."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {spread:.2g} (n={len(values)})"


def _final_kd(u: dict) -> float | None:
    """Held-out KD loss after the job's last recovery phase."""
    return u["recovery"][-1]["loss_after"] if u.get("recovery") else None


def shown_metrics(units: dict) -> list[tuple[str, str]]:
    """The METRICS some unit has (XCOPA only when it was evaluated)."""
    return [(k, label) for k, label in METRICS if any(u.get(k) is not None for u in units.values())]


def main_rows(units: dict, metrics: list, exp: str = "main") -> list[list]:
    """One row per method: mean ± spread over seeds of every metric and the final held-out KD loss."""
    rows = []
    for m in METHODS:
        runs = [u for u in units.values() if u["exp"] == exp and u["method"] == m]
        if runs:
            rows.append([m, *[mean_spread([u[k] for u in runs]) for k, _ in metrics],
                         mean_spread([_final_kd(u) for u in runs]), " / ".join(",".join(map(str, u["removed"]))
                                                                                for u in runs)])
    return rows


def paired_rows(units: dict, metrics: list, reference: str = "oneshot-output", exp: str = "main") -> list[list]:
    """Each method minus `reference` on the same seed (same data), mean ± spread over seeds."""
    by = {(u["method"], u["seed"]): u for u in units.values() if u["exp"] == exp}
    rows = []
    for m in METHODS:
        pairs = [(by[(m, seed)], by[(reference, seed)]) for (mm, seed) in by if mm == m and (reference, seed) in by]
        if pairs and m != reference:
            rows.append([f"{m} - {reference}", *[mean_spread([a[k] - b[k] for a, b in pairs
                                                              if a[k] is not None and b[k] is not None])
                                                 for k, _ in metrics]])
    return rows


def single_rows(units: dict, exps: tuple[str, ...]) -> list[list]:
    """One row per unit (lm-eval stderr as ±) for the single-seed experiments and the base."""
    from quality import _pm

    return [[uid, u.get("lr"), u.get("tokens_used"), u["wikitext_word_ppl"], _pm(u["blimp_acc"], u["blimp_stderr"]),
             _pm(u["xcopa_acc"], u["xcopa_stderr"]), u["avg_acc"], _final_kd(u), ",".join(map(str, u["removed"]))]
            for uid, u in units.items() if u["exp"] in exps]


SINGLE_COLUMNS = ["unit", "lr", "KD tokens", "wiki ppl", "BLiMP ± se", "XCOPA ± se", "avg acc", "held-out KD",
                  "removed"]


def report_tables(s: dict, units: dict) -> list[tuple[str, list[str], list[list]]]:
    """Every table of the study as (title, columns, rows); printed here, rendered as Markdown by render.py."""
    metrics = shown_metrics(units)
    names = [label for _, label in metrics]
    tables = [(f"Base and lr check (one-shot output, {s['blocks']} blocks, seed 0)", SINGLE_COLUMNS,
               single_rows(units, ("base", "lr"))),
              (f"Main ({s['blocks']} blocks, {s['budget']} KD tokens, mean ± sd over seeds {s['seeds']})",
               ["method", *names, "held-out KD", "removed per seed"], main_rows(units, metrics)),
              ("Paired by seed (same data), method minus one-shot output", ["difference", *names],
               paired_rows(units, metrics))]
    tables += [(f"{exp} (single seed)", SINGLE_COLUMNS, single_rows(units, (exp,))) for exp in ("deep", "large")]
    return tables


def print_report(s: dict, units: dict) -> None:
    """Every table of the study from the finished units."""
    for title, columns, rows in report_tables(s, units):
        common.print_table(title, columns, rows)


# ---------------------------------------------------------------- driver

NOTES = ("mean ± sample sd over seeds; per-unit ± is lm-eval's stderr; "
         "held-out KD = KL(base || final) on held-out wikitext-2 valid windows")


def load_previous(name: str, s: dict) -> dict:
    """Finished units from an earlier run with identical settings (common.previous's resume rule)."""
    return common.previous(name, s).get("units", {})


def save(name: str, s: dict, unit: dict, pending: list[str]) -> dict:
    """Add one finished unit to the result file, merged with what is in it: two processes may share
    it (e.g. `--experiments deep,large` on the second core)."""
    return common.save_units(name, s, {unit["id"]: unit}, pending, NOTES, merge=True)


def cannot_stop_early(unit: dict, s: dict) -> bool:
    """An adaptive unit whose steps are at most one held-out check long: its only check would fall
    after a step's last update, where none is taken, so it trains exactly like `equal` (tested in
    tests/test_budget.py; nothing is ever carried)."""
    per_step = -(-unit["budget"] // unit["blocks"])  # one block per step; largest share, rounded up
    return METHODS[unit["method"]]["budget_schedule"] == "adaptive" and per_step <= s["adaptive_eval_tokens"]


def finished_twin(units: dict, unit: dict, lr: float, s: dict) -> dict | None:
    """A finished unit that is the very same job (method, seed, blocks, budget, lr): runs are
    deterministic, so e.g. the lr check's winner is reused as main/oneshot-output/s0, and an
    adaptive unit that cannot stop early is its `iter-equal` twin."""
    key = lambda u: (u.get("method"), u.get("seed"), u.get("blocks"), u.get("budget"), u.get("lr"))  # noqa: E731
    wanted = {**unit, "lr": lr, **({"method": "iter-equal"} if cannot_stop_early(unit, s) else {})}
    return next((u for u in units.values() if key(u) == key(wanted)), None)


def run_all(name: str, s: dict, plan: list[dict]) -> dict:
    """Run the base and every planned unit not finished yet, saving each at once."""
    by_id = {u["id"]: u for u in plan}

    def run(uid: str, units: dict, work: Path) -> dict:
        if uid == "base":
            return run_base(s)
        unit = by_id[uid]
        lr = unit.get("lr") or chosen_lr(units, s)
        twin = finished_twin(units, unit, lr, s)
        if twin is None:
            return run_unit(unit, s, lr, work)
        print(f"[same] {uid} = {twin['id']}", flush=True)
        return {**twin, **unit, "lr": lr, "same_as": twin["id"]}

    # saving re-reads the file, so it also picks up what another process finished
    return common.run_units(["base", *by_id], load_previous(name, s), run,
                            lambda uid, done: save(name, s, done, list(by_id)))


def main() -> None:
    """Run what is not finished, saving after each unit; then print the tables."""
    args = parse_args()
    common.apply_threads(args.threads)
    s, name = settings(args), common.result_name(args, "budget_study")
    units = load_previous(name, s)
    if not args.report_only:
        experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
        units = run_all(name, s, plan_units(s, experiments))
    print_report(s, units)
    print(f"wrote {common.result_path(name)}")


if __name__ == "__main__":
    main()
