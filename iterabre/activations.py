"""Capture and replay the residual stream of a decoder stack.

One full forward with forward pre-hooks records, for every block, the exact args and
kwargs it received (attention mask, rotary position embeddings, position ids, ...) and
its input hidden states. Any suffix of the stack can then be replayed from a cached
hidden state: only the hidden-states argument changes, every other input is the one the
model built itself. This keeps the fast scorers architecture-agnostic: no model's mask or
rotary code is re-implemented here.
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


def run_blocks(blocks: nn.ModuleList, calls: list[BlockCall], hidden: torch.Tensor,
               start: int) -> torch.Tensor:
    """Replay blocks start..L-1 on `hidden` [B, T, d] with their recorded inputs."""
    for pos in range(start, len(blocks)):
        call = calls[pos]
        if call.hidden_in_kwargs:
            out = blocks[pos](hidden_states=hidden, **call.kwargs)
        else:
            out = blocks[pos](hidden, *call.args, **call.kwargs)
        hidden = _hidden_of(out)
    return hidden


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
