"""bench/common.py: the one resume rule, result files, settings helpers, peak memory."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A results folder of its own, and no machine probe (torch import, git) per save."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "machine_info", lambda: {"cpu": "test"})
    return tmp_path


def test_result_file_keeps_key_order_indent_2_and_a_trailing_newline(results):
    path = common.write_json("r", {"b": 1, "a": {"z": [1, 2], "y": None}})
    text = path.read_text()
    assert path == results / "r.json" and text.endswith("}\n")
    assert text == json.dumps({"b": 1, "a": {"z": [1, 2], "y": None}}, indent=2) + "\n"
    assert not list(results.glob("*.tmp*"))  # the atomic writer left no temp file


def test_previous_resumes_only_with_the_same_settings(results):
    s = {"model": "m", "blocks": 2, "ks": (1, 2)}  # a tuple is stored as a list and still matches
    assert common.previous("r", s) == {}
    common.save_units("r", s, {"a": {"x": 1}}, ["a", "b"], "notes")
    saved = common.previous("r", s)
    assert saved["units"] == {"a": {"x": 1}} and saved["pending"] == ["b"] and saved["notes"] == "notes"
    assert saved["machine"] == {"cpu": "test"}
    assert common.previous("r", {**s, "blocks": 3}) == {}


def test_save_units_merges_or_replaces(results):
    s = {"model": "m"}
    common.save_units("r", s, {"a": 1}, ["a", "b"], "")
    assert common.save_units("r", s, {"b": 2}, ["a", "b"], "", merge=True) == {"a": 1, "b": 2}
    assert common.previous("r", s)["pending"] == []
    common.save_units("r", s, {"c": 3}, ["c"], "")  # a --fresh run owns the file: old units go
    assert common.previous("r", s)["units"] == {"c": 3}


def test_run_units_skips_finished_units_and_saves_each(results, monkeypatch, tmp_path):
    monkeypatch.setattr(common, "fresh_stores", lambda: tmp_path / "work")
    (tmp_path / "work").mkdir()
    ran, saved = [], {"a": {"seconds": 1.0}}

    def run(uid, units, work):
        ran.append((uid, sorted(units)))
        return {"seconds": 2.0}

    def save(uid, done):
        saved[uid] = done
        return dict(saved)

    out = common.run_units(["a", "b", "c"], dict(saved), run, save)
    assert ran == [("b", ["a"]), ("c", ["a", "b"])] and sorted(out) == ["a", "b", "c"]
    assert not (tmp_path / "work").exists()  # the stores are thrown away


def test_settings_helpers():
    assert common.pick(None, 6, 2, quick=True) == 2 and common.pick(None, 6, 2, quick=False) == 6
    assert common.pick(0, 6, 2, quick=True) == 0  # a value given on the command line always wins
    assert common.parse_limits("wikitext=3, blimp=all,xcopa") == {"wikitext": 3, "blimp": None, "xcopa": None}

    class Args:
        quick, name = True, None

    assert common.result_name(Args, "quality") == "quality-quick"
    Args.name = "mine"
    assert common.result_name(Args, "quality") == "mine"


def test_recovery_phases_put_the_final_phase_last():
    report = {"steps": [{"step": 1}, {"step": 2}], "final_recovery": {"step": 3}}
    assert [p["step"] for p in common.recovery_phases(report)] == [1, 2, 3]
    assert common.recovery_phases({"steps": [{"step": 1}], "final_recovery": None}) == [{"step": 1}]


def test_peak_of_sees_an_allocation_above_the_setup_level():
    import torch

    out = common.peak_of(lambda: torch.ones(64, 2**20 // 4).sum())  # 64 MiB of float32
    assert set(out) == {"load_peak_mb", "setup_mb", "peak_mb"}
    assert out["peak_mb"] - out["setup_mb"] > 32


def test_machine_info_records_the_commit_from_iterabre_files():
    from iterabre import files

    git = common.machine_info()["git"]
    assert git == {"commit": files.git_commit(common.REPO), "dirty": files.git_dirty(common.REPO)}


def test_a_device_this_machine_lacks_stops_a_bench_with_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert common.device("auto") == "cpu"
    with pytest.raises(SystemExit) as stop:
        common.device("cuda")
    assert "no CUDA GPU" in str(stop.value) and "Fix:" in str(stop.value) and "\n" not in str(stop.value)
