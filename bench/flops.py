"""FLOPs of KD recovery and model FLOPs utilisation (MFU), for the GPU runs of bench/recovery.py.

Counts follow the usual transformer accounting (Kaplan et al. 2020; PaLM appendix B): a
matmul weight costs 2 FLOPs per token forward and 4 backward, attention scores and values add
2 * 2 * T * H per layer and token forward (T = sequence length, H = hidden size, causal
masking not subtracted, as in PaLM's MFU). The embedding lookup is free; a tied LM head is a
matmul like any other. KD = teacher forward + student forward and backward.
"""

from __future__ import annotations

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, from the vendors' data sheets; the first
# name that appears in torch.cuda.get_device_name() wins. Pass --peak-tflops for anything else.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}


def matmul_params(model) -> int:
    """Weights used as matmuls per token: every Linear (and GPT-2 Conv1D) incl. the LM head."""
    from torch import nn

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            if id(module.weight) not in seen:  # a tied head counts once
                seen.add(id(module.weight))
                total += module.weight.numel()
    return total


def attention_flops(model, seq_len: int) -> int:
    """Forward FLOPs per token of QK^T and AV over all layers: 2 * 2 * seq_len * hidden per layer."""
    cfg = model.config
    return 4 * seq_len * cfg.hidden_size * cfg.num_hidden_layers


def kd_flops_per_token(student, teacher, seq_len: int) -> int:
    """Teacher forward (2N + attn) + student forward and backward (3 x (2N + attn))."""
    teacher_fwd = 2 * matmul_params(teacher) + attention_flops(teacher, seq_len)
    student_fwd = 2 * matmul_params(student) + attention_flops(student, seq_len)
    return teacher_fwd + 3 * student_fwd


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
