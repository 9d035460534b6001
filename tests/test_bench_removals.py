"""bench/removals.py: each recipe is scored on its own calibration windows (the distance itself is
iterabre.scorers.set_distances, tested in tests/test_scorers.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import removals  # noqa: E402


def test_calibration_follows_the_recipe_and_self_generated_stops():
    s = {"calib_tokens": 1024}
    assert removals.calibration_tokens("angular-kd@lr=2e-4", s) == 1024
    assert removals.calibration_tokens("oneshot-block-recon+kd@lr=2e-4@calibration_tokens=2048", s) == 2048
    with pytest.raises(SystemExit, match="leave it out"):
        removals.calibration_tokens("oneshot-block-recon+kd@calibration=self-generated", s)
