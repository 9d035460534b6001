"""bench/removals.py: a removal's output distance is the output scorer's term, taken over the whole set."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import removals  # noqa: E402

from iterabre.scorers import naive_scores  # noqa: E402
from iterabre.tiny import tiny_model  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_one_block_distance_is_the_output_score(family):
    """Removing one block moves the output by exactly what the output scorer says that block is worth."""
    model = tiny_model(family, num_layers=6)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    scores = naive_scores(model, ids, torch.ones_like(ids), scorer="output")
    for block in (0, 3, 5):
        assert removals.output_distance(model, ids, [block]) == pytest.approx(scores[block], abs=1e-6)


def test_set_distance_is_joint_and_leaves_the_model_whole():
    """A set is removed together (not a sum of single scores), and the model keeps every block afterwards."""
    model = tiny_model("llama", num_layers=6)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    before = [p.clone() for p in model.parameters()]
    pair = removals.output_distance(model, ids, [1, 2])
    singles = removals.output_distance(model, ids, [1]) + removals.output_distance(model, ids, [2])
    assert pair > 0 and pair != pytest.approx(singles, abs=1e-6)
    assert removals.output_distance(model, ids, []) == pytest.approx(0.0, abs=1e-6)
    assert len(model.model.layers) == 6 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_calibration_follows_the_recipe_and_self_generated_stops():
    s = {"calib_tokens": 1024}
    assert removals.calibration_tokens("angular-kd@lr=2e-4", s) == 1024
    assert removals.calibration_tokens("oneshot-block-recon+kd@lr=2e-4@calibration_tokens=2048", s) == 2048
    with pytest.raises(SystemExit, match="leave it out"):
        removals.calibration_tokens("oneshot-block-recon+kd@calibration=self-generated", s)
