"""Block surgery on all tiny families: renumbering, error messages, and a plain-transformers reload."""

import json
import os
import subprocess
import sys

import pytest
import torch

from iterabre.errors import IterabreError
from iterabre.surgery import (blocks_skipped, decoder_blocks, num_blocks, original_indices,
                              remove_blocks)
from iterabre.tiny import FAMILY_CONFIGS, tiny_model

ALL_FAMILIES = list(FAMILY_CONFIGS)


def _per_layer_lists(model) -> dict:
    """Config lists with one entry per block (layer_types and the like)."""
    n = num_blocks(model)
    return {k: list(v) for k, v in model.config.to_dict().items()
            if isinstance(v, (list, tuple)) and len(v) == n and k not in ("architectures",)
            and k != "iterabre_original_layers"}


def _layer_idx_values(block) -> list[int]:
    return [m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_remove_blocks_renumbers_config_and_layer_idx(family):
    model = tiny_model(family, num_layers=6)
    blocks_before = list(decoder_blocks(model))
    lists_before = _per_layer_lists(model)
    assert original_indices(model) == list(range(6))

    remove_blocks(model, [1, 4])

    assert num_blocks(model) == 4 and model.config.num_hidden_layers == 4
    if family == "gpt2":
        assert model.config.n_layer == 4
    assert original_indices(model) == [0, 2, 3, 5]
    assert [id(b) for b in decoder_blocks(model)] == [id(blocks_before[i]) for i in (0, 2, 3, 5)]
    for key, before in lists_before.items():
        assert list(getattr(model.config, key)) == [before[i] for i in (0, 2, 3, 5)], key
    for pos, block in enumerate(decoder_blocks(model)):
        assert set(_layer_idx_values(block)) <= {pos}
    if family != "gpt_neox":  # GPT-NeoX attention has no layer_idx attribute
        assert all(_layer_idx_values(b) for b in decoder_blocks(model))

    # A second removal speaks original indices too.
    remove_blocks(model, [3])
    assert original_indices(model) == [0, 2, 5]
    for key, before in lists_before.items():
        assert list(getattr(model.config, key)) == [before[i] for i in (0, 2, 5)], key


def test_remove_blocks_rejects_absent_and_all():
    model = tiny_model("llama", num_layers=4)
    remove_blocks(model, [2])
    with pytest.raises(IterabreError, match=r"\[2\].*present original indices: \[0, 1, 3\]"):
        remove_blocks(model, [2])
    with pytest.raises(IterabreError, match="leave no decoder block"):
        remove_blocks(model, [0, 1, 3])
    assert original_indices(model) == [0, 1, 3]  # failed calls changed nothing


def test_remove_blocks_refuses_layer_index_scaled_attention():
    from transformers import AutoModelForCausalLM

    from iterabre.tiny import tiny_config

    config = tiny_config("gpt2", 3)
    config.scale_attn_by_inverse_layer_idx = True
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(IterabreError, match="layer_idx"):
        remove_blocks(model, [1])


def test_original_indices_detects_inconsistent_config():
    model = tiny_model("llama", num_layers=4)
    model.config.iterabre_original_layers = [0, 1]
    with pytest.raises(IterabreError, match="lists 2 blocks but the model has 4"):
        original_indices(model)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_blocks_skipped_restores_everything(family):
    model = tiny_model(family, num_layers=6)
    blocks, config_before = decoder_blocks(model), model.config.to_dict()
    idx_before = [_layer_idx_values(b) for b in blocks]
    with blocks_skipped(model, [2, 3]):
        assert num_blocks(model) == 4 and original_indices(model) == [0, 1, 4, 5]
        assert [set(_layer_idx_values(b)) for b in decoder_blocks(model)] == [{0}, {1}, {2}, {3}]
    assert decoder_blocks(model) is blocks
    assert model.config.to_dict() == config_before
    assert [_layer_idx_values(b) for b in blocks] == idx_before


# The reload check runs in a fresh interpreter that never imports iterabre: it proves the saved
# folder is an ordinary transformers checkpoint. One subprocess handles every family.
_RELOAD_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
job = json.load(open(sys.argv[1]))
ids = torch.tensor(job["ids"])
out = {}
for family, path in job["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, use_cache=True, pad_token_id=0).tolist()
    out[family] = dict(logits=logits.tolist(), gen=gen, n=model.config.num_hidden_layers,
                       original=getattr(model.config, "iterabre_original_layers", None))
assert "iterabre" not in sys.modules
json.dump(out, open(sys.argv[2], "w"))
"""


def _generate(model, ids, use_cache: bool) -> list:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, use_cache=use_cache, pad_token_id=0).tolist()


def test_pruned_models_reload_with_plain_transformers(tmp_path):
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 11], [1, 2, 3, 4, 5, 6, 7, 8]])
    expected, dirs = {}, {}
    for family in ALL_FAMILIES:
        model = remove_blocks(tiny_model(family, num_layers=6, seed=1), [1, 4])
        with torch.no_grad():
            logits = model(ids).logits
        expected[family] = dict(logits=logits, gen=[_generate(model, ids, c) for c in (True, False)])
        dirs[family] = str(tmp_path / family)
        model.save_pretrained(dirs[family], safe_serialization=True)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"ids": ids.tolist(), "dirs": dirs}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, str(job), str(tmp_path / "out.json")],
                   check=True, cwd=tmp_path, env=env, timeout=300)
    got = json.loads((tmp_path / "out.json").read_text())
    for family, exp in expected.items():
        res = got[family]
        assert res["n"] == 4 and res["original"] == [0, 2, 3, 5], family
        torch.testing.assert_close(torch.tensor(res["logits"]), exp["logits"], atol=1e-5, rtol=1e-5,
                                   msg=f"{family}: reloaded logits differ")
        assert len(exp["gen"][0][0]) == ids.shape[1] + 8
        # Cached generation indexes the KV cache by layer_idx: it must match the uncached one.
        assert exp["gen"][0] == exp["gen"][1] == res["gen"], family
