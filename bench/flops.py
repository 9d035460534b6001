"""FLOPs of KD recovery and model FLOPs utilisation (MFU), for the GPU runs of bench/recovery.py.

The counting lives in the library, `iterabre.flops` (one copy, also used to record every
recovery phase's and scoring pass's FLOPs); this module re-exports what the benchmarks use.
Counts follow the usual transformer accounting (Kaplan et al. 2020; PaLM appendix B): a
matmul weight costs 2 FLOPs per token forward and 4 backward, attention scores and values add
2 * 2 * T * W per layer and token forward (T = sequence length, W = heads x head_dim, causal
masking not subtracted, as in PaLM's MFU). The embedding lookup is free; a tied LM head is a
matmul like any other. KD = teacher forward + student forward and backward.
"""

from __future__ import annotations

from iterabre.flops import (PEAK_BF16_TFLOPS, attention_flops, forward_flops_per_token,  # noqa: F401
                            kd_flops_per_token, matmul_params, mfu, peak_tflops)
