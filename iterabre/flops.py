"""FLOPs counted from tensor shapes: per-token formulas, and a counter of what actually ran.

One convention everywhere (Kaplan et al. 2020; PaLM appendix B):

- a matmul weight costs 2 FLOPs per token forward; backward adds 2 for the input gradient
  and 2 for the weight gradient, each only where autograd needs it (so a fully trained
  layer costs 3x its forward, a frozen layer that gradients pass through 2x, a frozen layer
  below every trained one 1x);
- attention scores and values (QK^T, AV) add 2 * 2 * T * W per layer and token forward
  (T = sequence length, W = heads x head_dim; causal and sliding-window masking are not
  subtracted, as in PaLM's MFU), and twice that backward when gradients pass through;
- embedding lookups, norms, activations, softmax and the loss are not counted (a few % of
  the total for a 135M model, less for bigger ones); a tied LM head is a matmul like any other.

`count_flops(*models)` measures a phase by these rules: while it is open, every
`nn.Linear` / GPT-2 `Conv1D` call and every attention module call on this thread adds its
cost from its output's shape, and its backward cost when the output will receive a gradient
(`requires_grad` with autograd on). So it counts what really ran: the fast or the naive
scoring path, early-stopped forwards, LoRA adapters, held-out checks, gradient
checkpointing's recomputed forwards (as forwards). The per-token formulas below give the
same numbers for planning (equal-compute budgets) and MFU; tests/test_block_recon.py checks
one against the other and both against a hand count.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, from the vendors' data sheets; the first
# name that appears in torch.cuda.get_device_name() wins. Pass --peak-tflops for anything else.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}


# ---------------------------------------------------------------- per-token formulas

def _is_matmul(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a Linear with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def matmul_params(model: nn.Module) -> int:
    """Weights used as matmuls per token: every Linear (and GPT-2 Conv1D) incl. the LM head."""
    seen, total = set(), 0
    for module in model.modules():
        if _is_matmul(module) and id(module.weight) not in seen:  # a tied head counts once
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def attention_width(config) -> int:
    """W = query heads x head_dim: the width of QK^T and AV (hidden_size for most models, not all)."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    return heads * (getattr(config, "head_dim", None) or hidden // heads)


def attention_flops(model: nn.Module, seq_len: int) -> int:
    """Forward FLOPs per token of QK^T and AV over all layers: 2 * 2 * seq_len * W per layer."""
    return 4 * seq_len * attention_width(model.config) * model.config.num_hidden_layers


def forward_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """One forward of the whole model (LM head included) per token."""
    return 2 * matmul_params(model) + attention_flops(model, seq_len)


def block_flops_per_token(block: nn.Module, config, seq_len: int) -> int:
    """One forward of one decoder block per token."""
    return 2 * matmul_params(block) + 4 * seq_len * attention_width(config)


def kd_flops_per_token(student: nn.Module, teacher: nn.Module, seq_len: int) -> int:
    """Teacher forward (2N + attn) + student forward and backward, all weights trained (3 x (2N + attn))."""
    return forward_flops_per_token(teacher, seq_len) + 3 * forward_flops_per_token(student, seq_len)


def peak_tflops(device_name: str | None, override: float | None = None) -> float | None:
    """The accelerator's dense bf16 peak, from --peak-tflops or the table (None when unknown / CPU)."""
    if override:
        return override
    if not device_name:
        return None
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in device_name.lower()), None)


def mfu(tokens_per_s: float, flops_per_token: int, peak: float | None) -> float | None:
    """Achieved FLOP/s as a fraction of `peak` TFLOP/s (None without a peak)."""
    return tokens_per_s * flops_per_token / (peak * 1e12) if peak else None


# ---------------------------------------------------------------- counting what runs

def _first_tensor(x):
    """A module's output as one tensor (attention modules return (output, weights))."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _attention_width_of(module: nn.Module) -> int | None:
    """W of a transformers attention module (any family: they all keep their config), else None."""
    config = getattr(module, "config", None)
    if not type(module).__name__.endswith("Attention") or getattr(config, "num_attention_heads", None) is None:
        return None
    heads = config.num_attention_heads
    head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
    return heads * (head_dim or config.hidden_size // heads)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (gradient checkpointing recomputes forwards then)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class FlopCounter:
    """Running totals of one `count_flops` block: forward, backward, and their sum."""

    def __init__(self):
        self.forward, self.backward = 0, 0
        self._thread = threading.get_ident()
        self._widths: dict[int, int | None] = {}  # attention module id -> W (None: not attention)

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def _matmul(self, module: nn.Module, args, out: torch.Tensor) -> None:
        """out [..., d_out]: 2 FLOPs per weight and token; backward for the gradients autograd will need."""
        weight = module.weight
        tokens = out.numel() // out.shape[-1]
        cost = 2 * tokens * weight.numel()
        self.forward += cost
        if out.requires_grad and torch.is_grad_enabled() and not _in_backward():
            x = args[0] if args else None
            self.backward += cost * (int(isinstance(x, torch.Tensor) and x.requires_grad) + int(weight.requires_grad))

    def _attention(self, width: int, out: torch.Tensor) -> None:
        """out [B, T, d]: QK^T and AV, 2 * 2 * T * W per token; twice that backward when gradients pass."""
        tokens, seq_len = out.numel() // out.shape[-1], out.shape[-2]
        cost = 4 * seq_len * width * tokens
        self.forward += cost
        if out.requires_grad and torch.is_grad_enabled() and not _in_backward():
            self.backward += 2 * cost

    def hook(self, module: nn.Module, args, output) -> None:
        """Global forward hook: add the cost of one module call made on the counting thread."""
        if threading.get_ident() != self._thread:
            return
        out = _first_tensor(output)
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            return
        if _is_matmul(module):
            self._matmul(module, args, out)
            return
        key = id(module)
        if key not in self._widths:
            self._widths[key] = _attention_width_of(module)
        if self._widths[key] is not None and out.dim() >= 2:
            self._attention(self._widths[key], out)


@contextlib.contextmanager
def count_flops():
    """Count the FLOPs of every matmul and attention module call on this thread inside the block.

    A global forward hook (torch.nn.modules.module.register_module_forward_hook), so modules
    created inside the block (LoRA adapters) and blocks called directly (replays) are counted
    too. Calls made while a backward pass recomputes activations count as forwards only.
    """
    counter = FlopCounter()
    handle = nn.modules.module.register_module_forward_hook(counter.hook)
    try:
        yield counter
    finally:
        handle.remove()
