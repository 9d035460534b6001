"""Load and save models: embedded names, local folders, GGUF files, hub ids.

`load_model` refuses inputs the pruner cannot handle (encoders, remote code, pickles) and
broken model folders (truncated or garbage safetensors, a shard index naming a missing
shard, a config.json that is not JSON) with a one-line error naming the file, before any
weights are read. `check_model_folder` holds those cheap file checks (no torch) and
`check_local_model` runs them for any model spec, so a job can be refused before it starts.
Embedded models and GGUF conversion live in `iterabre.embedded`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from iterabre.devices import as_dtype, resolve_device
from iterabre.embedded import EMBEDDED, load_gguf, pull_embedded_model
from iterabre.errors import IterabreError
from iterabre.files import atomic_dir

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses longer JSON headers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "special_tokens_map.json")


# ---------------------------------------------------------------- load

def load_model(spec: str, revision: str | None = None, device: str = "cpu", dtype=None,
               allow_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) for an embedded name, local folder, .gguf file or hub id; eval mode on `device`.

    `dtype`: a torch dtype or its name, 'auto' (see `working_dtype`), or None for float32.
    """
    device = resolve_device(device)
    dtype = working_dtype(dtype, device)
    path = _resolve_spec(spec, revision)
    if path.is_file():  # a .gguf file, dequantized to float32
        model, tokenizer = load_gguf(path)
        model = model.to(as_dtype(dtype)) if dtype is not None else model
    else:
        if not _is_hub_cache(path):  # hub snapshots hold only what was downloaded so far
            check_model_folder(path, spec, allow_pickle)
        _check_config(path, spec, allow_remote_code)
        # Hub models load by id (so missing weight files can still download); local ones by path.
        source = spec if _is_hub_cache(path) else path
        tokenizer = _load_tokenizer(source, revision, allow_remote_code, spec)  # cheap: fail before weights
        model = _load_weights(source, revision, dtype, allow_remote_code, allow_pickle, spec)
    _ensure_pad_token(model, tokenizer)
    return model.to(device).eval(), tokenizer


def working_dtype(dtype, device: str):
    """'auto' -> 'bfloat16' on CUDA (half the memory, tensor cores), 'float32' elsewhere; any other value as is.

    Not bf16 on the CPU: without AVX512-BF16/AMX a bf16 matmul ran 60x slower than float32 on this
    project's 2-core test machine (docs/SCALING.md, Processes and dtypes).
    """
    if dtype == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return dtype


def check_local_model(spec: str, allow_pickle: bool = False) -> None:
    """File checks of `spec` when it is a local folder or .gguf file (embedded names and hub ids pass).

    No torch, no network, no weights read: meant to refuse a job before anything starts.
    """
    path = _local_path(spec)
    if path is not None and path.is_dir() and not _is_hub_cache(path):
        check_model_folder(path, spec, allow_pickle)


def _looks_like_path(spec: str) -> bool:
    """A spec the user meant as a file-system path (so it must not fall through to the hub)."""
    # Hub ids are "name" or "org/name"; anything else with a separator is a path.
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 \
        or (os.sep != "/" and os.sep in spec)


def model_folder(spec: str, revision: str | None = None) -> Path:
    """The checked local folder of `spec` (embedded name, folder or hub snapshot), for loaders that read
    the folder themselves (lm-eval with parallelize=True)."""
    path = _resolve_spec(spec, revision)
    if path.is_file():
        raise IterabreError(f"{spec} is a single .gguf file; this needs a model folder.",
                            "evaluate it without --parallelize, or save it as a folder with save_pretrained")
    if not _is_hub_cache(path):
        check_model_folder(path, spec)
    return path


def _resolve_spec(spec: str, revision: str | None) -> Path:
    """Local path of the model: embedded (pulled on demand), folder, .gguf file, or hub cache."""
    if spec in EMBEDDED:
        return pull_embedded_model(spec)
    return _local_path(spec) or _hub_snapshot(spec, revision)


def _local_path(spec: str) -> Path | None:
    """The folder or .gguf file `spec` names; None for embedded names and hub ids."""
    if spec in EMBEDDED:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        _check_gguf_file(path, spec)
        return path
    if _looks_like_path(spec):
        raise IterabreError(f"model path {spec} does not exist.",
                            f"check the path, or use an embedded model ({', '.join(EMBEDDED)})")
    return None


def _check_gguf_file(path: Path, spec: str) -> None:
    """A model given as a file must be a GGUF file: the .gguf suffix and the 'GGUF' magic bytes."""
    if path.suffix != ".gguf":
        raise IterabreError(f"{spec} is a file but not a .gguf model.",
                            "pass a model folder (config.json + weights) or a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise IterabreError(f"{spec} is not a GGUF file (it does not start with the bytes 'GGUF').",
                                "download the file again or pass a Hugging Face model folder")


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


def _is_hub_cache(path: Path) -> bool:
    """True for a folder inside the Hugging Face hub cache (snapshots/<rev>/)."""
    return path.parent.name == "snapshots"


# ---------------------------------------------------------------- folder checks (no torch, no weights)

def check_model_folder(path: str | os.PathLike, spec: str | None = None, allow_pickle: bool = False) -> None:
    """Refuse a broken model folder with one line naming the file: bad JSON, missing or damaged weights.

    Reads every top-level *.json file and only the headers of the *.safetensors files, so it
    costs milliseconds even for a multi-gigabyte model.
    """
    path = Path(path)
    spec = spec or str(path)
    fix = _refetch_hint(path, spec)
    _read_config_json(path, spec)
    for file in sorted(path.glob("*.json")):
        _read_json(file, fix)
    _check_weights(path, spec, allow_pickle)
    for index in sorted(path.glob("*.safetensors.index.json")):
        _check_shard_index(index, fix)
    for file in sorted(path.glob("*.safetensors")):
        _check_safetensors(file, fix)


def _refetch_hint(path: Path, spec: str) -> str:
    """How to get an intact copy: pull an embedded model again, else re-save or re-copy it."""
    if spec in EMBEDDED:
        return f"delete {path} and run `iterabre models pull {spec}` again"
    return "copy or download the model folder again, or re-save it with save_pretrained"


def _read_json(file: Path, fix: str):
    """Parsed JSON of `file`, or one line naming the file and the parse error."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise IterabreError(f"{file} is not valid JSON ({_first_line(e)}).", fix) from None
    except OSError as e:
        raise IterabreError(f"{file} cannot be read ({e.strerror}).", "check the file's permissions") from None


def _read_config_json(path: Path, spec: str) -> dict:
    """config.json as a dict, or an error saying the folder is not a model (or its config is broken)."""
    file = path / "config.json"
    if not file.is_file():
        raise IterabreError(f"{spec} has no config.json, so it is not a Hugging Face model folder.",
                            "pass a folder made by save_pretrained, a .gguf file or an embedded name")
    raw = _read_json(file, _refetch_hint(path, spec))
    if not isinstance(raw, dict):
        raise IterabreError(f"{file} holds a JSON {type(raw).__name__}, not the object of a model config.",
                            _refetch_hint(path, spec))
    return raw


def _check_weights(path: Path, spec: str, allow_pickle: bool) -> None:
    """Require safetensors weights unless pickles are explicitly allowed (they can run code on load)."""
    names = [p.name for p in path.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        if allow_pickle:
            return
        raise IterabreError(f"{spec} has only pickle weights (.bin/.pt), which can run code when loaded.",
                            "convert them to safetensors, or pass --allow-pickle if you trust the source")
    raise IterabreError(f"{spec} has no weight files (*.safetensors).", "save the model with save_pretrained")


def _check_shard_index(index: Path, fix: str) -> None:
    """A sharded checkpoint's index must map tensors to shard files that are all present."""
    content = _read_json(index, fix)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise IterabreError(f"{index} has no weight_map (tensor name -> shard file).", fix)
    missing = sorted({str(shard) for shard in weight_map.values() if not (index.parent / str(shard)).is_file()})
    if missing:
        raise IterabreError(f"{index} names shard files that are missing: {', '.join(missing)}.",
                            f"copy the missing shards into {index.parent}; otherwise {fix}")


def _check_safetensors(file: Path, fix: str) -> None:
    """Read only the header (8-byte little-endian length + JSON) and compare the promised size with the file's."""
    size = file.stat().st_size
    if size < 8:
        raise IterabreError(f"{file} is truncated: it has {size} bytes, fewer than the 8 of a header length.", fix)
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > SAFETENSORS_MAX_HEADER:
            raise IterabreError(f"{file} is not a safetensors file (its first 8 bytes announce an impossible "
                                f"{length}-byte header).", fix)
        if length > size - 8:
            raise IterabreError(f"{file} is truncated: it has {size} bytes but its header alone needs "
                                f"{8 + length}.", fix)
        raw = f.read(length)
    try:
        header = json.loads(raw)
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise IterabreError(f"{file} is not a safetensors file (its header is not the expected JSON).",
                            fix) from None
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise IterabreError(f"{file} is truncated: it has {size} bytes but its header describes {expected}.", fix)
    if size > expected:  # the safetensors loader refuses this too ("incomplete metadata")
        raise IterabreError(f"{file} has {size - expected} bytes more than its header describes "
                            "(a damaged copy).", fix)


# ---------------------------------------------------------------- config, weights, tokenizer

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
        raise IterabreError(f"{spec} has a config transformers cannot read ({_first_line(e)}).",
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


def _load_weights(path, revision, dtype, allow_remote_code: bool, allow_pickle: bool, spec: str):
    """AutoModelForCausalLM.from_pretrained with safe defaults, errors mapped to one line."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=as_dtype(dtype) if dtype is not None else torch.float32,
            trust_remote_code=allow_remote_code, use_safetensors=None if allow_pickle else True)
    except (OSError, SafetensorError) as e:  # damage the header checks cannot see, e.g. a bad dtype
        raise IterabreError(f"could not read the weights of {spec} ({_first_line(e)}).",
                            "check that the folder is complete, or pass --allow-pickle for .bin weights") from None


def _load_tokenizer(path, revision, allow_remote_code: bool, spec: str):
    """The model's tokenizer; a model without one cannot be evaluated or trained here."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=allow_remote_code)
    except Exception as e:  # missing files raise OSError, broken ones ValueError/TypeError/tokenizers errors
        raise IterabreError(f"{spec} has no usable tokenizer: {_tokenizer_problem(path, e)}.",
                            "save the tokenizer into the model folder (tokenizer.save_pretrained)") from None


def _tokenizer_problem(path, error: Exception) -> str:
    """Which tokenizer files a local folder holds and why they failed, or that it holds none."""
    folder = Path(path)
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()] if folder.is_dir() else []
    if folder.is_dir() and not present:
        return "the folder has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)"
    return f"{', '.join(present) or 'its files'} did not load ({_first_line(error)})"


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


# ---------------------------------------------------------------- save

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
