"""Compression report: Markdown tables, retained percentages, importance grid and PNGs."""

import math

import matplotlib.image
import pytest

from iterabre.evaluation.report import (chance_lines, choice_summary, importance_matrix, render_markdown, retained,
                                        write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval(ppl, blimp, xcopa):
    return {"wikitext": {"word_perplexity": ppl, "byte_perplexity": 1.9, "bits_per_byte": 0.93},
            "blimp": {"acc": blimp, "acc_stderr": 0.01}, "xcopa": {"acc": xcopa, "acc_stderr": 0.02},
            "blimp_causative": {"acc": 0.9, "acc_stderr": 0.03}}


@pytest.fixture(scope="module")
def report():
    """6 blocks -> 3: step 1 removes block 4 (evaluated), step 2 removes 2 and 1 (not evaluated)."""
    return {
        "base_model": "tiny", "base_num_layers": 6, "final_num_layers": 3, "removed_layers": [4, 2, 1],
        "config": {}, "data_version": {"md5": "d41d8cd9", "dirty": False},
        "base_eval": _eval(20.0, 0.80, 0.56), "final_eval": _eval(40.0, 0.70, 0.49),
        "steps": [
            {"step": 1, "removed": [4], "num_layers": 5, "scores": {str(i): float(10 - i) for i in range(6)} | {"4": 0.5},
             "recovery": {"loss_before": 1.5, "loss_after": 0.75, "tokens": 4096, "seconds": 3.2},
             "eval": _eval(25.0, 0.76, 0.52)},
            {"step": 2, "removed": [2, 1], "num_layers": 3, "scores": {0: 3.0, 1: 1.0, 2: 1.0, 3: 2.0, 5: 9.0},
             "recovery": {"loss_before": 2.0, "loss_after": 0.9, "tokens": 4096, "seconds": 3.0}},
        ],
    }


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table as a list of rows of cells (header first, separator dropped)."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.fixture(scope="module")
def written(report, tmp_path_factory) -> list:
    """write_report's paths for `report` (rendered once: plotting costs seconds on 2 cores)."""
    return write_report(report, tmp_path_factory.mktemp("report") / "out")


def test_report_files_and_tables(written):
    paths = written
    assert [p.name for p in paths] == ["report.md", "importance.png", "metrics.png"]
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(p.name for p in paths)  # no temp files
    metrics, steps = _tables(paths[0].read_text())
    header, rows = metrics[0], {r[0]: dict(zip(metrics[0], r)) for r in metrics[1:]}
    assert list(rows) == ["base", "step 1", "final"]  # step 2 has no eval
    assert "wikitext ppl" in header and "blimp acc" in header and "xcopa acc" in header
    assert rows["step 1"]["blocks removed"] == "1" and rows["final"]["blocks"] == "3"
    assert rows["final"]["wikitext retained %"] == "50.0"  # base ppl 20 / final ppl 40
    assert rows["final"]["blimp retained %"] == "87.5"  # 0.70 / 0.80
    assert rows["base"]["xcopa retained %"] == "100.0"
    assert rows["step 1"]["blimp acc"] == "0.7600 ± 0.0100"
    assert [r[1] for r in steps[1:]] == ["4", "2, 1"]
    assert steps[1][3:5] == ["1.5000", "0.7500"]


def test_plots_are_valid_pngs(written):
    _, importance, metrics = written
    for path in (importance, metrics):
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width, _channels = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100


def test_importance_grid_marks_missing_blocks(report):
    grid = importance_matrix(report)
    assert grid.shape == (2, 6)
    assert not any(math.isnan(v) for v in grid[0])
    assert math.isnan(grid[1, 4]) and not math.isnan(grid[1, 5])  # block 4 gone after step 1
    assert grid[0, 4] == 0.0 and grid[0, 0] == 1.0  # removed block was the least important
    assert grid[1].tolist()[1] == grid[1].tolist()[2] == 0.0 and grid[1, 5] == 1.0


def test_report_without_evaluations(report, tmp_path):
    report = {**report, "base_eval": None, "final_eval": {}, "steps": [{**s, "eval": None} for s in report["steps"]]}
    paths = write_report(report, tmp_path)
    metrics, steps = _tables(paths[0].read_text())
    assert metrics == [["model", "blocks removed", "blocks"]] and len(steps) == 3
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths[1:])


def test_retained():
    assert retained(0.4, 0.8, True) == 50.0
    assert retained(40.0, 20.0, False) == 50.0
    assert retained(None, 0.8, True) is None and retained(0.5, None, True) is None


def test_already_pruned_base_keeps_original_numbering(tmp_path):
    # A base with blocks [0, 2, 5] left (3 blocks) from an earlier job: scores use original indices.
    report = {"base_model": "pruned", "base_num_layers": 3, "final_num_layers": 2, "removed_layers": [2],
              "base_eval": {}, "final_eval": {},
              "steps": [{"step": 1, "removed": [2], "num_layers": 2, "scores": {"0": 0.9, "2": 0.1, "5": 0.5},
                         "recovery": {}, "eval": None}]}
    grid = importance_matrix(report)
    assert grid.shape == (1, 6) and math.isnan(grid[0, 1]) and grid[0, 2] == 0.0 and grid[0, 0] == 1.0
    assert [p.name for p in write_report(report, tmp_path)] == ["report.md", "importance.png", "metrics.png"]


def test_report_states_teacher_budget_final_phase_and_disjoint_token_ranges(report, tmp_path):
    from iterabre.config import CompressConfig
    from iterabre.evaluation.report import render_markdown
    from iterabre.planning import global_windows, split_layout

    split = split_layout(CompressConfig(seq_len=128, seed=3), n_calib=2, n_recovery=64, available=500)
    steps = [{**s, "teacher": "base", "budget": 4096, "recovery_windows": [global_windows(split, (32 * i, 32 * i + 32))]}
             for i, s in enumerate(report["steps"])]
    final = {"step": 3, "name": "final-recovery", "removed": [], "num_layers": 3, "teacher": "base", "budget": 1024,
             "recovery": {"loss_before": 0.9, "loss_after": 0.8, "tokens": 1024, "seconds": 1.0},
             "recovery_windows": [global_windows(split, (64, 72))]}
    budget = {"schedule": "final", "total": 9216, "used": [4096, 4096, 1024], "used_total": 9216}
    compute = {"scoring_flops": 2.5e12, "recovery_flops": 10e12, "total_flops": 12.5e12}
    text = render_markdown({**report, "steps": steps, "final_recovery": final, "budget": budget, "data_split": split,
                            "compute": compute})
    _, table = _tables(text)
    assert [r[0] for r in table[1:]] == ["1", "2", "final-recovery"]
    assert [r[-4:-1] for r in table[1:]] == [["base", "4096", "4–36"], ["base", "4096", "36–68"],
                                           ["base", "1024", "68–76"]]  # recovery windows start after 2 + 2
    assert "calibration [0, 2) = 256 tokens" in text and "held-out [2, 4) = 256 tokens" in text
    assert "recovery [4, 68) = 8,192 tokens" in text and "seed 3" in text and "of its 500 windows" in text
    assert "`final` schedule, 9,216 tokens given, 9,216 trained (per phase: 4,096, 4,096, 1,024)" in text
    assert "- Teacher: base" in text and "never wikitext-2 valid" in text
    assert "- Compute: 12.50 TFLOP (scoring 2.50, recovery 10.00; evaluation not counted)" in text


def test_base_at_chance_is_flagged(report):
    assert chance_lines(report) == [], "xcopa 0.56 ± 0.02 is above chance"
    at_chance = {**report, "base_eval": _eval(20.0, 0.80, 0.519)}  # 0.519 - 2 * 0.02 < 0.5
    lines = chance_lines(at_chance)
    assert len(lines) == 1 and "xcopa acc (0.5190 ± 0.0200)" in lines[0] and "chance (0.5)" in lines[0]
    assert lines[0] in render_markdown(at_chance)
    no_stderr = {**report, "base_eval": {"blimp": {"acc": 0.5}}}
    assert [line for line in chance_lines(no_stderr) if "blimp" in line]


def test_report_says_which_set_select_removed_and_how_auto_repaired(report):
    """The Removal and repair section: both proposed sets with their distances, the one removed, and what
    the repair before KD changed (auto's choice and gap count, block-recon's blocks and error)."""
    step = {**report["steps"][0], "candidates": {"output": [4], "angular": [3]}, "chosen": "output",
            "distances": {"output": 0.0399, "angular": 0.0478},
            "recovery": {**report["steps"][0]["recovery"], "method": "block-recon+kd",
                         "extra": {"auto": "block-recon+kd", "gaps": 2,
                                   "block_recon": {"units": [{"blocks": [3], "restored": False},
                                                             {"blocks": [5], "restored": True}],
                                                   "tokens": 4096, "steps": 200,
                                                   "error_before": 0.289, "error_after": 0.232}}}}
    fit = {"fitted": ["model.layers.1.mlp.down_proj"], "tokens": 512, "error_before": 0.5, "error_after": 0.4,
           "restored": []}
    second = {**report["steps"][1], "recovery": {**report["steps"][1]["recovery"], "method": "reconstruct+kd",
                                                 "extra": {"auto": "reconstruct+kd", "gaps": 1, "reconstruct": fit}}}
    text = render_markdown({**report, "steps": [step, second]})
    section = text.split("## Removal and repair")[1].split("##")[0]
    assert "output 4 (0.0399, removed); angular 3 (0.0478)" in section
    assert "Step 1: `auto` repaired with block-recon+kd (2 gaps:" in section
    assert ("trained block 3 (4,096 tokens, 200 Adam steps), undone for block 5 (it did not help); held-out "
            "residual error 0.289 → 0.232.") in section  # original numbering, as everywhere in the report
    assert "Step 2: `auto` repaired with reconstruct+kd (1 gap:" in section
    assert "refitted model.layers.1.mlp.down_proj (module names of the pruned model; 512 tokens); residual" in section
    _, steps = _tables(text)
    assert [r[-1] for r in steps[1:]] == ["block-recon+kd", "reconstruct+kd"]
    assert "## Removal and repair" not in render_markdown(report)  # nothing chosen, nothing repaired: no section
    assert choice_summary({**report, "steps": [step, second]}) == [
        "  step 1: select removed output's set (output distance 0.0399; angular's 0.0478); auto repaired with "
        "block-recon+kd (2 gaps)",
        "  step 2: auto repaired with reconstruct+kd (1 gap)"]
    assert choice_summary(report) == []
