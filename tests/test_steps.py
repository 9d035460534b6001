"""iterabre.steps: removal plans, budgets, hashes and the path-in/path-out steps."""

import dataclasses
import json
import sys

import pytest
import torch

from iterabre import files, planning, steps
from iterabre.paths import SOURCE_FILE
from iterabre.config import CompressConfig, RecoveryConfig
from iterabre.errors import IterabreError
from iterabre.tiny import byte_tokenizer, tiny_model


def _cfg(**kw) -> CompressConfig:
    base = dict(model="x", target_layers=4, calibration_tokens=128, recovery_tokens=256, seq_len=32,
                eval_tasks="", device="cpu")
    return CompressConfig(**{**base, **kw})


# ---------------------------------------------------------------- plans

def test_target_must_leave_fewer_but_some_blocks():
    assert planning.target_layers_for(_cfg(target_layers=5), 6) == 5
    assert planning.target_layers_for(_cfg(target_layers=None, target_ratio=0.8), 30) == 24
    for target in (6, 7):
        with pytest.raises(IterabreError, match="out of range"):
            planning.target_layers_for(_cfg(target_layers=target), 6)
    with pytest.raises(IterabreError):
        planning.target_layers_for(_cfg(target_layers=None, target_ratio=0.01), 6)  # rounds to 0


@pytest.mark.parametrize("kw, expected", [
    (dict(target_layers=26, schedule="iterative"), [1, 1, 1, 1]),
    (dict(target_layers=25, schedule="iterative", blocks_per_step=2), [2, 2, 1]),
    (dict(target_layers=25, schedule="one-shot"), [5]),
    (dict(target_layers=25), [5]),  # the default schedule is one-shot
])
def test_blocks_removed_per_step(kw, expected):
    assert planning.num_steps_for(_cfg(**kw), 30) == expected


def test_step_budgets_split_the_total_exactly():
    assert planning.step_budgets(1000, 4) == [250, 250, 250, 250]
    assert planning.step_budgets(1001, 3) == [333, 334, 334]  # largest remainder, ties to later steps
    increasing = planning.step_budgets(1000, 4, "increasing")
    assert sum(increasing) == 1000 and increasing == sorted(increasing) and increasing[0] < increasing[-1]
    assert planning.step_budgets(100, 0) == []


def test_recovery_ranges_are_disjoint_and_cover_each_budget():
    ranges = planning.recovery_ranges([100, 64, 0], seq_len=32)
    assert ranges == [(0, 4), (4, 6), (6, 7)]  # ceil(100/32)=4, 2, and one window for a zero budget


def test_plan_removal_lowest_and_contiguous():
    scores = {"0": 0.9, "1": 0.1, "3": 0.2, "4": 0.05, "5": 0.8}  # JSON keys are strings
    assert planning.plan_removal(scores, 2, "output", [0, 1, 3, 4, 5]) == [4, 1]
    # angular: scores keyed by run start; block 2 is already gone, so a run of 2 from 1 is [1, 3]
    runs = {"0": 0.5, "1": 0.1, "3": 0.3, "4": 0.4}
    assert planning.plan_removal(runs, 2, "angular", [0, 1, 3, 4, 5]) == [1, 3]


def test_promotion_gates():
    base = {"blimp": {"acc": 0.80}, "wikitext": {"word_perplexity": 20.0}}
    good = {"blimp": {"acc": 0.76}, "wikitext": {"word_perplexity": 25.0}}
    assert planning.promotion(base, good, 0.9, 1.5)[0] == "champion"
    bad_blimp = {"blimp": {"acc": 0.60}, "wikitext": {"word_perplexity": 25.0}}
    assert planning.promotion(base, bad_blimp, 0.9, 1.5)[0] == "challenger"
    bad_ppl = {"blimp": {"acc": 0.80}, "wikitext": {"word_perplexity": 40.0}}
    assert planning.promotion(base, bad_ppl, 0.9, 1.5)[0] == "challenger"
    alias, reasons = planning.promotion({}, {}, 0.9, 1.5)
    assert alias == "challenger" and "no gate metric" in reasons[0]


# ---------------------------------------------------------------- hashes

def test_hash_path_follows_content_and_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "w.bin").write_bytes(b"\x00" * 3000)
        (d / "config.json").write_text("{}")
    assert files.hash_path(a) == files.hash_path(b)
    (b / "w.bin").write_bytes(b"\x00" * 2999 + b"\x01")
    assert files.hash_path(a) != files.hash_path(b)
    (b / "w.bin").write_bytes(b"\x00" * 3000)
    (b / "config.json").rename(b / "other.json")
    assert files.hash_path(a) != files.hash_path(b)
    with pytest.raises(IterabreError):
        files.hash_path(tmp_path / "missing")


# ---------------------------------------------------------------- steps on a tiny model

def test_prepare_data_splits_are_disjoint(tiny_model_dir, tmp_path):
    cfg = _cfg(calibration_tokens=96, seq_len=32)
    path = steps.prepare_data(cfg, tiny_model_dir, tmp_path, budgets=[64, 64])
    data = steps.load_data(path)
    assert data["calib"].shape == (3, 32) and data["heldout"].shape == (3, 32)
    assert data["recovery"].shape == (4, 32) and data["recovery_ranges"] == [[0, 2], [2, 4]]
    rows = [tuple(r.tolist()) for name in ("calib", "recovery", "heldout") for r in data[name]]
    assert len(set(rows)) == len(rows)  # no window shared between splits
    assert not list(tmp_path.glob("*.tmp-*"))


def _fake_generation(monkeypatch, flops=123):
    """iterabre.selfgen is tested on its own; here only the wiring: windows 0..n-1 of a counting stream."""
    import iterabre.selfgen

    def fake(model, tok, n, seq_len, seed):
        return iterabre.selfgen.SelfGenData(torch.arange(n * seq_len).view(n, seq_len), "md5", None, {}, flops)

    monkeypatch.setattr(iterabre.selfgen, "self_generated_calibration", fake)


def test_self_generated_calibration_replaces_calib_only(tiny_model_dir, tmp_path, monkeypatch):
    _fake_generation(monkeypatch)
    wiki = steps.load_data(steps.prepare_data(_cfg(calibration_tokens=64), tiny_model_dir, tmp_path / "w", [32]))
    cfg = _cfg(calibration="self-generated", calibration_tokens=64, recovery=RecoveryConfig(method="kd"))
    path = steps.prepare_data(cfg, tiny_model_dir, tmp_path / "g", [32])
    gen = steps.load_data(path)
    assert torch.equal(gen["calib"], torch.arange(64).view(2, 32)) and torch.equal(gen["recovery"], wiki["recovery"])
    assert "recon" not in gen and "block_recon" not in gen["meta"]["split"]  # KD trains on wikitext only
    assert steps.data_meta(path)["generation_flops"] == 123
    assert steps.data_meta(steps.prepare_data(_cfg(), tiny_model_dir, tmp_path / "w2", [32]))["generation_flops"] == 0


@pytest.mark.parametrize("method, knob, key", [("block-recon+kd", "block_recon_tokens", "block_recon"),
                                               ("reconstruct+kd", "reconstruct_tokens", "reconstruct")])
def test_self_generated_text_for_the_fit_follows_the_calibration(tiny_model_dir, tmp_path, monkeypatch,
                                                                  method, knob, key):
    _fake_generation(monkeypatch)
    cfg = _cfg(calibration="self-generated", calibration_tokens=64, recovery=RecoveryConfig(method=method, **{knob: 70}))
    data = steps.load_data(steps.prepare_data(cfg, tiny_model_dir, tmp_path, [32]))
    # one generation of 2 + ceil(70 / 32) windows: calibration first, then the fit's, so they differ
    assert torch.equal(data["calib"], torch.arange(64).view(2, 32))
    assert torch.equal(data["recon"], torch.arange(64, 160).view(3, 32))
    assert data["meta"]["split"][key]["windows"] == 3 and data["meta"]["split"][key]["tokens"] == 96


def test_score_prune_recover_evaluate_chain(tiny_model_dir, tmp_path):
    data = steps.prepare_data(_cfg(), tiny_model_dir, tmp_path, budgets=[64])
    scored = steps.score(tiny_model_dir, data, "output", 1, "cpu")
    assert sorted(scored["scores"]) == list(range(6)) and scored["order"] == list(range(6))
    remove = planning.plan_removal(scored["scores"], 2, "output", scored["order"])
    pruned = steps.prune(tiny_model_dir, remove, tmp_path / "pruned")
    assert steps.num_layers(pruned) == 4
    assert json.loads((pruned / "config.json").read_text())["iterabre_original_layers"] == \
        [i for i in range(6) if i not in remove]
    rec = dataclasses.asdict(RecoveryConfig(tokens=64, batch_size=2, lr=1e-3))
    result = steps.recover(pruned, tiny_model_dir, data, rec, remove, (0, 2), tmp_path / "healed", "cpu")
    assert result["tokens"] >= 64 and result["loss_before"] is not None and len(result["losses"]) >= 1
    assert files.hash_path(tmp_path / "healed") != files.hash_path(pruned)  # weights were trained
    assert steps.num_layers(tmp_path / "healed") == 4
    assert steps.evaluate(tmp_path / "healed", "", None, "cpu") == {}


def test_prepare_base_saves_a_safetensors_copy_with_its_source(tiny_model_dir, tmp_path):
    out = steps.prepare_base(str(tiny_model_dir), None, tmp_path)
    assert out == tmp_path / "base" and (out / "model.safetensors").exists()
    assert json.loads((out / SOURCE_FILE).read_text()) == {"model": str(tiny_model_dir), "revision": None}
    assert steps.num_layers(out) == 6 and not list(tmp_path.glob("*.tmp-*"))
