"""Capture and replay the residual stream of a decoder stack.

One full forward with forward pre-hooks records, for every block, the exact args and
kwargs it received (attention mask, rotary position embeddings, position ids, ...) and
its input hidden states. Any suffix of the stack can then be replayed from a cached
hidden state: only the hidden-states argument changes, every other input is the one the
model built itself. This keeps the fast scorers architecture-agnostic: no model's mask or
rotary code is re-implemented here. Under `blocks_as_identity` the same capture records every
block's call without running (or even having) the blocks' weights, which is what the streamed
scorer replays one resident block at a time (`call_block`, `tile_call` for several streams).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from iterabre.surgery import block_list_site

# Modules the owner of the block list applies after the last block, in order
# (Llama/Qwen/Mistral/Gemma/Phi3: norm; GPT-2: ln_f; GPT-NeoX/OPT: final_layer_norm; OPT: project_out).
_TAIL_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "project_out")


@dataclass
class BlockCall:
    """What one block received: positional args after hidden_states, and kwargs."""

    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool = False


@dataclass
class StackCapture:
    """One batch's residual stream: xs[i] enters block i, xs[L] leaves the last block."""

    xs: list[torch.Tensor] = field(default_factory=list)  # L+1 tensors [B, T, d]
    calls: list[BlockCall] = field(default_factory=list)  # L entries
    final: torch.Tensor | None = None  # [B, T, d] base model output (after the final norm)
    logits: torch.Tensor | None = None  # [B, T, V] when captured through the LM head


def _hidden_of(output):
    """Blocks return a tensor (transformers 5) or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _pre_hook(capture: StackCapture, position: int):
    """Forward pre-hook that records block `position`'s inputs."""
    def hook(module, args, kwargs):
        if args:
            capture.xs[position] = args[0]
            capture.calls[position] = BlockCall(tuple(args[1:]), dict(kwargs))
        else:
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            capture.xs[position] = kwargs["hidden_states"]
            capture.calls[position] = BlockCall((), rest, hidden_in_kwargs=True)
    return hook


def capture_stack(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  with_logits: bool = False) -> StackCapture:
    """Run the model once (no KV cache) and record every block's input and call."""
    owner, _, blocks = block_list_site(model)
    n = len(blocks)
    cap = StackCapture(xs=[None] * (n + 1), calls=[None] * n)
    handles = [b.register_forward_pre_hook(_pre_hook(cap, i), with_kwargs=True)
               for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(
        lambda m, a, out: cap.xs.__setitem__(n, _hidden_of(out))))
    # The blocks' owner returns last_hidden_state (OPT's LM head calls the owner, not base_model).
    handles.append(owner.register_forward_hook(
        lambda m, a, out: setattr(cap, "final", out[0] if isinstance(out, tuple) else out.last_hidden_state)))
    try:
        runner = model if with_logits else getattr(model, "base_model", model)
        out = runner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if with_logits:
        cap.logits = out.logits
    return cap


def call_block(block: nn.Module, call: BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    """One block on `hidden` [B, T, d] with the other inputs of a recorded call -> its output [B, T, d]."""
    if call.hidden_in_kwargs:
        return _hidden_of(block(hidden_states=hidden, **call.kwargs))
    return _hidden_of(block(hidden, *call.args, **call.kwargs))


def run_blocks(blocks: nn.ModuleList, calls: list[BlockCall], hidden: torch.Tensor,
               start: int) -> torch.Tensor:
    """Replay blocks start..L-1 on `hidden` [B, T, d] with their recorded inputs."""
    for pos in range(start, len(blocks)):
        hidden = call_block(blocks[pos], calls[pos], hidden)
    return hidden


def _tile(value, rows: int, times: int, memo: dict):
    """`value` repeated `times` along a leading batch dim of size `rows`; anything else as it is.

    Only tensors of rank >= 2 whose first dim is the batch are tiled (masks [B, 1, T, T], position
    ids [B, T], rotary tables [B, T, hd]); rank-1 tensors (cache_position [T]) and tensors with a
    broadcast batch dim of 1 (when B > 1) are shared unchanged. With B == 1 a leading 1 is tiled,
    which is the same as broadcasting it. `memo` keeps the largest tiling of each tensor so far
    (and the tensor, so its id stays unique); a smaller one is a view of its first rows.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() < 2 or value.shape[0] != rows or times == 1:
            return value
        _, tiled = memo.get(id(value), (None, None))
        if tiled is None or tiled.shape[0] < rows * times:
            tiled = value.repeat(times, *([1] * (value.dim() - 1)))
            memo[id(value)] = (value, tiled)
        return tiled[:rows * times]
    if isinstance(value, (tuple, list)):
        return type(value)(_tile(v, rows, times, memo) for v in value)
    if isinstance(value, dict):
        return {k: _tile(v, rows, times, memo) for k, v in value.items()}
    return value


def tile_call(call: BlockCall, rows: int, times: int, memo: dict | None = None) -> BlockCall:
    """The same call for `times` streams of `rows` rows stacked along the batch dim (one block call)."""
    memo = {} if memo is None else memo
    return BlockCall(_tile(call.args, rows, times, memo), _tile(call.kwargs, rows, times, memo),
                     call.hidden_in_kwargs)


def _return_input(hidden_states, *args, **kwargs):
    """A block's forward that returns its input: the stream passes through untouched."""
    return hidden_states


@contextlib.contextmanager
def blocks_as_identity(model: nn.Module):
    """Every block returns its input unchanged, its weights untouched (they may be on meta); restored on exit.

    The model's own forward then still builds everything it passes to the blocks (masks per
    layer type, rotary tables, position ids): `capture_stack` under it records those calls
    for the price of the embedding and the final norm.
    """
    _, _, blocks = block_list_site(model)
    saved = [vars(b).get("forward") for b in blocks]  # an instance-level forward (a hook wrapper) is kept
    try:
        for b in blocks:
            b.forward = _return_input
        yield
    finally:
        for b, forward in zip(blocks, saved):
            if forward is None:
                del b.forward
            else:
                b.forward = forward


def tail_modules(model: nn.Module) -> list[nn.Module]:
    """Modules applied after the last block (final norm, projections), in order."""
    parent, _, _ = block_list_site(model)
    return [getattr(parent, name) for name in _TAIL_NAMES
            if isinstance(getattr(parent, name, None), nn.Module)]


@contextlib.contextmanager
def tail_as_identity(model: nn.Module):
    """Temporarily replace the modules after the last block by identities (restored on exit)."""
    parent, _, _ = block_list_site(model)
    saved = {name: getattr(parent, name) for name in _TAIL_NAMES
             if isinstance(getattr(parent, name, None), nn.Module)}
    try:
        for name in saved:
            setattr(parent, name, nn.Identity())
        yield
    finally:
        for name, module in saved.items():
            setattr(parent, name, module)


def apply_tail(tail: list[nn.Module], hidden: torch.Tensor) -> torch.Tensor:
    """Last block's output [B, T, d] -> the base model's last_hidden_state."""
    for module in tail:
        hidden = module(hidden)
    return hidden


def lm_logits(model: nn.Module, final: torch.Tensor) -> torch.Tensor:
    """LM head on last_hidden_state [B, T, d] -> logits [B, T, V], with softcapping if any."""
    logits = model.get_output_embeddings()(final)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
