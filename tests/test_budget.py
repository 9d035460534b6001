"""Quality at equal budget: budget schedules, adaptive early stopping + carry, teacher choice, data ranges."""

import copy

import pytest
import torch

from iterabre import planning, steps
from iterabre.config import BUDGET_SCHEDULES, CompressConfig, RecoveryConfig, validate
from iterabre.errors import IterabreError
from iterabre.recovery import Plateau, plateaued, plan_steps, recover, within_budget
from iterabre.surgery import remove_blocks
from iterabre.tiny import byte_tokenizer, tiny_model


def _cfg(**kw) -> CompressConfig:
    """A config whose micro-batch is 1 x 32 tokens, so budgets are multiples of 32."""
    base = dict(model="x", target_layers=4, calibration_tokens=128, recovery_tokens=1024, seq_len=32,
                eval_tasks="", device="cpu", schedule="iterative",
                recovery=RecoveryConfig(method="kd", batch_size=1))
    return CompressConfig(**{**base, **kw})


# ---------------------------------------------------------------- schedules (pure)

@pytest.mark.parametrize("total, n, batch", [(1000, 4, 1), (1001, 3, 4), (8192, 6, 4), (7, 5, 1), (8192, 4, 4)])
def test_every_schedule_spends_exactly_the_total_in_whole_micro_batches(total, n, batch):
    unit = 32 * batch
    for schedule in BUDGET_SCHEDULES:
        plan = planning.budget_plan(_cfg(recovery_tokens=total, budget_schedule=schedule,
                                      recovery=RecoveryConfig(batch_size=batch)), n)
        assert len(plan["steps"]) == n and min(plan["steps"]) >= 0
        assert all(b % unit == 0 for b in plan["steps"] + [plan["final"]]), schedule
        assert sum(plan["steps"]) + plan["final"] == plan["usable"] == total - total % unit, schedule


def test_phases_train_exactly_their_budget_so_schedules_compare_at_equal_tokens():
    """plan_steps on full windows spends a whole-micro-batch budget exactly (no round-up)."""
    plan = planning.budget_plan(_cfg(recovery_tokens=8192, budget_schedule="increasing", seq_len=128,
                                  recovery=RecoveryConfig(batch_size=4)), 4)
    mask = torch.ones(64, 128, dtype=torch.long)
    used = [sum(int(mask[i].sum()) for micro in plan_steps(mask, 4, 1, budget, seed=0) for i in micro)
            for budget in plan["steps"]]
    assert used == plan["steps"] and sum(used) == 8192
    assert plan["steps"] == sorted(plan["steps"]) and plan["steps"][0] < plan["steps"][-1]


def test_schedule_shapes():
    equal = planning.step_budgets(1000, 4, "equal")
    assert equal == [250, 250, 250, 250]
    increasing = planning.step_budgets(1000, 4, "increasing")
    assert increasing == [100, 200, 300, 400]  # weights 1..S
    final = planning.budget_plan(_cfg(recovery_tokens=1280, budget_schedule="final", final_share=0.2), 4)
    assert final["steps"] == [256, 256, 256, 256] and final["final"] == 256 and final["carry_pool"] == 0
    adaptive = planning.budget_plan(_cfg(budget_schedule="adaptive"), 4)
    assert adaptive["steps"] == [256, 256, 256, 256] and adaptive["final"] == 0
    assert adaptive["carry_pool"] == 768  # at most everything but the last share can be carried
    assert planning.data_budgets(adaptive) == [256, 256, 256, 256, 768]
    assert planning.data_budgets(final) == [256, 256, 256, 256, 256]
    assert planning.step_budgets(1000, 4, "increasing", unit=128) == [128, 128, 256, 384]  # 7 units: 1,1,2,3


def test_one_shot_gets_the_whole_budget_in_its_single_recovery():
    cfg = _cfg(target_layers=2, schedule="one-shot")
    n = len(planning.num_steps_for(cfg, 6))
    for schedule in BUDGET_SCHEDULES:
        plan = planning.budget_plan(_cfg(budget_schedule=schedule), n)
        assert plan["steps"] == [1024] and plan["final"] == 0 and plan["carry_pool"] == 0, schedule


def test_unknown_schedule_is_refused_before_compute_with_the_valid_names():
    with pytest.raises(IterabreError) as info:
        validate(_cfg(budget_schedule="front-loaded"))
    message = str(info.value)
    assert "front-loaded" in message and all(name in message for name in BUDGET_SCHEDULES)
    with pytest.raises(IterabreError, match="budget_schedule"):
        planning.step_budgets(100, 2, "front-loaded")
    for bad in (dict(final_share=1.0), dict(final_share=-0.1), dict(adaptive_eval_tokens=0),
                dict(adaptive_tol=-1.0)):
        with pytest.raises(IterabreError):
            validate(_cfg(**bad))
    with pytest.raises(IterabreError, match="budget_schedule"):
        validate(_cfg(budget_schedule="linear"))  # a name that was never released is not an alias


def test_only_adaptive_turns_on_early_stopping():
    cfg = _cfg(budget_schedule="adaptive", adaptive_eval_tokens=256, adaptive_tol=0.05)
    rec = planning.step_recovery(cfg, 500)
    assert rec["tokens"] == 500 and rec["early_stop_tokens"] == 256 and rec["early_stop_tol"] == 0.05
    assert planning.step_recovery(_cfg(budget_schedule="final"), 500)["early_stop_tokens"] == 0
    RecoveryConfig(**rec)  # still a valid RecoveryConfig


# ---------------------------------------------------------------- adaptive rule (pure)

def test_plateau_rule():
    assert not plateaued([2.0], 0.01)  # nothing to compare yet
    assert not plateaued([2.0, 1.0], 0.01)  # halved: still learning
    assert plateaued([2.0, 1.0, 0.995], 0.01)  # 0.5% better than the best: below 1%
    assert plateaued([2.0, 1.0, 1.2], 0.01)  # worse than the best
    assert plateaued([1.0, 1.0], 0.0)  # no improvement at all, even with tol 0
    assert plateaued([1.0, float("nan")], 0.01)


def test_plateau_monitor_checks_every_n_tokens():
    losses = iter([1.0, 0.99])
    monitor = Plateau(lambda model: next(losses), every=100, tol=0.05, first=2.0)
    assert not monitor(None, 50)  # no check due yet
    assert not monitor(None, 100)  # 2.0 -> 1.0: improving
    assert not monitor(None, 150)
    assert monitor(None, 200)  # 1.0 -> 0.99: 1% < 5%
    assert monitor.checks == [(0, 2.0), (100, 1.0), (200, 0.99)]


def test_carry_forward_arithmetic():
    assert planning.next_carry(500, 128) == 372 and planning.next_carry(500, 640) == 0
    assert planning.carry_range((40, 64), 0, 32) is None
    assert planning.carry_range((40, 64), 100, 32) == (40, 44)  # ceil(100/32) windows
    assert planning.carry_range((40, 64), 10_000, 32) == (40, 64)  # never past the pool


def test_within_budget_never_overshoots():
    mask = torch.ones(10, 32, dtype=torch.long)
    planned = plan_steps(mask, batch_size=3, grad_accum=1, budget=200, seed=0)  # 96-token steps: 288 planned
    kept = within_budget(planned, mask, 200)
    assert len(planned) == 3 and len(kept) == 2  # 192 <= 200 < 288


# ---------------------------------------------------------------- adaptive recovery on a tiny model

@pytest.fixture(scope="module")
def pair():
    """(student without block 2, full teacher) of a 4-block tiny Llama."""
    teacher = tiny_model("llama", 4, seed=0)
    student = remove_blocks(copy.deepcopy(teacher), [2])
    return student, teacher


def _windows(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(seed))


def test_adaptive_recovery_stops_on_a_plateau_and_leaves_tokens(pair):
    student, teacher = pair
    ids, held = _windows(16, 0), _windows(4, 1)
    # lr ~ 0: the held-out loss cannot move, so the first check (after 64 tokens) is a plateau
    cfg = RecoveryConfig(tokens=256, batch_size=4, lr=1e-12, early_stop_tokens=64, early_stop_tol=0.01)
    result = recover(copy.deepcopy(student), teacher, ids, torch.ones_like(ids), cfg, [2],
                     heldout_ids=held, heldout_mask=torch.ones_like(held))
    assert result.stopped_early and not result.aborted
    assert result.tokens == 64 and len(result.heldout_checks) == 1
    assert planning.next_carry(cfg.tokens, result.tokens) == 192  # handed to the next step
    full = recover(copy.deepcopy(student), teacher, ids, torch.ones_like(ids),
                   RecoveryConfig(tokens=256, batch_size=4, lr=1e-12), [2],
                   heldout_ids=held, heldout_mask=torch.ones_like(held))
    assert not full.stopped_early and full.tokens == 256 and full.heldout_checks == []


def test_a_check_due_only_at_the_last_token_trains_exactly_like_no_early_stop(pair):
    """Why bench/budget_study.py reuses `equal` for an adaptive job whose steps are one check long."""
    student, teacher = pair
    ids, held = _windows(16, 0), _windows(4, 1)

    def run(**early):  # a real lr: the held-out loss moves, yet the only check would be at the very end
        model = copy.deepcopy(student)
        result = recover(model, teacher, ids, torch.ones_like(ids), RecoveryConfig(tokens=128, batch_size=4,
                         lr=1e-3, **early), [2], heldout_ids=held, heldout_mask=torch.ones_like(held))
        return model, result

    (checked, r1), (plain, r2) = run(early_stop_tokens=128, early_stop_tol=1e9), run()
    # tol 1e9 would call any check a plateau, but none is taken after the last optimizer step
    assert r1.tokens == r2.tokens == 128 and r1.heldout_checks == [] and not r1.stopped_early
    assert r1.loss_after == pytest.approx(r2.loss_after)
    for a, b in zip(checked.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- data ranges


def _span(entry) -> range:
    return range(*entry["windows"])


def test_data_layout_names_the_windows_really_used(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from iterabre.data import load_documents, token_windows

    cfg = _cfg(calibration_tokens=96, budget_schedule="adaptive", recovery_tokens=128)
    plan = planning.budget_plan(cfg, 2)
    data = steps.load_data(steps.prepare_data(cfg, tiny_model_dir, tmp_path, planning.data_budgets(plan)))
    layout = data["meta"]["split"]
    spans = [_span(layout[k]) for k in ("calibration", "recovery", "heldout")]
    assert [len(s) for s in spans] == [3, 2 + 2 + 2, 3]
    assert not set(spans[0]) & set(spans[1]) and not set(spans[1]) & set(spans[2])
    assert layout["source"] == "wikitext-2 valid" and "wikitext-2 test" in layout["evaluation"]
    # The positions are true: they index one seeded permutation of the valid-text windows.
    windows = token_windows(AutoTokenizer.from_pretrained(str(tiny_model_dir)), load_documents("wikitext", "valid"), 32)
    order = torch.randperm(layout["windows_available"], generator=torch.Generator().manual_seed(cfg.seed))
    for key, name in (("calib", "calibration"), ("recovery", "recovery"), ("heldout", "heldout")):
        assert torch.equal(data[key], windows[order[_span(layout[name]).start:_span(layout[name]).stop]])
    step_windows = [planning.global_windows(layout, r) for r in data["recovery_ranges"]]
    assert all(set(range(*w)) <= set(spans[1]) for w in step_windows)


def test_calibration_and_heldout_text_do_not_depend_on_the_budget(tiny_model_dir, tmp_path):
    """Jobs with other budgets / schedules are scored and held out on the same text (same seed)."""
    made = []
    for i, (tokens, schedule) in enumerate([(128, "equal"), (1024, "adaptive")]):
        cfg = _cfg(calibration_tokens=96, recovery_tokens=tokens, budget_schedule=schedule)
        budgets = planning.data_budgets(planning.budget_plan(cfg, 2))
        made.append(steps.load_data(steps.prepare_data(cfg, tiny_model_dir, tmp_path / str(i), budgets)))
    assert made[0]["recovery"].shape[0] < made[1]["recovery"].shape[0]
    assert torch.equal(made[0]["calib"], made[1]["calib"]) and torch.equal(made[0]["heldout"], made[1]["heldout"])
    assert torch.equal(made[0]["recovery"], made[1]["recovery"][:made[0]["recovery"].shape[0]])


def test_evaluation_reads_the_test_split_only():
    from iterabre.evaluation.tasks import utils as task_utils

    assert task_utils.task_data_path("wikitext").name == "test.parquet"


def test_extra_range_adds_carry_windows(tiny_model_dir, tmp_path, monkeypatch):
    import iterabre.recovery

    seen = {}

    def fake_recover(student, teacher, ids, mask, cfg, removed, **kw):
        seen["ids"] = ids
        return iterabre.recovery.RecoveryResult(method="kd", trainable="all")

    monkeypatch.setattr(iterabre.recovery, "recover", fake_recover)
    data = steps.prepare_data(_cfg(), tiny_model_dir, tmp_path, budgets=[64, 64, 64])
    windows = steps.load_data(data)["recovery"]
    steps.recover(tiny_model_dir, tiny_model_dir, data, {}, [], (0, 2), tmp_path / "out", "cpu", extra_range=(4, 6))
    assert torch.equal(seen["ids"], torch.cat([windows[0:2], windows[4:6]]))


# ---------------------------------------------------------------- the flow: final phase, teacher, carry

def _flow_config(model_dir, output, **kw) -> CompressConfig:
    """6 -> 4 blocks in two steps on a tiny model, 128-token micro-batches, no evaluation."""
    base = dict(model=str(model_dir), target_layers=4, calibration_tokens=128, seq_len=32, eval_tasks="",
                device="cpu", output=str(output), schedule="iterative",
                recovery=RecoveryConfig(method="kd", batch_size=4, lr=1e-3))
    return CompressConfig(**{**base, **kw})


def _assert_disjoint_windows(report: dict) -> None:
    """Calibration, recovery and held-out ranges are disjoint; every phase trains inside recovery."""
    split = report["data_split"]
    calib, rec, held = (set(_span(split[k])) for k in ("calibration", "recovery", "heldout"))
    assert calib and rec and held and not (calib & rec) and not (rec & held) and not (calib & held)
    phases = report["steps"] + ([report["final_recovery"]] if report["final_recovery"] else [])
    for phase in phases:
        assert all(set(range(*w)) <= rec for w in phase["recovery_windows"])


@pytest.mark.slow
def test_flow_final_phase_with_previous_teacher(tiny_model_dir, tmp_path):
    from flows import tracking
    from flows.compress import run_from_cli

    cfg = _flow_config(tiny_model_dir, tmp_path / "out", recovery_tokens=512, budget_schedule="final",
                       final_share=0.25, teacher="previous")
    report = run_from_cli(cfg)
    assert report["budget"]["steps"] == [128, 256] and report["budget"]["final"] == 128  # 4 micro-batches of 128
    assert [s["teacher"] for s in report["steps"]] == ["previous", "previous"]
    assert [s["teacher_layers"] for s in report["steps"]] == [6, 5]  # the model before each removal
    final = report["final_recovery"]
    assert final["removed"] == [] and final["num_layers"] == 4 and final["teacher_layers"] == 5
    assert final["checkpoint"].endswith("final-recovery") and final["recovery"]["tokens"] == 128
    assert report["budget"]["used"] == [128, 256, 128] and report["budget"]["used_total"] == 512  # no overspend
    windows = [tuple(w) for s in report["steps"] + [final] for w in s["recovery_windows"]]
    assert len(windows) == 3 and all(a[1] <= b[0] for a, b in zip(windows, windows[1:]))  # disjoint, in order
    _assert_disjoint_windows(report)
    client = tracking.connect()
    children = client.search_runs([client.get_run(report["mlflow_run_id"]).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{report['mlflow_run_id']}'",
                                  order_by=["tags.`iterabre.step` ASC"])
    assert [c.info.run_name for c in children] == ["step-01", "step-02", "final-recovery"]
    assert {c.data.tags[tracking.TAG_TEACHER] for c in children} == {"previous"}
    assert {c.data.params["teacher"] for c in children} == {"previous"}


@pytest.mark.slow
def test_flow_adaptive_carries_unused_tokens_forward(tiny_model_dir, tmp_path):
    from flows.compress import run_from_cli

    # tol 1e9: every check counts as a plateau, so each step stops at its first check (128 tokens)
    cfg = _flow_config(tiny_model_dir, tmp_path / "out", recovery_tokens=768, budget_schedule="adaptive",
                       adaptive_eval_tokens=128, adaptive_tol=1e9)
    report = run_from_cli(cfg)
    first, second = report["steps"]
    assert first["recovery"]["stopped_early"] and first["recovery"]["tokens"] == 128
    assert first["budget"] == 384 and first["carried_in"] == 0 and len(first["recovery_windows"]) == 1
    assert second["carried_in"] == 256 and second["budget"] == 384 + 256
    assert len(second["recovery_windows"]) == 2  # its own windows + 8 carry-pool windows
    assert report["budget"]["used_total"] == first["recovery"]["tokens"] + second["recovery"]["tokens"] <= 768
    assert report["final_recovery"] is None
    _assert_disjoint_windows(report)
