"""bench/flops.py: the FLOP counts behind the MFU column of bench/recovery.py."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import flops  # noqa: E402

from iterabre.tiny import tiny_model  # noqa: E402


def test_matmul_params_count_every_linear_once_and_a_tied_head_once():
    model = tiny_model("llama", num_layers=2)
    cfg = model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_block = h * h * 2 + h * kv * 2 + 3 * h * i  # q, o, k, v, gate, up, down
    head = cfg.vocab_size * h
    assert flops.matmul_params(model) == 2 * per_block + head
    model.lm_head.weight = model.model.embed_tokens.weight  # tie: still one head matmul
    assert flops.matmul_params(model) == 2 * per_block + head


def test_kd_flops_and_mfu():
    teacher, student = tiny_model("llama", num_layers=4), tiny_model("llama", num_layers=3)
    per_token = flops.kd_flops_per_token(student, teacher, seq_len=16)
    expected = (2 * flops.matmul_params(teacher) + flops.attention_flops(teacher, 16)
                + 3 * (2 * flops.matmul_params(student) + flops.attention_flops(student, 16)))
    assert per_token == expected and flops.attention_flops(student, 16) == 4 * 16 * student.config.hidden_size * 3
    assert flops.mfu(1e6, per_token, 2.0) == pytest.approx(1e6 * per_token / 2e12)
    assert flops.mfu(1e6, per_token, None) is None


def test_peak_table_picks_the_specific_name_first():
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0 and flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("NVIDIA L40S") == 362.0 and flops.peak_tflops("NVIDIA L4") == 121.0
    assert flops.peak_tflops(None) is None and flops.peak_tflops("NVIDIA H200", override=500.0) == 500.0
