"""Where the weights and residual streams live while a model is scored one block at a time.

A model too big for the compute device is scored by `iterabre.scorers.streamed_scores`, which
walks the decoder blocks once, in order, with only one block's weights on the device. This
module holds what that walk needs besides the scoring math:

- Weight sources. `FolderSource` reads a safetensors folder lazily: a *shell* model is built
  from config.json with every parameter on the meta device (no memory), then the embedding,
  final norm and LM head are read onto the device, and block j's tensors are read (with
  `safetensors.safe_open`, only those pages) when the walk reaches it and dropped back to
  meta after. transformers' own checkpoint conversions (e.g. per-expert MoE tensors fused
  into one) are applied, so a block gets exactly the weights `from_pretrained` would give it.
  `ModuleSource` does the same for a model already in (CPU) memory by moving one block at
  a time to the device and back.
- Memory planning: how big one block, the streams and the embedding/head are, where the
  streams go (device when they fit, else CPU memory), how many candidate streams share a
  block call, and the peak the streamed scorer adds (`streamed_memory`, a formula the bench
  checks against measured peaks and a planner can use before loading anything).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from iterabre.devices import available_ram
from iterabre.errors import IterabreError
from iterabre.surgery import block_list_site

INDEX_FILE = "model.safetensors.index.json"
# Streams may take this share of the memory free when the walk is planned (embedding and head
# already loaded; the rest is for the resident block, its activations and allocator slack).
DEVICE_STREAM_SHARE = 0.5
CPU_STREAM_SHARE = 0.5
# Candidate streams batched into one block call may use this much activation memory by default.
# CPU: measured on SmolLM2 (2 x 64 tokens per batch, 1 thread), 1 candidate per call took 1.6-2x
# the time of 6, and 30 per call was no faster than 6: a few candidates fill the matmuls, so a
# small budget costs no time. CUDA: a share of the free memory, so one call takes every candidate.
CPU_CALL_BUDGET = 64 * 2**20
DEVICE_CALL_SHARE = 0.25
_MISMATCH_FIX = "its weights and config.json come from different models; copy or save the folder again"


# ---------------------------------------------------------------- the block list inside a model

def blocks_path(model: nn.Module) -> str:
    """Dotted path of the decoder-block ModuleList inside `model`, e.g. 'model.layers', 'transformer.h'."""
    _, _, blocks = block_list_site(model)
    for path, module in model.named_modules():
        if module is blocks:
            return path
    raise IterabreError(f"the block list of {type(model).__name__} is not a submodule of it.",
                        "use a transformers causal LM whose blocks sit in an nn.ModuleList")


def _block_key_pattern(model: nn.Module) -> re.Pattern:
    """Matches a checkpoint tensor name of a block: group 1 = block index.

    Checkpoints saved from the causal LM carry the full path ('model.layers.3.mlp...'), ones
    saved from the base model drop its prefix ('layers.3.mlp...', GPT-2's 'h.3.attn...').
    """
    path = blocks_path(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    relative = path[len(prefix) + 1:] if prefix and path.startswith(prefix + ".") else path
    return re.compile(rf"^(?:{re.escape(prefix)}\.)?{re.escape(relative)}\.(\d+)\." if prefix
                      else rf"^{re.escape(relative)}\.(\d+)\.")


def group_by_block(names: list[str], model: nn.Module) -> dict[int | None, list[str]]:
    """Checkpoint tensor names grouped by block index; None holds the rest (embedding, norm, head)."""
    pattern = _block_key_pattern(model)
    groups: dict[int | None, list[str]] = {}
    for name in names:
        match = pattern.match(name)
        groups.setdefault(int(match.group(1)) if match else None, []).append(name)
    return groups


def check_blocks_match(groups: dict, num_blocks: int, where: str) -> None:
    """Every block the config declares has tensors, and no tensor names a block it does not declare."""
    named = sorted(k for k in groups if k is not None)
    extra = [j for j in named if j >= num_blocks]
    missing = sorted(set(range(num_blocks)) - set(named))
    if extra:
        raise IterabreError(f"{where} has tensors for block(s) {_ranges(extra)} but its config.json declares "
                            f"{num_blocks} blocks (0-{num_blocks - 1}).",
                            _MISMATCH_FIX)
    if missing:
        raise IterabreError(f"{where} has no tensors for block(s) {_ranges(missing)} of the {num_blocks} its "
                            "config.json declares.",
                            _MISMATCH_FIX)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (short error messages for big models)."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


# ---------------------------------------------------------------- moving parameters on and off the device

def _to_meta(module: nn.Module) -> None:
    """Drop every parameter of `module` to an empty meta tensor (frees its memory, keeps shapes)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def _move_buffers(module: nn.Module, device, skip: nn.Module | None = None) -> None:
    """Move the buffers of `module` outside `skip` (rotary tables, embedding scales: built on CPU with the shell)."""
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    for sub in module.modules():
        if id(sub) in skipped:
            continue
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.device != torch.device(device):
                sub._buffers[name] = buf.to(device)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where there is none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS.

    Without it glibc keeps a freed block's 16 MiB attention matrices in its heap (they fall under
    its grown mmap threshold) and fragmentation keeps them there: measured on the 1.1B Llama,
    RSS grew 16-32 MiB per streamed block (+480 MiB over 22 blocks) while the live tensors stayed
    at 500 MiB; with a trim after each block it stayed flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def meta_parameters(module: nn.Module, skip: nn.Module | None = None) -> list[str]:
    """Names of parameters still on the meta device (never loaded), outside `skip`."""
    skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
    return [name for name, p in module.named_parameters()
            if p.device.type == "meta" and id(p) not in skipped]


# ---------------------------------------------------------------- weight sources

class ModuleSource:
    """A model already in memory (usually CPU): the non-block part is moved to the device for the
    walk and each block only while it is resident; everything goes back where it was on close."""

    def __init__(self, model: nn.Module, device: str):
        self.model, self.device = model, torch.device(device)
        self.blocks = block_list_site(model)[2]
        self._homes = [_home(b) for b in self.blocks]
        self._rest: list[tuple[torch.Tensor, torch.device]] = []
        with torch.inference_mode(False):  # moved weights must stay usable for training later
            block_ids = {id(t) for b in self.blocks for t in [*b.parameters(), *b.buffers()]}
            for t in [*model.parameters(), *model.buffers()]:
                if id(t) not in block_ids and t.device != self.device:
                    self._rest.append((t, t.device))
                    t.data = t.data.to(self.device)

    def load(self, j: int) -> nn.Module:
        """Block j on the device."""
        if self._homes[j] != self.device:
            with torch.inference_mode(False):
                self.blocks[j].to(self.device)
        return self.blocks[j]

    def unload(self, j: int) -> None:
        """Block j back where it was."""
        if self._homes[j] != self.device:
            with torch.inference_mode(False):
                self.blocks[j].to(self._homes[j])

    def close(self) -> None:
        """Non-block weights back where they were."""
        with torch.inference_mode(False):
            for t, home in self._rest:
                t.data = t.data.to(home)
        self._rest = []


def _home(module: nn.Module) -> torch.device:
    """The device a module's weights live on (CPU for a module without any)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class FolderSource:
    """A safetensors model folder read lazily: a meta-device shell plus one block's tensors at a time."""

    def __init__(self, folder: str | os.PathLike, device: str, dtype: torch.dtype = torch.float32):
        from iterabre.models import check_model_folder

        self.folder, self.device, self.dtype = Path(folder), torch.device(device), dtype
        check_model_folder(self.folder)  # one-line errors for damaged files, before anything is built
        self.files = tensor_files(self.folder)  # tensor name -> file
        self.model = build_shell(self.folder, dtype)
        self.mapping = conversion_mapping(self.model)
        self.blocks = block_list_site(self.model)[2]
        self.groups = group_by_block(list(self.files), self.model)
        check_blocks_match(self.groups, len(self.blocks), str(self.folder))
        self._load_rest()

    def _load_rest(self) -> None:
        """Embedding, final norm, LM head and every other non-block weight onto the device."""
        with torch.inference_mode(False):  # loaded as ordinary tensors: transformers makes Parameters of them
            _assign(self.model, self._read(self.groups.get(None, [])), self.device, self.dtype, self.mapping)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()  # the head shares the (now loaded) input embedding again
        _move_buffers(self.model, self.device, skip=self.blocks)
        release_freed_memory()  # the checkpoint-dtype copies read for the conversion
        missing = meta_parameters(self.model, skip=self.blocks)
        if missing:
            raise IterabreError(f"{self.folder} has no tensors for {', '.join(missing[:3])}"
                                f"{' ...' if len(missing) > 3 else ''} of the model its config.json describes.",
                                _MISMATCH_FIX)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """These tensors, read from their files (safe_open maps the file: only their pages are read)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    out.update({k: f.get_tensor(k) for k in keys})
            except Exception as e:  # SafetensorError: the index names a tensor its shard does not hold
                raise IterabreError(f"{file} cannot give the tensors its index assigns to it "
                                    f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}).",
                                    "its shard index and shards disagree; copy or save the folder again") from None
        return out

    def load(self, j: int) -> nn.Module:
        """Block j's weights read from disk onto the device (converted like from_pretrained does)."""
        block = self.blocks[j]
        with torch.inference_mode(False):  # loaded as ordinary tensors: transformers makes Parameters of them
            _assign(self.model, self._read(self.groups[j]), self.device, self.dtype, self.mapping)
        missing = meta_parameters(block)
        if missing:
            raise IterabreError(f"{self.folder} has no tensors for {', '.join(missing[:3])} of block {j}.",
                                _MISMATCH_FIX)
        _move_buffers(block, self.device)
        return block

    def unload(self, j: int) -> None:
        """Free block j's weights (back to meta)."""
        _to_meta(self.blocks[j])
        release_freed_memory()

    def close(self) -> None:
        """Nothing stays open between reads."""


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it (sharded index, or the files' own headers)."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name in _header_names(file):
            out[name] = file
    if not out:
        raise IterabreError(f"{folder} has no safetensors weights.", "save the model with save_pretrained")
    return out


def _header_names(file: Path) -> list[str]:
    """Tensor names in a safetensors file's JSON header (no tensor data read)."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return [k for k in header if k != "__metadata__"]


def build_shell(folder: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `folder`'s config.json with every parameter on the meta device (no memory)."""
    from transformers import AutoConfig

    from iterabre.models import _check_config

    folder = Path(folder)
    _check_config(folder, str(folder), allow_remote_code=False)  # encoders, remote code: one line
    return shell_from_config(AutoConfig.from_pretrained(folder), dtype)


def shell_from_config(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM with every parameter on the meta device: shapes for `streamed_memory`, or a shell to fill.

    Buffers are built for real (on CPU): rotary tables and embedding scales are computed from
    the config in the modules' constructors and are not all stored in checkpoints.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # one embedding/head parameter, as in the loaded model (and in memory counts)
    return model.eval()


@contextlib.contextmanager
def _quiet_loading():
    """transformers draws a 'Loading weights' progress bar per call: hide it for per-block loads."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def conversion_mapping(model: nn.Module) -> list | None:
    """transformers' checkpoint conversions for this model (built once: it compiles many patterns).

    transformers >= 5 saves some layouts differently from the modules (Mixtral / Qwen3-MoE experts
    are stored one tensor per expert and fused on load); None on older versions, which load
    checkpoint names as they are.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return None
    return get_model_conversion_mapping(model)


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
            mapping: list | None) -> None:
    """Put checkpoint tensors into the shell's parameters on `device`, converted as from_pretrained would.

    transformers' own loader does the conversion (`mapping`, see conversion_mapping) on just
    these tensors, so a block gets exactly the weights `from_pretrained` would give it.
    """
    if not tensors:
        return
    if mapping is None:
        return _assign_by_name(model, tensors, device, dtype)
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    config = LoadStateDictConfig(device_map={"": str(device)}, dtype=dtype, weight_mapping=mapping)
    with _quiet_loading():
        info, _ = convert_and_load_state_dict_in_model(model, tensors, config)
    problems = sorted(info.unexpected_keys) + [str(k[0]) for k in info.mismatched_keys]
    if problems or info.conversion_errors:
        what = problems[:3] or list(info.conversion_errors)[:3]
        raise IterabreError(f"tensors {', '.join(map(str, what))} do not fit the model its config.json describes "
                            "(unknown names or other shapes).", _MISMATCH_FIX)


def _assign_by_name(model, tensors, device, dtype) -> None:
    """Checkpoint name == parameter name (optionally without the base-model prefix)."""
    from accelerate.utils import set_module_tensor_to_device

    names = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "")
    for key, value in tensors.items():
        name = key if key in names else f"{prefix}.{key}"
        if name not in names:
            raise IterabreError(f"tensor {key} does not belong to the model its config.json describes.",
                                _MISMATCH_FIX)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)


def open_source(weights, device: torch.device, dtype: torch.dtype | None = None):
    """A ModuleSource for an nn.Module, a FolderSource for a folder path."""
    if device.type == "cuda" and device.index is None:  # 'cuda' -> 'cuda:0', as tensors report it
        device = torch.device("cuda", torch.cuda.current_device())
    if isinstance(weights, nn.Module):
        return ModuleSource(weights, device)
    return FolderSource(weights, device, dtype or torch.float32)


# ---------------------------------------------------------------- memory planning

def _bytes(module: nn.Module, dtype: torch.dtype, skip: nn.Module | None = None) -> int:
    """Bytes of the module's parameters in `dtype` (meta parameters count: only shapes are read)."""
    skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in skipped or id(p) in seen:
            continue
        seen.add(id(p))  # tied weights (embedding = head) count once
        total += p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size())
    return total


def ffn_width(config) -> int:
    """Widest per-token intermediate of a block's MLP (MoE: experts each token visits)."""
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    dense = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or \
        getattr(config, "ffn_dim", None) or 4 * hidden
    moe = getattr(config, "moe_intermediate_size", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    return int(max(dense, (moe or dense) * (top_k or 1)))


def call_bytes(config, rows: int, seq_len: int, dtype: torch.dtype) -> int:
    """Transient memory of one block call on [rows, seq_len, d], its input and output copies included.

    Upper-bound style: gate, up and their product ([rows, T, ffn] x3), q/k/v/attention output and
    residuals ([rows, T, d] x6), the stacked input and the output ([rows, T, d] x2), one
    [rows, heads, T, T] float32 score matrix (eager / CPU attention).
    """
    return _call_bytes(rows, seq_len, _hidden_size(config), ffn_width(config), _heads(config), dtype.itemsize)


def _call_bytes(rows: int, seq_len: int, hidden: int, ffn: int, heads: int, itemsize: int) -> int:
    """call_bytes from the sizes alone (the planner has sizes, not a config)."""
    return rows * seq_len * (3 * ffn + 8 * hidden) * itemsize + rows * heads * seq_len * seq_len * 4


def _heads(config) -> int:
    return int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))


def _hidden_size(config) -> int:
    """Width d of the residual stream (GPT-2 calls it n_embd)."""
    return int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))


@dataclass
class StreamPlan:
    """Where the streams go and how many candidates share one block call."""

    stream_device: torch.device
    per_call: int  # candidate streams batched into one block call
    groups: list[list[int]]  # calibration batches walked together (one weight pass per group)


def _free_bytes(device: torch.device) -> int:
    """Memory free on `device` now: CUDA's free memory, or Linux's MemAvailable for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_ram()


def plan_streams(config, device: torch.device, batch_rows: list[int], seq_len: int, streams_per_row: int,
                 dtype: torch.dtype, call_budget: int | None = None) -> StreamPlan:
    """Place the streams (device when they fit, else CPU) and size the batched candidate calls.

    Each calibration row needs `streams_per_row` [T, d] streams (dense + one per candidate). All
    batches are walked in one weight pass when their streams fit the chosen memory; otherwise
    they are split into groups, each group one more pass over the weights.
    """
    row_bytes = streams_per_row * seq_len * _hidden_size(config) * dtype.itemsize
    total = row_bytes * sum(batch_rows)
    fits_device = device.type == "cpu" or total <= DEVICE_STREAM_SHARE * _free_bytes(device)
    stream_device = device if fits_device else torch.device("cpu")
    budget = total if stream_device.type != "cpu" else \
        max(row_bytes, int(CPU_STREAM_SHARE * _free_bytes(torch.device("cpu"))))
    groups, used = [[]], 0
    for b, rows in enumerate(batch_rows):
        if groups[-1] and used + rows * row_bytes > budget:
            groups.append([])
            used = 0
        groups[-1].append(b)
        used += rows * row_bytes
    if call_budget is None:
        call_budget = CPU_CALL_BUDGET if device.type == "cpu" else int(DEVICE_CALL_SHARE * _free_bytes(device))
    per_call = max(1, call_budget // max(call_bytes(config, max(batch_rows), seq_len, dtype), 1))
    return StreamPlan(stream_device, int(per_call), groups)


def streamed_memory(model: nn.Module, tokens: int, seq_len: int, batch_size: int, scorer: str = "output",
                    n: int = 1, dtype: torch.dtype = torch.float32, per_call: int = 1) -> dict[str, int]:
    """Peak bytes the streamed scorer adds, by part (see memory_parts); `model` may be a meta-device
    shell (shapes only)."""
    _, _, blocks = block_list_site(model)
    config = model.config
    return memory_parts(block=max(_bytes(b, dtype) for b in blocks), root=_bytes(model, dtype, skip=blocks),
                        layers=len(blocks), hidden=_hidden_size(config), ffn=ffn_width(config),
                        heads=_heads(config), vocab=int(getattr(config, "vocab_size", 0)), tokens=tokens,
                        seq_len=seq_len, batch_size=batch_size, itemsize=dtype.itemsize, scorer=scorer, n=n,
                        per_call=per_call)


def memory_parts(*, block: int, root: int, layers: int, hidden: int, ffn: int, heads: int, vocab: int, tokens: int,
                 seq_len: int, batch_size: int, itemsize: int, scorer: str, n: int = 1,
                 per_call: int = 1) -> dict[str, int]:
    """The streamed scorer's peak by part, from sizes alone (bytes); the planner's score phase uses it too.

    total = 2 x largest block (the resident one + the copy being read or converted)
          + streams: tokens x d x (L + 1) (output, perplexity) or x (n + 1) (block-influence, angular)
          + embedding, final norm and LM head (`root`; tied: counted once)
          + one block call: `per_call` candidate batches of `batch_size` rows (call_bytes)
          + perplexity: logits of one batch, with the float32 copies the cross-entropy makes (x3)
    """
    from iterabre.scorers import SCORERS

    rule = SCORERS[scorer]
    per_token = (layers + 1) if rule.kind == "resume" else (n + 1)
    per_call = min(per_call, layers) if rule.kind == "resume" else 1  # pair scorers: the dense stream only
    rows = min(batch_size, max(1, math.ceil(tokens / seq_len)))
    logits = 3 * rows * seq_len * vocab * 4 if rule.target == "logits" else 0
    parts = {"blocks": 2 * block, "streams": tokens * hidden * per_token * itemsize, "embedding_head": root,
             "activations": per_call * _call_bytes(rows, seq_len, hidden, ffn, heads, itemsize) + logits}
    return {**parts, "total": sum(parts.values()), "one_block": block}
