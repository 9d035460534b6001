"""Block surgery: find, count and remove the decoder blocks of a transformers causal LM.

Removal keeps the model loadable by plain `AutoModelForCausalLM.from_pretrained`: the
layer count, every per-layer config list (`layer_types`, sliding-window patterns, ...)
and every `layer_idx` (which the KV cache uses to pick its slot) are renumbered. The
base model's numbering of the surviving blocks is kept in
`config.iterabre_original_layers`, so scores and reports always speak original indices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from iterabre.errors import IterabreError

ORIGINAL_LAYERS_KEY = "iterabre_original_layers"
# Config lists that can have the layer count's length by coincidence but are not per-layer.
_NOT_PER_LAYER = {"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"}


def _layer_count(config) -> int | None:
    """The config's block count (`num_hidden_layers`, or its alias such as GPT-2's `n_layer`)."""
    return getattr(config, "num_hidden_layers", None)


def block_list_site(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, ModuleList) holding the decoder blocks."""
    root = getattr(model, "base_model", model)
    count = _layer_count(model.config)
    best = None
    for parent_name, parent in root.named_modules():
        for name, child in parent.named_children():
            if not isinstance(child, nn.ModuleList) or len(child) == 0:
                continue
            if count is not None and len(child) != count:
                continue
            # Several lists may match the count (e.g. per-layer adapters); the blocks hold the weights.
            size = sum(p.numel() for p in child.parameters())
            if best is None or size > best[0]:
                best = (size, parent, name, child)
    if best is None:
        raise IterabreError(
            f"No ModuleList of {count} decoder blocks found in {type(model).__name__}.",
            "use a transformers causal LM whose decoder blocks sit in an nn.ModuleList "
            "(Llama, Qwen2/3, Mistral, Gemma2/3, Phi3, GPT-2, GPT-NeoX, OPT, ...).")
    return best[1], best[2], best[3]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, in execution order."""
    return block_list_site(model)[2]


def num_blocks(model: nn.Module) -> int:
    """How many decoder blocks the model has now."""
    return len(decoder_blocks(model))


def original_indices(model: nn.Module) -> list[int]:
    """The base model's numbering of the blocks that remain (position -> original index)."""
    n = num_blocks(model)
    stored = getattr(model.config, ORIGINAL_LAYERS_KEY, None)
    if stored is None:
        return list(range(n))
    stored = [int(i) for i in stored]
    if len(stored) != n:
        raise IterabreError(
            f"config.{ORIGINAL_LAYERS_KEY} lists {len(stored)} blocks but the model has {n}.",
            f"the config was edited by hand; delete {ORIGINAL_LAYERS_KEY} from config.json "
            "or restore the matching weights.")
    return stored


def _per_layer_keys(config, n: int) -> list[str]:
    """Top-level config attributes that are lists with one entry per block."""
    keys = []
    for key, value in vars(config).items():
        if key in _NOT_PER_LAYER or key.endswith("token_id") or key.endswith("token_ids"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == n:
            keys.append(key)
    return keys


def _check_supported(model: nn.Module) -> None:
    """Refuse architectures whose block math depends on the block's position."""
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise IterabreError(
            "This model scales attention by 1/(layer_idx+1), so renumbering blocks changes their output.",
            "remove blocks only from models with scale_attn_by_inverse_layer_idx=False.")
    if getattr(model.config, "is_heterogeneous", False):
        raise IterabreError(
            "This model has a heterogeneous per-layer config, which block removal cannot renumber yet.",
            "use a model without config.per_layer_config.")


def _positions_of(model: nn.Module, original: list[int]) -> list[int]:
    """Current positions of the given original indices; raises for absent ones."""
    present = original_indices(model)
    missing = sorted(set(original) - set(present))
    if missing:
        raise IterabreError(
            f"Block(s) {missing} are not in the model; present original indices: {present}.",
            "pass original (base-model) indices of blocks that have not been removed yet.")
    return sorted(present.index(i) for i in set(original))


def _apply_keep(model: nn.Module, keep: list[int]) -> None:
    """Keep only the blocks at positions `keep` (ascending) and renumber everything."""
    parent, name, blocks = block_list_site(model)
    config = model.config
    n_old = len(blocks)
    origin = original_indices(model)
    per_layer = _per_layer_keys(config, n_old)
    setattr(parent, name, nn.ModuleList([blocks[p] for p in keep]))
    for key in per_layer:
        value = getattr(config, key)
        setattr(config, key, type(value)(value[p] for p in keep))
    config.num_hidden_layers = len(keep)  # maps to n_layer etc. through config.attribute_map
    setattr(config, ORIGINAL_LAYERS_KEY, [origin[p] for p in keep])
    for new_pos, block in enumerate(getattr(parent, name)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_pos


def remove_blocks(model: nn.Module, original: list[int]) -> nn.Module:
    """Remove the blocks with these ORIGINAL indices, in place; returns the model."""
    _check_supported(model)
    original = [int(i) for i in original]
    drop = set(_positions_of(model, original))
    n = num_blocks(model)
    if n - len(drop) < 1:
        raise IterabreError(
            f"Removing {sorted(set(original))} would leave no decoder block (the model has {n}).",
            "remove fewer blocks; at least one must remain.")
    if drop:
        _apply_keep(model, [p for p in range(n) if p not in drop])
    return model


def _snapshot(model: nn.Module) -> dict:
    """Everything `_apply_keep` changes, so it can be undone exactly."""
    parent, name, blocks = block_list_site(model)
    config = model.config
    keys = _per_layer_keys(config, len(blocks)) + ["num_hidden_layers"]
    had_origin = ORIGINAL_LAYERS_KEY in vars(config)
    idx = [(m, m.layer_idx) for b in blocks for m in b.modules()
           if isinstance(getattr(m, "layer_idx", None), int)]
    return dict(parent=parent, name=name, blocks=blocks, idx=idx, had_origin=had_origin,
                config={k: getattr(config, k) for k in keys} | (
                    {ORIGINAL_LAYERS_KEY: getattr(config, ORIGINAL_LAYERS_KEY)} if had_origin else {}))


def _restore(model: nn.Module, snap: dict) -> None:
    """Undo `_apply_keep` from a snapshot."""
    setattr(snap["parent"], snap["name"], snap["blocks"])
    for key, value in snap["config"].items():
        setattr(model.config, key, value)
    if not snap["had_origin"] and ORIGINAL_LAYERS_KEY in vars(model.config):
        delattr(model.config, ORIGINAL_LAYERS_KEY)
    for module, value in snap["idx"]:
        module.layer_idx = value


@contextlib.contextmanager
def blocks_skipped(model: nn.Module, positions: list[int]) -> Iterator[nn.Module]:
    """Temporarily remove the blocks at these POSITIONS (no copy); restored on exit."""
    n = num_blocks(model)
    keep = [p for p in range(n) if p not in set(positions)]
    if not keep:
        raise IterabreError(f"Skipping positions {positions} leaves no block.", "skip fewer blocks.")
    snap = _snapshot(model)
    try:
        _apply_keep(model, keep)
        yield model
    finally:
        _restore(model, snap)
