"""Knowledge-distillation loss: forward KL(teacher || student) plus optional CE and hidden MSE.

The math lives in pure functions over tensors (`forward_kl`, `next_token_ce`, `hidden_mse`);
`KDLoss` only weights and sums them. Every term is a mean over the *valid* (non-padding)
tokens, computed in float32 on the selected rows only, so whatever sits in padded
positions (even inf/NaN) cannot leak into the loss. Rows are processed in chunks so the
float32 softmax intermediates of a big vocabulary (49k-150k) never exist for all tokens
at once. The KL term has a hand-written backward (`_FusedForwardKL`) that keeps nothing of
size [N,V] and makes fewer passes over the logits than plain autograd
(`forward_kl_reference`, which the tests compare it against); CE chunks are checkpointed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from iterabre.errors import IterabreError

DEFAULT_CHUNK = 512  # rows (tokens) per chunk: 512 x 150k vocab x 4 B = 300 MB per fp32 buffer


def _valid_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x[B,T,D] -> x[N,D], the N rows where mask[B,T] is nonzero."""
    if x.shape[:2] != mask.shape:
        raise IterabreError(f"tensor of shape {tuple(x.shape)} does not match mask {tuple(mask.shape)}.",
                            "pass an attention_mask with the same [batch, seq] shape as the logits")
    rows, keep = x.reshape(-1, x.shape[-1]), mask.reshape(-1).bool()
    # No padding (recovery windows are full slices of a token stream): a view, not a [N,V] copy
    # whose backward would also scatter into a zero-filled [B*T,V] gradient.
    return rows if bool(keep.all()) else rows[keep]


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32; at T == 1 no extra [N,V] pass (and none in backward) for a no-op divide."""
    logits = logits.float()
    return logits if temperature == 1 else logits / temperature


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(softmax(t/T) || softmax(s/T)); [N,V] x [N,V] -> scalar (float32)."""
    log_q = F.log_softmax(_scaled(student, temperature), dim=-1)
    log_p = F.log_softmax(_scaled(teacher, temperature), dim=-1)
    # p * (log p - log q); p == 0 gives 0 * finite, never NaN, since log_softmax is finite.
    return (log_p.exp() * (log_p - log_q)).sum()


def _lse_via_softmax(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Row log-sum-exp [n] of logits [n,V] whose softmax `probs` is already computed.

    lse = max z - log max p (both maxima sit at the same column): two cheap reductions, where
    `torch.logsumexp` on CPU makes max, sub, exp, sum and log passes over a [n,V] temporary.
    """
    return logits.amax(dim=-1) - probs.amax(dim=-1).log()


class _FusedForwardKL(torch.autograd.Function):
    """Sum over rows of KL(softmax(t/T) || softmax(s/T)) with its analytic gradient (q - p) / T.

    Per row, KL = p.zt - p.zs - lse(zt) + lse(zs), because log p = zt - lse(zt),
    log q = zs - lse(zs) and sum p = 1: two softmaxes, four row maxima and two dot products,
    where plain autograd makes two log_softmaxes, exp, sub, mul and keeps them for backward.
    Nothing of size [N,V] is saved (only the inputs, which the caller holds anyway); backward
    recomputes q and p one chunk at a time.
    """

    @staticmethod
    def forward(ctx, student, teacher, temperature: float, chunk: int):  # [N,V], [N,V] -> scalar
        total = student.new_zeros((), dtype=torch.float32)
        for start in range(0, student.shape[0], chunk):
            zs = _scaled(student[start:start + chunk], temperature)  # [n,V] float32
            zt = _scaled(teacher[start:start + chunk], temperature)
            p, q = torch.softmax(zt, dim=-1), torch.softmax(zs, dim=-1)
            total += torch.dot(p.reshape(-1), zt.reshape(-1)) - torch.dot(p.reshape(-1), zs.reshape(-1))
            total += _lse_via_softmax(zs, q).sum() - _lse_via_softmax(zt, p).sum()
        ctx.save_for_backward(student, teacher)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total

    @staticmethod
    def backward(ctx, grad):
        student, teacher = ctx.saved_tensors
        temperature, n = ctx.temperature, student.shape[0]
        out = None if n <= ctx.chunk else torch.empty_like(student)  # one chunk: return it as is
        for start in range(0, n, ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            q = torch.softmax(_scaled(student[rows], temperature), dim=-1)  # [n,V] float32
            q -= torch.softmax(_scaled(teacher[rows], temperature), dim=-1)
            q.mul_(grad / temperature)
            if out is None:
                return q.to(student.dtype), None, None, None
            out[rows] = q
        return out, None, None, None


def _ce_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of -log softmax(logits)[target]; [N,V] x [N] -> scalar (float32)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _chunked_sum(fn, tensors: tuple[torch.Tensor, ...], chunk: int, *args) -> torch.Tensor:
    """sum(fn(t[i:i+chunk] for t in tensors)) over row chunks, checkpointing each under autograd."""
    n = tensors[0].shape[0]
    total = tensors[0].new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    for start in range(0, n, chunk):
        parts = tuple(t[start:start + chunk] for t in tensors)
        if needs_grad and n > chunk:
            # Recompute the fp32 softmax in backward instead of storing it for every chunk.
            total = total + checkpoint(fn, *parts, *args, use_reentrant=False)
        else:
            total = total + fn(*parts, *args)
    return total


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean over valid tokens of KL(teacher || student) at temperature T, scaled by T^2."""
    if temperature <= 0:
        raise IterabreError(f"KD temperature must be > 0, got {temperature}.", "use temperature >= 1")
    if student_logits.shape != teacher_logits.shape:
        raise IterabreError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                            f"{tuple(teacher_logits.shape)} differ.", "distil between models with the same vocabulary")
    s, t = _valid_rows(student_logits, mask), _valid_rows(teacher_logits, mask)  # [N,V]
    total = _FusedForwardKL.apply(s, t.detach(), temperature, chunk)
    # T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    return total * temperature**2 / max(s.shape[0], 1)


def forward_kl_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                         temperature: float = 1.0, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """`forward_kl` through plain autograd (log_softmax twice, checkpointed chunks): the slow reference."""
    s, t = _valid_rows(student_logits, mask), _valid_rows(teacher_logits, mask)  # [N,V]
    return _chunked_sum(_kl_rows, (s, t), chunk, temperature) * temperature**2 / max(s.shape[0], 1)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                  chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Mean next-token cross-entropy; position t predicts t+1, pairs touching padding are skipped."""
    pair_mask = mask[:, :-1].bool() & mask[:, 1:].bool()  # [B,T-1]
    rows = _valid_rows(logits[:, :-1], pair_mask)  # [N,V]
    targets = input_ids[:, 1:][pair_mask]  # [N]
    total = _chunked_sum(_ce_rows, (rows, targets), chunk)
    return total / max(rows.shape[0], 1)


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens of the mean squared difference of hidden states [B,T,H]."""
    s, t = _valid_rows(student_hidden, mask).float(), _valid_rows(teacher_hidden, mask).float()
    if s.shape[0] == 0:
        return s.new_zeros(())
    return (s - t).pow(2).mean()


class KDLoss(nn.Module):
    """kd_weight * KL(teacher||student) + ce_weight * CE + hidden_weight * hidden MSE."""

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 hidden_weight: float = 0.0, chunk: int = DEFAULT_CHUNK):
        super().__init__()
        if min(kd_weight, ce_weight, hidden_weight) < 0 or kd_weight + ce_weight + hidden_weight <= 0:
            raise IterabreError(f"loss weights kd={kd_weight}, ce={ce_weight}, hidden={hidden_weight} are "
                                "negative or all zero.", "use non-negative weights with a positive sum")
        self.temperature, self.chunk = temperature, chunk
        self.kd_weight, self.ce_weight, self.hidden_weight = kd_weight, ce_weight, hidden_weight

    @classmethod
    def from_config(cls, cfg) -> "KDLoss":
        """Build from a RecoveryConfig."""
        return cls(cfg.temperature, cfg.kd_weight, cfg.ce_weight, cfg.hidden_weight)

    @property
    def needs_hidden(self) -> bool:
        """Whether forward wants final hidden states (so callers can skip collecting them)."""
        return self.hidden_weight > 0

    def forward(self, student_logits, teacher_logits, mask, input_ids=None,
                student_hidden=None, teacher_hidden=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, {term name: detached value}) for one micro-batch."""
        parts = {}
        if self.kd_weight > 0:
            parts["kd"] = forward_kl(student_logits, teacher_logits, mask, self.temperature, self.chunk)
        if self.ce_weight > 0:
            if input_ids is None:
                raise IterabreError("ce_weight > 0 but no input_ids were given.", "pass input_ids to KDLoss")
            parts["ce"] = next_token_ce(student_logits, input_ids, mask, self.chunk)
        if self.hidden_weight > 0:
            if student_hidden is None or teacher_hidden is None:
                raise IterabreError("hidden_weight > 0 but hidden states are missing.",
                                    "run both models with output_hidden_states=True")
            parts["hidden"] = hidden_mse(student_hidden, teacher_hidden, mask)
        weights = {"kd": self.kd_weight, "ce": self.ce_weight, "hidden": self.hidden_weight}
        total = sum(weights[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}
