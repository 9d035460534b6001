"""Self-generated calibration: seeded, reproducible, cached by content, special tokens excluded."""

import json

import pytest
import torch

from iterabre.errors import IterabreError
from iterabre.selfgen import (generate_calibration, model_fingerprint, self_generated_calibration,
                              top_p_sample)
from iterabre.tiny import tiny_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private selfgen cache directory."""
    monkeypatch.setenv("ITERABRE_CACHE_DIR", str(tmp_path))
    return tmp_path / "selfgen"


def test_same_seed_same_tokens_other_seed_differs(tokenizer, cache):
    model = tiny_model("llama")
    a = self_generated_calibration(model, tokenizer, 5, 12, seed=1, batch_size=2, cache=False)
    b = self_generated_calibration(model, tokenizer, 5, 12, seed=1, batch_size=2, cache=False)
    c = self_generated_calibration(model, tokenizer, 5, 12, seed=2, batch_size=2, cache=False)
    assert a.input_ids.shape == (5, 12) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert len({tuple(row.tolist()) for row in a.input_ids}) > 1  # the sampled first token diversifies
    assert int(a.input_ids.max()) < 256  # byte tokens only: specials and padding rows never emitted


def test_cache_hit_is_identical_and_versioned(tokenizer, cache):
    model = tiny_model("llama")
    first = self_generated_calibration(model, tokenizer, 3, 8, seed=0)
    assert first.path.parent == cache and first.path.exists()
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["md5"] == first.md5 and meta["params"]["model"] == model_fingerprint(model)
    first.path.with_suffix(".json").write_text(json.dumps({**meta, "extra": 1}))  # mark: untouched on a hit
    again = generate_calibration(model, tokenizer, 3, 8, seed=0)
    assert torch.equal(again, first.input_ids)
    assert "extra" in json.loads(first.path.with_suffix(".json").read_text())
    fresh = self_generated_calibration(model, tokenizer, 3, 8, seed=0, cache=False)
    assert torch.equal(fresh.input_ids, first.input_ids)  # the cache stores exactly what generation gives


def test_cache_key_follows_model_content(tokenizer, cache):
    model = tiny_model("llama", seed=0)
    a = self_generated_calibration(model, tokenizer, 2, 4, seed=0)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    b = self_generated_calibration(model, tokenizer, 2, 4, seed=0)
    assert a.path != b.path


def test_damaged_cache_file_is_regenerated(tokenizer, cache):
    model = tiny_model("llama")
    first = self_generated_calibration(model, tokenizer, 2, 6, seed=3)
    first.path.write_bytes(b"garbage")
    again = self_generated_calibration(model, tokenizer, 2, 6, seed=3)
    assert torch.equal(again.input_ids, first.input_ids) and again.md5 == first.md5


def test_generation_flops_are_counted_and_kept_with_the_cache_entry(tokenizer, cache):
    from iterabre.flops import forward_flops_per_token, matmul_params

    model = tiny_model("llama")
    first = self_generated_calibration(model, tokenizer, 2, 6, seed=0, batch_size=2)
    # 6 one-token forwards per sequence (prompt, then 5 cached steps): every matmul once per token,
    # attention at least at T=1 and at most at the full window
    low, high = 2 * 6 * 2 * matmul_params(model), 2 * 6 * forward_flops_per_token(model, 6)
    assert low < first.flops <= high
    assert self_generated_calibration(model, tokenizer, 2, 6, seed=0, batch_size=2).flops == first.flops  # a hit
    sidecar = first.path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({k: v for k, v in meta.items() if k != "flops"}))  # an entry of unknown cost
    again = self_generated_calibration(model, tokenizer, 2, 6, seed=0, batch_size=2)
    assert again.flops == first.flops and json.loads(sidecar.read_text())["flops"] == first.flops  # regenerated


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(top_p_sample(logits, 1.0, 0.8, gen)) for _ in range(200)}
    assert draws == {0, 1}


def test_bad_arguments_are_refused(tokenizer, cache):
    model = tiny_model("llama")
    with pytest.raises(IterabreError, match="top_p"):
        generate_calibration(model, tokenizer, 2, 4, seed=0, top_p=0.0)
    with pytest.raises(IterabreError, match="num_sequences"):
        generate_calibration(model, tokenizer, 0, 4, seed=0)
