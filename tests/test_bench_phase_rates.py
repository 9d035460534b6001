"""bench/phase_rates.py: the steady window counts exactly the optimizer steps it times."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import phase_rates  # noqa: E402

from iterabre.flops import kd_flops_per_token  # noqa: E402
from iterabre.tiny import tiny_config  # noqa: E402

SEQ, BATCH, STEPS = 16, 2, 5


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("llama", num_layers=4).to_dict()))
    monkeypatch.setitem(phase_rates.MODELS, "tiny", (str(tmp_path),))
    return {"model": "tiny", "seq": SEQ, "calib": 2, "batch": BATCH, "kd_steps": STEPS, "recon_tokens": 64,
            "recon_steps": 2}


def test_steady_kd_flops_are_the_timed_steps_hand_count(tiny):
    out = phase_rates.run_phase({**tiny, "phase": "kd"}, "cpu")
    teacher, student, _ = phase_rates.build("tiny", "cpu")
    # steps 2..STEPS: each is BATCH x SEQ tokens of teacher forward + student forward and backward
    assert out["steady_flops"] == (STEPS - 2) * BATCH * SEQ * kd_flops_per_token(student, teacher, SEQ)
    assert out["steady_tokens"] == (STEPS - 2) * BATCH * SEQ
    assert len(out["step_seconds"]) == STEPS - 1 and out["steps"] == STEPS
    assert out["flops"] > out["steady_flops"]  # the whole call adds step 1 and the held-out checks


def test_every_phase_runs_and_derives_its_rates(tiny):
    for phase in phase_rates.PHASES:
        u = phase_rates.derive({**tiny, "phase": phase, **phase_rates.run_phase({**tiny, "phase": phase}, "cpu")},
                               peak=1.0)
        assert u["flops"] > 0 and u["seconds"] > 0, phase
        assert u["tflops_per_s"] == pytest.approx(u["flops"] / u["seconds"] / 1e12)
        assert u["mfu"] == pytest.approx(u["tflops_per_s"])  # against a 1 TFLOP/s peak
        assert ("steady_tokens_per_s" in u) == (phase in phase_rates.TRAINING), phase


def test_plan_runs_8b_only_on_cuda_and_its_full_kd_at_the_batch_that_fits():
    assert {u["model"] for u in phase_rates.plan("cpu", False).values()} == {"smollm2"}
    cuda = phase_rates.plan("cuda", False)
    assert cuda["llama8b/kd"]["batch"] == phase_rates.BATCH_8B
    assert cuda["llama8b/lora-kd"]["batch"] == phase_rates.SIZES["cuda"]["batch"]
