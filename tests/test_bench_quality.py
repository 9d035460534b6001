"""bench/quality.py: every method is a CompressConfig run through the flow; the result file still resumes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402
import quality  # noqa: E402

from iterabre import planning  # noqa: E402
from iterabre.config import validate  # noqa: E402

FULL = {"model": "smollm2-135m", "blocks": 6, "budget": 24576, "calib_tokens": 1024, "seq_len": 128,
        "eval": {"wikitext": 3}, "curve_eval": {"wikitext": 2}, "oneshot_ks": [2, 4, 6], "seed": 0}


def _settings(argv: list[str]) -> dict:
    old = sys.argv
    sys.argv = ["quality.py", *argv]
    try:
        return quality.settings(quality.parse_args())
    finally:
        sys.argv = old


@pytest.mark.parametrize("argv, name", [([], "quality"), (["--quick"], "quality-quick")])
def test_saved_results_still_resume(argv, name):
    """The settings of an unchanged run are those the stored file was made with, so its units are skipped."""
    from iterabre.files import read_json

    path = common.REPO / "bench" / "results" / f"{name}.json"
    if not path.exists():
        pytest.skip(f"no {path}")
    assert read_json(path)["settings"] == _settings(argv)


def _plan(cfg) -> dict:
    return planning.budget_plan(cfg, len(planning.num_steps_for(cfg, 30)))


def test_each_method_is_a_valid_job_with_its_recovery(monkeypatch, tmp_path):
    monkeypatch.setattr(quality, "base_layers", lambda model: 30)
    for uid, method in quality.plan_units(list(quality.METHODS)):
        if uid == "base":
            continue
        scorer, schedule, recovery, _ = quality.unit_spec(uid, method)
        cfg = quality.job_config(FULL, scorer, schedule, recovery, 6, tmp_path)
        validate(cfg)
        assert (cfg.target_layers, cfg.scorer, cfg.schedule, cfg.eval_tasks) == (24, scorer, schedule, "")
        plan = _plan(cfg)
        if recovery == "none":
            assert cfg.recovery.method == "none" and sum(plan["steps"]) + plan["final"] == 0
        else:
            assert cfg.recovery.method == "kd" and sum(plan["steps"]) + plan["final"] == 24576
    iterabre = quality.job_config(FULL, "output", "iterative", "each-step", 6, tmp_path)
    assert _plan(iterabre)["steps"] == [4096] * 6 and _plan(iterabre)["final"] == 0


@pytest.mark.parametrize("budget, batch, seq_len", [(24576, None, 128), (1024, None, 64), (2_500_000, 32, 128),
                                                    (512, None, 64)])
def test_kd_at_end_spends_the_whole_budget_after_the_last_removal(monkeypatch, tmp_path, budget, batch, seq_len):
    monkeypatch.setattr(quality, "base_layers", lambda model: 30)
    s = {**FULL, "budget": budget, "seq_len": seq_len, **({"kd_batch_size": batch} if batch else {})}
    iterative = quality.job_config(s, "perplexity", "iterative", "at-end", 6, tmp_path)
    plan = _plan(iterative)
    assert plan["steps"] == [0] * 6 and plan["final"] == plan["usable"] > 0  # nothing trains between removals
    one_shot = quality.job_config(s, "angular", "one-shot", "at-end", 6, tmp_path)
    assert _plan(one_shot)["steps"] == [plan["usable"]] and _plan(one_shot)["final"] == 0


def _fake_report(cfg, out: Path) -> dict:
    """What the flow reports for `cfg`: removes blocks 10, 11, ... one step at a time (one-shot: one step)."""
    k = 30 - cfg.target_layers
    groups = [[10 + i] for i in range(k)] if cfg.schedule == "iterative" else [list(range(10, 10 + k))]
    trains = cfg.recovery.method != "none"
    at_end = cfg.budget_schedule == "final" and len(groups) > 1
    steps = [{"removed": g, "checkpoint": str(out / f"step-{i}"),
              "recovery": {"tokens": cfg.recovery_tokens // len(groups) if trains and not at_end else 0,
                           "loss_before": 2.0, "loss_after": 1.0, "extra": "dropped"}}
             for i, g in enumerate(groups, 1)]
    final = {"removed": [], "recovery": {"tokens": cfg.recovery_tokens, "loss_after": 0.5}} if at_end else None
    return {"steps": steps, "final_recovery": final, "removed_layers": [i for g in groups for i in g],
            "final_dir": str(out / "final")}


@pytest.fixture
def fake_flow(monkeypatch):
    """run_flow and the evaluation replaced: records each job's config and each evaluated model."""
    jobs, evaluated = [], []

    def run_flow(cfg, **options):
        jobs.append(cfg)
        return _fake_report(cfg, Path(cfg.output))

    def evaluate_saved(model, limits, s):
        evaluated.append((Path(model).name, dict(limits)))
        return {"wikitext": {"word_perplexity": 30.0}, "blimp": {"acc": 0.7, "acc_stderr": 0.01}}

    monkeypatch.setattr(common, "run_flow", run_flow)
    monkeypatch.setattr(quality, "evaluate_saved", evaluate_saved)
    monkeypatch.setattr(quality, "base_layers", lambda model: 30)
    return jobs, evaluated


def test_iterative_unit_evaluates_every_step_checkpoint(fake_flow, tmp_path):
    jobs, evaluated = fake_flow
    unit = quality.run_unit("iterabre", "iterabre", FULL, tmp_path)
    assert len(jobs) == 1 and jobs[0].budget_schedule == "equal" and jobs[0].recovery_tokens == 24576
    assert [p["blocks_removed"] for p in unit["curve"]] == [1, 2, 3, 4, 5, 6]
    assert unit["curve"][2]["removed"] == [10, 11, 12] and unit["removed"] == list(range(10, 16))
    assert evaluated == [(f"step-{i}", FULL["curve_eval"]) for i in range(1, 7)] + [("final", FULL["eval"])]
    assert len(unit["recovery"]) == 6 and unit["recovery_tokens"] == 24576
    assert set(unit["recovery"][0]) == set(quality.RECOVERY_KEYS)
    assert unit["label"].startswith("IteRABRe") and unit["wikitext_word_ppl"] == 30.0 and unit["seconds"] >= 0


def test_one_shot_unit_runs_one_job_per_curve_point(fake_flow, tmp_path):
    jobs, evaluated = fake_flow
    unit = quality.run_unit("angular", "angular", FULL, tmp_path)
    assert [30 - c.target_layers for c in jobs] == [2, 4, 6] and {c.recovery.method for c in jobs} == {"none"}
    assert [p["blocks_removed"] for p in unit["curve"]] == [2, 4, 6]
    assert unit["recovery"] == [] and unit["recovery_tokens"] == 0 and unit["removed"] == list(range(10, 16))


def test_kd_row_is_one_job_with_one_healed_point(fake_flow, tmp_path):
    jobs, evaluated = fake_flow
    unit = quality.run_unit("perplexity+kd", "perplexity", FULL, tmp_path)
    assert len(jobs) == 1 and (jobs[0].schedule, jobs[0].budget_schedule) == ("iterative", "final")
    assert [p["blocks_removed"] for p in unit["curve"]] == [6] and evaluated[0][0] == "final"
    assert unit["recovery_tokens"] == 24576 and len(unit["recovery"]) == 1  # the 0-token steps are left out
    assert unit["label"] == "SLEB-style perplexity, iterative + KD"


def test_run_all_saves_after_each_unit_and_resumes(fake_flow, tmp_path, monkeypatch):
    jobs, _ = fake_flow
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "machine_info", lambda: {})
    monkeypatch.setattr(common, "fresh_stores", lambda: (tmp_path / "work").mkdir(exist_ok=True) or tmp_path / "work")
    plan = quality.plan_units(["output"])
    units = quality.run_all("q", FULL, {}, plan)
    assert list(units) == ["base", "output"] and common.previous("q", FULL)["units"] == units
    assert len(jobs) == 1
    again = quality.run_all("q", FULL, common.previous("q", FULL)["units"], plan)
    assert again == units and len(jobs) == 1  # nothing ran twice


# ---------------------------------------------------------------- through the real flow (tiny model)

def test_units_through_the_flow_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    """The configs run in the real flow: +KD prunes exactly like its baseline and trains only at the end."""
    evaluated = []
    def evaluate_saved(model, limits, s):
        assert (Path(model) / "config.json").exists()
        evaluated.append(Path(model))
        return {}

    monkeypatch.setattr(quality, "evaluate_saved", evaluate_saved)
    s = {**FULL, "model": str(tiny_model_dir), "blocks": 2, "budget": 512, "calib_tokens": 128, "seq_len": 64,
         "oneshot_ks": [1, 2]}
    plain = quality.run_unit("perplexity", "perplexity", s, tmp_path)
    healed = quality.run_unit("perplexity+kd", "perplexity", s, tmp_path)
    assert healed["removed"] == plain["removed"] and len(plain["removed"]) == 2
    assert plain["recovery_tokens"] == 0 and [p["blocks_removed"] for p in plain["curve"]] == [1, 2]
    assert healed["recovery_tokens"] == 512 and len(healed["recovery"]) == 1
    assert len(evaluated) == 2 + 1 + 1 + 1  # every model existed when it was evaluated
    assert not list(tmp_path.glob("perplexity*"))  # job folders are removed after their unit


# ---------------------------------------------------------------- equal compute

def test_the_default_recipe_is_what_compress_runs_by_default():
    """docs/BENCHMARKS.md measures DEFAULT_RECIPE against the baselines: it must be the CLI's defaults."""
    from iterabre.config import CompressConfig

    (scorer, schedule, method, _), overrides = quality.recipe(quality.DEFAULT_RECIPE)
    cfg = CompressConfig()
    assert (cfg.scorer, cfg.schedule, cfg.recovery.method) == (scorer, schedule, method)
    assert overrides.get("lr", common.TABLE_LR) == cfg.recovery.lr  # the tables' rows name their lr
    assert set(overrides) <= {"lr"}  # every other knob at the library's default


def test_the_docs_measure_the_default_at_the_calibration_size_compress_uses():
    """BENCHMARKS §5 names the default's recipe at compress's own calibration size: that size is the CLI's."""
    import re

    text = (common.REPO / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(" + re.escape(quality.DEFAULT_RECIPE) + r"@calibration_tokens=\d+)`", text))
    assert named == {quality.default_as_run()}


@pytest.mark.parametrize("scorer, n", [("output", 1), ("block-influence", 1), ("angular", 2), ("perplexity", 1)])
def test_planned_scoring_flops_match_what_the_flow_measures(tiny_model_dir, tmp_path, scorer, n):
    """The budget solver's scoring prediction is the count of what the streamed scorer runs (perplexity: less
    the two LM heads of its identity-pass check over the first batch, which the prediction leaves out)."""
    import torch

    from iterabre import steps

    seq, windows = 16, 8
    ids = torch.randint(0, 256, (windows, seq), generator=torch.Generator().manual_seed(0))
    torch.save({"calib": ids}, tmp_path / "data.pt")
    measured = steps.score(tiny_model_dir, tmp_path / "data.pt", scorer, n, "cpu")["flops"]
    sh = quality.shapes(str(tiny_model_dir), seq)
    s = {"calib_tokens": windows * seq, "seq_len": seq, "blocks": n}
    check = 2 * 4 * seq * sh.head if scorer == "perplexity" else 0  # first batch: 4 windows (scorer default)
    assert quality.scoring_flops(sh, s, scorer, "one-shot") == measured - check


def test_recipe_variants_change_one_knob_and_bad_ones_stop():
    assert quality.recipe("oneshot-kd@lr=2e-4") == (quality.EQUAL_RECIPES["oneshot-kd"], {"lr": 2e-4})
    assert quality.recipe("sleb-kd") == (quality.EQUAL_RECIPES["sleb-kd"], {})
    assert quality.recipe("oneshot-block-recon@calibration=self-generated")[1] == {"calibration": "self-generated"}
    assert quality.recipe("oneshot-block-recon+kd@block_recon_blocks=both")[1] == {"block_recon_blocks": "both"}
    assert quality.recipe("angular-reconstruct+kd@reconstruct_tokens=2048")[1] == {"reconstruct_tokens": 2048}
    assert quality.recipe("oneshot-block-recon+kd@kd_share=0.75")[1] == {"kd_share": 0.75}
    assert quality.recipe("angular-reconstruct+kd@ridge=1")[1] == {"ridge": 1.0}
    for bad in ("oneshot-kd@kd_share=0.5", "oneshot-block-recon+kd@kd_share=1", "oneshot-block-recon+kd@kd_share=0",
                "nope", "oneshot-kd@lx=1", "oneshot-kd@lr=", "oneshot-kd@calibration=books",
                "oneshot-block-recon@block_recon_blocks=after", "oneshot-kd@calibration_tokens=many"):
        with pytest.raises(SystemExit):
            quality.recipe(bad)


def _tiny_equal(model_dir, tmp_path, monkeypatch) -> tuple[dict, list[int]]:
    """Equal-compute settings on the tiny model (2 of its blocks, 1,024 KD tokens' budget, evaluation
    stubbed) and its one-shot output removal."""
    monkeypatch.setattr(quality, "evaluate_saved", lambda model, limits, s: {})
    s = {"model": str(model_dir), "blocks": 2, "calib_tokens": 128, "seq_len": 32, "kd_batch_size": 2,
         "equal_kd_tokens": 1024, "seed": 0, "eval": {}}
    s["flops"] = quality.reference_flops(s)
    return s, quality._oneshot_removal(s, {}, tmp_path, "output")


@pytest.mark.parametrize("which", ["before", "both"])
def test_planned_block_recon_flops_match_what_the_flow_measures(tiny_model_dir, tmp_path, monkeypatch, which):
    """`@block_recon_blocks=both` trains the blocks on both sides of each gap: the plan counts them, and the
    flow's measured FLOPs (less the report-only held-out KD checks) are what the plan predicted."""
    s, removed = _tiny_equal(tiny_model_dir, tmp_path, monkeypatch)
    unit = quality.equal_unit(f"oneshot-block-recon@block_recon_blocks={which}", s, tmp_path, removed)
    plan = unit["plan"]
    assert plan["feasible"] and plan["recovery"]["block_recon_blocks"] == which
    assert plan["recovery"]["block_recon_steps"] > 0
    assert unit["recovery_flops"] == plan["recovery_flops"]
    sh = quality.shapes(s["model"], s["seq_len"])
    step = lambda w: quality.block_recon_flops(sh, s, removed, 64, 1, w) - quality.block_recon_flops(sh, s, removed, 64, 0, w)  # noqa: E731
    assert step("both") > step("before")  # an Adam step trains two blocks at a gap with a kept block after it


def test_planned_reconstruct_kd_flops_match_what_the_flow_measures(tiny_model_dir, tmp_path, monkeypatch):
    """reconstruct+kd fits on the first `reconstruct_tokens` recovery windows and gives KD the rest of the
    budget: the flow's measured FLOPs (less the held-out KD checks) are the plan's, and the fit read that many."""
    s, removed = _tiny_equal(tiny_model_dir, tmp_path, monkeypatch)
    unit = quality.equal_unit("oneshot-reconstruct+kd@reconstruct_tokens=128", s, tmp_path, removed)
    plan, kd = unit["plan"], quality.equal_plan("oneshot-kd", s, None)
    assert plan["feasible"] and plan["recovery"]["reconstruct_tokens"] == 128
    assert 0 < plan["fields"]["recovery_tokens"] < kd["fields"]["recovery_tokens"]  # the fit's cost left less KD
    assert unit["recovery_flops"] == plan["recovery_flops"]
    assert unit["recovery"][0]["tokens"] == plan["fields"]["recovery_tokens"]  # KD read its whole budget ...
    assert unit["total_flops"] <= s["flops"]


def test_select_auto_runs_as_planned_through_the_flow(tiny_model_dir, tmp_path, monkeypatch):
    """select-auto: the plan's scoring bounds what the flow's passes and set walk ran (the walk's sets are
    predicted at their longest), its recovery is the method the chosen set's gaps call for, and the flow
    removes the set the bench scored beforehand."""
    s, _ = _tiny_equal(tiny_model_dir, tmp_path, monkeypatch)
    name = "select-auto@reconstruct_tokens=64"  # a fit this tiny budget affords, if the set is one run
    removed = quality._oneshot_removal(s, {}, tmp_path, "select", like=name)
    unit = quality.equal_unit(name, s, tmp_path, removed)
    plan = unit["plan"]
    sh = quality.shapes(s["model"], s["seq_len"])
    calib, L, k = s["calib_tokens"], sh.layers, s["blocks"]
    rules = sum(quality.scoring_flops(sh, s, r, "one-shot") for r in quality.SELECT_FROM.split(","))
    walk_bound = calib * (L + 2 * (L - k)) * sh.blk  # dense stream + each set's stream after its first block
    assert plan["scoring"] == rules + walk_bound
    assert rules + calib * L * sh.blk <= unit["scoring_flops"] <= plan["scoring"] + sh.blk * calib // 10
    assert unit["removed"] == removed and plan["recovery"]["method"] == "auto"
    gaps = len(quality._units(sh, removed))
    assert plan["method"] == ("reconstruct+kd" if gaps == 1 else "block-recon+kd")
    assert unit["total_flops"] <= s["flops"] * 1.01


def test_select_auto_is_sized_by_the_gaps_of_its_removal():
    """One contiguous run: planned as reconstruct+kd with the library's fit size; a scattered set: as
    block-recon+kd; the bench's select_from is the library's."""
    from iterabre.config import CompressConfig, RecoveryConfig

    s = {"model": "smollm2-135m", "blocks": 6, "calib_tokens": 1024, "seq_len": 128, "kd_batch_size": 4,
         "equal_kd_tokens": 24576}
    s["flops"] = quality.reference_flops(s)
    run = quality.equal_plan("select-auto@lr=2e-4", s, list(range(13, 19)))
    spread = quality.equal_plan("select-auto@lr=2e-4", s, [17, 14, 13, 12, 7, 5])
    assert run["method"] == "reconstruct+kd" and run["recovery"]["reconstruct_tokens"] == RecoveryConfig().reconstruct_tokens
    assert spread["method"] == "block-recon+kd" and spread["recovery"]["block_recon_steps"] > 0
    assert run["scoring"] == spread["scoring"] > quality.scoring_flops(quality.shapes(s["model"], 128), s, "output",
                                                                       "one-shot")
    assert quality.SELECT_FROM == CompressConfig().select_from


def test_a_recipes_own_calibration_size_is_planned_as_the_flow_runs_it(tiny_model_dir, tmp_path, monkeypatch):
    """`@calibration_tokens=N` scores on N tokens (and the flow's held-out set grows with it): the plan's
    scoring and recovery FLOPs are what the flow measured, and the larger scoring leaves less recovery."""
    monkeypatch.setattr(quality, "evaluate_saved", lambda model, limits, s: {})
    s = {"model": str(tiny_model_dir), "blocks": 2, "calib_tokens": 128, "seq_len": 32, "kd_batch_size": 2,
         "equal_kd_tokens": 4096, "seed": 0, "eval": {}}  # block-recon gets whole batches
    s["flops"] = quality.reference_flops(s)
    name = "oneshot-block-recon+kd@calibration_tokens=256"
    removed = quality._oneshot_removal(s, {}, tmp_path, "output", like=name)  # scored on its own 256 tokens
    unit = quality.equal_unit(name, s, tmp_path, removed)
    assert unit["removed"] == removed
    plan, base = unit["plan"], quality.equal_plan("oneshot-block-recon+kd", s, removed)
    sh = quality.shapes(s["model"], s["seq_len"])
    assert plan["fields"]["calibration_tokens"] == 256
    assert plan["scoring"] == quality.scoring_flops(sh, {**s, "calib_tokens": 256}, "output", "one-shot")
    assert unit["scoring_flops"] == plan["scoring"] == 2 * base["scoring"]
    assert unit["recovery_flops"] == plan["recovery_flops"]  # block-recon's held-out gap errors on 256 tokens
    assert plan["fields"]["recovery_tokens"] < base["fields"]["recovery_tokens"]
    assert unit["total_flops"] <= s["flops"]


def test_every_recipe_is_planned_within_the_budget_self_generated_text_included():
    """At the 6-block settings every feasible recipe is planned to spend at most the budget and nearly all
    of it; the self-generated variant pays for its text (scoring windows, then block-recon's) out of it."""
    s = {"model": "smollm2-135m", "blocks": 6, "calib_tokens": 1024, "seq_len": 128, "kd_batch_size": 4,
         "equal_kd_tokens": 24576}
    s["flops"] = quality.reference_flops(s)
    removed = [17, 14, 13, 12, 7, 5]
    plans = {r: quality.equal_plan(r, s, removed) for r in [*quality.EQUAL_RECIPES,
                                                              "oneshot-block-recon+kd@calibration=self-generated"]}
    for name, plan in plans.items():
        spent = plan["generation"] + plan["scoring"] + plan["recovery_flops"]
        if plan["feasible"]:
            assert 0.9 * s["flops"] < spent <= s["flops"], name
    more = quality.equal_plan("oneshot-block-recon+kd@kd_share=0.75", s, removed)  # KD gets 3/4 of what is left
    assert 0.9 * s["flops"] < more["scoring"] + more["recovery_flops"] <= s["flops"] and "kd_share" not in more["recovery"]
    assert more["fields"]["recovery_tokens"] > plans["oneshot-block-recon+kd"]["fields"]["recovery_tokens"] * 1.4
    assert more["recovery"]["block_recon_steps"] < plans["oneshot-block-recon+kd"]["recovery"]["block_recon_steps"]
    own, wiki = plans["oneshot-block-recon+kd@calibration=self-generated"], plans["oneshot-block-recon+kd"]
    sh = quality.shapes("smollm2-135m", 128)
    assert own["fields"]["calibration"] == "self-generated" and "calibration" not in own["recovery"]
    assert own["generation"] == (8 + 32) * 128 * sh.model(30) and wiki["generation"] == 0
    assert own["fields"]["recovery_tokens"] < wiki["fields"]["recovery_tokens"]  # fewer KD tokens left
    lsq = quality.equal_plan("oneshot-reconstruct+kd@calibration=self-generated", s, removed)
    assert lsq["generation"] == own["generation"] and lsq["recovery"]["reconstruct_tokens"] == 4096
    assert lsq["fields"]["recovery_tokens"] < plans["oneshot-reconstruct+kd"]["fields"]["recovery_tokens"]


def test_iterative_block_recon_kd_repairs_each_gap_within_the_budget(tiny_model_dir, tmp_path, monkeypatch):
    """The iterative recipe with the default's repair runs block-recon, then KD, after every removal, on
    an equal split; what the flow measured stays within the planned budget (its gaps are predicted from
    the one-shot removal, in the full-depth model) and spends most of it."""
    s, removed = _tiny_equal(tiny_model_dir, tmp_path, monkeypatch)
    unit = quality.equal_unit("iterative-block-recon+kd", s, tmp_path, removed)
    plan = unit["plan"]
    assert plan["feasible"] and plan["fields"]["schedule"] == "iterative"
    assert plan["fields"]["budget_schedule"] == "equal" and plan["recovery"]["block_recon_steps"] > 0
    phases = unit["recovery"]
    assert len(phases) == 2  # one phase per removal
    assert [p["tokens"] for p in phases] == [plan["fields"]["recovery_tokens"] // 2] * 2  # 384 = 2 x 3 micro-batches
    sh = quality.shapes(s["model"], s["seq_len"])
    for i, p in enumerate(phases, 1):  # more than its KD alone: block-recon ran at the step's gap first
        kd = p["tokens"] * quality.kd_per_token(sh, sh.layers - i)
        assert p["flops"] > kd + quality.report_checks(sh, s, sh.layers - i, "block-recon+kd")
    assert 0.5 * s["flops"] < unit["total_flops"] <= plan["scoring"] + plan["recovery_flops"] <= s["flops"]


def _seed_file(seed: int, ppl: dict, blimp: dict) -> dict:
    units = {k: {"feasible": True, "wikitext_word_ppl": v, "blimp_acc": blimp[k], "blimp_stderr": 0.015,
                 "xcopa_acc": 0.5, "kd_tokens": 0, "total_flops": 1.0, "seconds": 60.0} for k, v in ppl.items()}
    return {"settings": {"seed": seed, "blocks": 6, "flops": 1.0, "equal_kd_tokens": 1}, "units": units}


def test_depth_table_bolds_the_lowest_perplexity_and_names_what_did_not_run():
    sys.path.insert(0, str(common.REPO / "bench"))
    import render

    ref, short, ang = quality.DEFAULT_RECIPE, "shortgpt-kd@lr=2e-4", "angular-kd@lr=2e-4"
    assert render.DEPTH_RECIPES[2:] == (short, ang, "iterabre")  # the columns checked below
    brk, lsq = render.DEPTH_RECIPES[:2]
    six = [_seed_file(k, {ref: 48.0 + k, brk: 50.0, short: 49.0, ang: 47.0, "iterabre": 60.0},
                      {ref: 0.71, brk: 0.7, short: 0.70, ang: 0.73, "iterabre": 0.68}) for k in (0, 1)]
    ten = [_seed_file(0, {ref: 70.0, ang: 100.0, lsq: 90.0}, {ref: 0.67, ang: 0.66, lsq: 0.6})]
    lines = render.equal_depths([six, ten]).splitlines()
    assert lines[2] == "| 6 of 30 (2 seeds) | 48.5 ± 0.7 / 0.710 | 50.0 ± 0.0 / 0.700 | not run | " \
                       "49.0 ± 0.0 / 0.700 | **47.0 ± 0.0 / 0.730** | 60.0 ± 0.0 / 0.680 |"
    assert lines[3] == "| 6 of 30 (1 seed) | **70.0 / 0.670** | not run | 90.0 / 0.600 | not run | 100.0 / 0.660 | " \
                       "not run |"


def test_equal_seeds_table_states_whether_the_default_beats_each_baseline():
    sys.path.insert(0, str(common.REPO / "bench"))
    import render

    ref = quality.DEFAULT_RECIPE
    fast = "shortgpt-kd@lr=2e-4"  # a baseline at another lr is a baseline too
    low = "shortgpt-kd"  # lower perplexity than the default: its own verdicts follow the default's
    files = [_seed_file(0, {ref: 40.0, "iterabre": 50.0, "angular-kd": 40.5, "oneshot-kd": 45.0, fast: 43.0, low: 38.0},
                        {ref: 0.71, "iterabre": 0.72, "angular-kd": 0.71, "oneshot-kd": 0.72, fast: 0.71, low: 0.70}),
             _seed_file(1, {ref: 41.0, "iterabre": 52.0, "angular-kd": 40.9, "oneshot-kd": 46.0, fast: 44.0, low: 39.0},
                        {ref: 0.72, "iterabre": 0.70, "angular-kd": 0.72, "oneshot-kd": 0.71, fast: 0.72, low: 0.71})]
    text = render.equal_seeds(files)
    lines = {line.split(" (")[0]: line for line in text.splitlines() if line.startswith("- ")}
    assert "goal **met**" in lines[f"- {ref} vs iterabre"]  # 10.5 better, seed sd up to 1.4
    assert "goal **not met**" in lines[f"- {ref} vs angular-kd"]  # 0.2 better: inside the seed spread
    assert "goal **met**" in lines[f"- {ref} vs {fast}"]  # 3.0 better, seed sd up to 0.7
    assert "perplexity 2.0 worse" in lines[f"- {ref} vs {low}"] and "goal **not met**" in lines[f"- {ref} vs {low}"]
    nested = text.split(f"- The lowest perplexity here, {low}, against the published baselines:\n")[1]
    assert nested.startswith(f"  - {low} vs iterabre (2 seeds): perplexity 12.5 better")
    assert "perplexity 5.5 ± 0.7" in lines["- Iterative vs one-shot, output scorer and kd"]  # iterabre - oneshot-kd
    assert "| 40.5 ± 0.7 |" in text  # the default's mean ± sd
    other = render.DEPTH_RECIPES[0]  # a set the default did not run on: Δ against the block-recon recipe
    files = [_seed_file(k, {other: 40.0 + k, "iterabre": 50.0}, {other: 0.71, "iterabre": 0.70}) for k in (0, 1)]
    text = render.equal_seeds(files)
    assert f"Δ = recipe − {other} on the same seed" in text and f"- {other} vs iterabre (2 seeds)" in text
