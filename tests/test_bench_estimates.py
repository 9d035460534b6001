"""The planner's estimates stored next to measurements in bench/results are the current planner's.

A planner change must re-derive them (`bench/planner.py [--device cuda] --refresh-estimates`,
`bench/recovery.py --refresh-estimates`), so the docs never compare a measurement with an old formula.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402
import planner as planner_bench  # noqa: E402
import recovery as recovery_bench  # noqa: E402


def _saved(name: str) -> dict:
    return json.loads((common.DEFAULT_RESULTS / f"{name}.json").read_text())  # committed with the docs


@pytest.mark.parametrize("name, device", [("planner", "cpu"), ("planner-cuda", "cuda")])
def test_planner_bench_estimates_are_the_current_planners(name, device):
    saved = _saved(name)
    again = planner_bench.with_estimates(saved, device)
    for uid, unit in saved["units"].items():
        assert unit["estimate_mb"] == pytest.approx(again["units"][uid]["estimate_mb"]), uid
        assert unit["parts_mb"] == pytest.approx(again["units"][uid]["parts_mb"]), uid


@pytest.mark.parametrize("name", ["recovery", "recovery-cuda"])
def test_recovery_bench_estimate_is_the_current_planners(name):
    saved = _saved(name)
    assert saved["planner"]["estimate_mb"] == pytest.approx(recovery_bench.with_estimate(saved)["planner"]["estimate_mb"])
