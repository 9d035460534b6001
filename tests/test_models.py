"""load_model: refusals (encoders, remote code, pickles, missing paths), GGUF files, atomic saves."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModel

from iterabre.errors import IterabreError
from iterabre.models import load_model, save_model
from iterabre.tiny import byte_tokenizer, tiny_model


# ---------------------------------------------------------------- load_model

def test_corrupted_gguf_file_is_refused(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(IterabreError, match="not a readable GGUF"):
        load_model(str(path))


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny Llama saved with save_model (safetensors + byte tokenizer without a pad token)."""
    tok = byte_tokenizer()
    tok.pad_token = None
    return save_model(tiny_model("llama", num_layers=3), tok, tmp_path / "tiny")


def test_load_model_roundtrip_sets_pad_and_eval(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    assert not model.training and tok.pad_token == tok.eos_token
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = tiny_model("llama", num_layers=3)(ids).logits
    assert torch.allclose(model(ids).logits, expected)


def test_load_model_refuses_encoders(tmp_path):
    for model_type, kwargs in {"bert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                             intermediate_size=64),
                               "t5": dict(num_layers=2, d_model=32, num_heads=2, d_ff=64, d_kv=16)}.items():
        AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs)).save_pretrained(tmp_path / model_type)
        with pytest.raises(IterabreError, match=f"'{model_type}' model, not a causal decoder"):
            load_model(str(tmp_path / model_type))


def test_load_model_refuses_remote_code(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(IterabreError, match="allow-remote-code"):
        load_model(str(tiny_dir))


def test_load_model_refuses_pickle_unless_allowed(tiny_dir):
    from safetensors.torch import load_file

    state = load_file(tiny_dir / "model.safetensors")
    torch.save(state, tiny_dir / "pytorch_model.bin")
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(IterabreError, match="only pickle weights.*--allow-pickle"):
        load_model(str(tiny_dir))
    model, _ = load_model(str(tiny_dir), allow_pickle=True)
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])


def test_load_model_missing_tokenizer(tiny_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_dir / name).unlink()
    with pytest.raises(IterabreError, match="no usable tokenizer"):
        load_model(str(tiny_dir))


@pytest.mark.parametrize("spec,message", [
    ("./no/such/dir", "does not exist"),
    ("/tmp/nothing-here.gguf", "does not exist"),
    ("some-org/some-model", "not found locally and HF_HUB_OFFLINE=1"),
])
def test_load_model_missing(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(IterabreError, match=message):
        load_model(spec)


def test_load_model_refuses_non_model_folder(tmp_path):
    with pytest.raises(IterabreError, match="no config.json"):
        load_model(str(tmp_path))


def test_loaded_models_do_not_use_hub_kernels(tiny_dir):
    """transformers would kernelize from the Hub on CUDA mode switches (offline: an error, measured on an H200)."""
    model, _ = load_model(str(tiny_dir))
    assert not model.use_kernels and not model.train().use_kernels


def test_load_model_refuses_missing_cuda(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(IterabreError, match="no CUDA GPU"):
        load_model(str(tiny_dir), device="cuda")


# ---------------------------------------------------------------- save_model

def test_save_model_replaces_atomically(tmp_path, tokenizer):
    out = save_model(tiny_model("llama", 2), tokenizer, tmp_path / "m")
    save_model(tiny_model("llama", 4), tokenizer, out)
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 4
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left


def test_save_model_failure_keeps_old(tmp_path, tokenizer, monkeypatch):
    out = save_model(tiny_model("llama", 2), tokenizer, tmp_path / "m")

    def broken(*args, **kwargs):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken)
    with pytest.raises(RuntimeError):
        save_model(tiny_model("llama", 4), tokenizer, out)
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.slow
def test_smollm2_pull_and_load(smollm2_dir):
    model, tok = load_model(str(smollm2_dir))
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.isfinite(loss) and loss < 8.0  # a random 49k-vocab model would sit near ln(49152) = 10.8
