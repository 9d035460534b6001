"""Block-wise reconstruction with global propagation (BR+GP, Shin et al. 2024) as a recovery method.

After blocks are removed, train only the kept block(s) next to each gap, with Adam, so that
fed the *pruned* model's residual stream they reproduce the *dense* model's residual stream
at the same point. `reconstruct` (ridge least squares on one projection) is the layer-wise,
closed-form version of this; here the whole block trains, by backprop through that block only.

    unit     the block before the gap (`block_recon_blocks=before`, default), or the blocks
             before and after it trained together (`both`); a gap at the start uses the
             first kept block, a gap at the end the last one. Units run shallow to deep, so
             a deeper unit's inputs already see the shallower units' training.
    input    x = residual entering the unit's first block in the pruned student   [n, T, d]
    target   y = teacher's residual entering the student's next kept block        [n, T, d]
    loss     mean over non-padding tokens of ||unit(x)_t - y_t||^2 / ||y_t||^2: the relative
             MSE with `reconstruct`'s 1/||y_t|| row weights, so the attention-sink token
             (residual norm ~100x the others) does not dominate the fit.
    data     the first `block_recon_tokens` tokens of this phase's recovery windows (or of
             the self-generated text, `calibration=self-generated`, Shin et al. 2024); pairs
             are captured in chunks of at most `block_recon_buffer` tokens (the memory cap,
             see iterabre.blockcapture) and each chunk gets its share of the
             `block_recon_steps` Adam steps (lr `block_recon_lr`, warmup + `lr_schedule`,
             `block_recon_batch_size` windows per step, gradient clipping at 1.0).
    guard    a unit whose held-out gap error (the same relative error, on the held-out
             windows when given, else on its training windows) did not improve, or whose
             loss became NaN/Inf or grew past `max_loss_ratio`, gets its old weights back.

Cost: capturing a pair runs the student up to the unit and the teacher up to the target
(about one model forward per token); a training token runs only the unit's block(s) forward
and backward (~3 x one block), so per FLOP it sees tens of tokens for each KD token.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from iterabre.activations import call_block
from iterabre.blockcapture import CallCache, PairBuffer, PairStream
from iterabre.errors import IterabreError
from iterabre.surgery import decoder_blocks, original_indices

TRAINED_BLOCKS = ("before", "both")
CLIP_NORM = 1.0


@dataclass(frozen=True)
class Unit:
    """Kept blocks trained together (consecutive student positions) and the teacher block giving the target."""

    positions: tuple[int, ...]
    target: int  # teacher position whose output is the state entering student block positions[-1] + 1


@dataclass
class BlockReconResult:
    """What one block-wise reconstruction did; the errors are relative RMS errors at the gaps."""

    error_before: float  # sqrt(sum of squared per-token relative errors / tokens), all units, before training
    error_after: float  # the same after (== before for a unit whose old weights came back)
    error_data: str  # "heldout" or "train": which windows the errors were measured on
    tokens: int  # non-padding tokens captured per unit (the distinct training tokens)
    tokens_seen: int  # non-padding tokens trained on over all steps and units (with repeats)
    steps: int
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step over all units, training loss)
    units: list[dict] = field(default_factory=list)  # per unit: blocks, target, errors, steps, restored, reason
    trained: list[str] = field(default_factory=list)  # module names of the blocks whose weights changed
    buffer_cap_tokens: int = 0  # the stated cap: windows that fit in block_recon_buffer, in tokens
    buffer_peak_tokens: int = 0  # largest pair storage allocated, in token positions
    buffer_peak_bytes: int = 0  # ... and in bytes (inputs + targets)


# ---------------------------------------------------------------- which blocks train

def plan_units(student: nn.Module, teacher: nn.Module, removed: list[int], which: str = "before") -> list[Unit]:
    """The units to train for the gaps left by `removed` (ORIGINAL indices), shallow to deep, deduplicated."""
    return units_for(original_indices(student), original_indices(teacher), removed, which)


def units_for(s_orig: list[int], t_orig: list[int], removed: list[int], which: str = "before") -> list[Unit]:
    """`plan_units` from the original block indices the student and the teacher keep (position -> original)."""
    from iterabre.reconstruct import _teacher_target  # the same target point as `reconstruct`'s fits

    if which not in TRAINED_BLOCKS:
        raise IterabreError(f"unknown block_recon_blocks={which!r}.", f"use one of {', '.join(TRAINED_BLOCKS)}")
    still = sorted(set(removed) & set(s_orig))
    if still:
        raise IterabreError(f"blocks {still} are listed as removed but the student still has them.",
                            "call surgery.remove_blocks on the student before recovering")
    units = set()
    for r in sorted(set(removed)):
        before = [p for p, o in enumerate(s_orig) if o < r]
        after = [p for p, o in enumerate(s_orig) if o > r]
        if which == "both":
            positions = tuple(before[-1:] + after[:1])
        else:  # a gap at the start: train the first kept block instead
            positions = tuple(before[-1:] or after[:1])
        units.add(Unit(positions, _teacher_target(s_orig, t_orig, positions[-1])))
    return sorted(units, key=lambda u: (u.positions, u.target))


# ---------------------------------------------------------------- the math

def relative_sq_errors(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum over non-padding tokens of ||out_t - target_t||^2 / ||target_t||^2, token count); [b, T, d] inputs."""
    keep = mask.reshape(-1).bool()
    o = out.reshape(-1, out.shape[-1])[keep].float()  # [N, d]
    t = target.reshape(-1, target.shape[-1])[keep].float()  # [N, d]
    err = (o - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)  # [N]
    return err.sum(), int(keep.sum())


def split_steps(steps: int, sizes: list[int]) -> list[int]:
    """`steps` spread over chunks in proportion to their `sizes`; sums to `steps` (largest remainders, ties later)."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [steps * s / total for s in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (out[i] - exact[i], -i))[:steps - sum(out)]:
        out[i] += 1
    return out


def lr_at(step: int, total: int, cfg) -> float:
    """block_recon_lr times the recovery loop's warmup + schedule factor."""
    from iterabre.recovery import lr_factor

    return cfg.block_recon_lr * lr_factor(step, total, round(cfg.warmup_frac * total), cfg.lr_schedule)


# ---------------------------------------------------------------- one unit

def _run_unit(blocks: nn.ModuleList, unit: Unit, calls: dict, x: torch.Tensor) -> torch.Tensor:
    """The unit's blocks on x [b, T, d] with their recorded calls -> [b, T, d]."""
    for pos in unit.positions:
        x = call_block(blocks[pos], calls[pos], x)
    return x


def _autocast(like: torch.Tensor, bf16: bool):
    """Autocast for training: to the captured activations' dtype when it is bf16/fp16 (a bf16 model),
    bf16 on CUDA when asked (as KD), else none (float32 on CPU)."""
    if like.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(like.device.type, dtype=like.dtype)
    if like.device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def gap_error_sums(stream: PairStream, calls: CallCache, unit: Unit, ids: torch.Tensor, mask: torch.Tensor,
                   batch_size: int) -> tuple[float, int]:
    """(sum of squared relative errors, tokens) of the unit's output against its target over ids / mask."""
    blocks, err, n = decoder_blocks(stream.student), 0.0, 0
    was = [blocks[p].training for p in unit.positions]
    for p in unit.positions:
        blocks[p].eval()
    try:
        for rows, inputs, targets in stream.chunks(ids, mask):
            for start in range(0, len(rows), batch_size):
                b_rows = rows[start:start + batch_size]
                b_ids, b_mask = ids[b_rows].to(inputs.device), mask[b_rows].to(inputs.device)
                out = _run_unit(blocks, unit, calls(b_ids, b_mask), inputs[start:start + len(b_rows)])
                e, k = relative_sq_errors(out, targets[start:start + len(b_rows)], b_mask)
                err, n = err + float(e), n + k
    finally:
        for p, w in zip(unit.positions, was):
            blocks[p].train(w)
    return err, n


class _Trainable:
    """requires_grad on the unit's parameters only, float32 while they train; a CPU snapshot to restore them.

    bf16/fp16 weights are trained as float32 masters (lr-sized Adam updates would round away in
    bf16) and cast back by `close`, which also restores every requires_grad flag.
    """

    def __init__(self, student: nn.Module, unit: Unit):
        blocks = decoder_blocks(student)
        self.params = [p for pos in unit.positions for p in blocks[pos].parameters()]
        self.snapshot = [p.detach().to("cpu", copy=True) for p in self.params]
        self.flags = [(p, p.requires_grad) for p in student.parameters()]
        self.dtypes = [p.dtype for p in self.params]
        for p in student.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.data = p.data.float() if p.is_floating_point() else p.data
            p.requires_grad_(p.is_floating_point())

    def restore_weights(self) -> None:
        with torch.no_grad():
            for p, old in zip(self.params, self.snapshot):
                p.copy_(old)

    def close(self) -> None:
        for p, dtype in zip(self.params, self.dtypes):
            p.data = p.data.to(dtype)
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _optimizer(params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (AdamW with the phase's weight decay, 0 by default), fused where torch supports it."""
    from iterabre.recovery import can_fuse

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=can_fuse(params) or None)


def _train_unit(stream: PairStream, calls: CallCache, unit: Unit, ids: torch.Tensor, mask: torch.Tensor,
                cfg, gen: torch.Generator, trainable: _Trainable, step0: int) -> dict:
    """Adam over the unit's chunks of pairs; returns losses, steps, tokens seen and an abort reason ('' if none)."""
    from iterabre.recovery import LossGuard

    blocks, total = decoder_blocks(stream.student), cfg.block_recon_steps
    rows_per_chunk = stream.buffer.cap_rows
    sizes = [int(mask[i:i + rows_per_chunk].sum()) for i in range(0, ids.shape[0], rows_per_chunk)]
    per_chunk = split_steps(total, sizes)
    opt, guard = _optimizer(trainable.params, cfg.block_recon_lr, cfg.weight_decay), LossGuard(cfg.max_loss_ratio)
    out = dict(losses=[], steps=0, tokens_seen=0, reason="")
    # The blocks stay in eval mode: the targets are deterministic residuals, and dropout (0 in
    # these models anyway) would only add noise to a regression.
    for (rows, inputs, targets), n_steps in zip(stream.chunks(ids, mask), per_chunk):
        order = torch.empty(0, dtype=torch.long)
        for _ in range(n_steps):
            if order.numel() < min(cfg.block_recon_batch_size, len(rows)):  # another epoch over this chunk
                order = torch.cat([order, torch.randperm(len(rows), generator=gen)])
            pick, order = order[:cfg.block_recon_batch_size], order[cfg.block_recon_batch_size:]
            b_ids, b_mask = ids[rows[pick]].to(inputs.device), mask[rows[pick]].to(inputs.device)
            with _autocast(inputs, cfg.bf16):
                y = _run_unit(blocks, unit, calls(b_ids, b_mask), inputs[pick])
            err, n = relative_sq_errors(y, targets[pick], b_mask)
            loss = err / max(n, 1)
            value = float(loss.detach())
            out["reason"] = guard.check(value)
            if out["reason"]:  # checked before opt.step: the bad update is never applied
                return out
            for group in opt.param_groups:
                group["lr"] = lr_at(out["steps"], total, cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.params, CLIP_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out["losses"].append((step0 + out["steps"], value))
            out["steps"] += 1
            out["tokens_seen"] += n
    return out


def _unit_record(student: nn.Module, unit: Unit, before: tuple, after: tuple, trained: dict) -> dict:
    """One unit's line in the result: blocks (original indices), target, errors, what happened."""
    orig = original_indices(student)
    rel = lambda s: (s[0] / s[1]) ** 0.5 if s[1] else 0.0  # noqa: E731
    return dict(blocks=[orig[p] for p in unit.positions], student_positions=list(unit.positions),
                teacher_position=unit.target, error_before=rel(before), error_after=rel(after),
                steps=trained["steps"], tokens_seen=trained["tokens_seen"], restored=trained["restored"],
                reason=trained["reason"])


# ---------------------------------------------------------------- entry point

def _check(cfg, seq_len: int) -> None:
    """Refuse settings the loop cannot run with."""
    if cfg.block_recon_tokens < 1 or cfg.block_recon_steps < 0 or cfg.block_recon_batch_size < 1:
        raise IterabreError(f"block-recon needs block_recon_tokens >= 1, block_recon_steps >= 0 and "
                            f"block_recon_batch_size >= 1 (got {cfg.block_recon_tokens}, {cfg.block_recon_steps}, "
                            f"{cfg.block_recon_batch_size}).", "fix the block_recon_* recovery settings")
    if not cfg.block_recon_lr > 0:
        raise IterabreError(f"block-recon needs block_recon_lr > 0 (got {cfg.block_recon_lr}).",
                            "pass e.g. block_recon_lr=1e-4")
    PairBuffer(cfg.block_recon_buffer, seq_len)  # raises when the cap cannot hold one window


def training_rows(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first windows whose non-padding tokens reach `tokens` (all windows if they do not)."""
    cum = mask.sum(dim=1).cumsum(0)  # [N]
    n = int((cum < tokens).sum()) + 1
    return torch.arange(min(n, mask.shape[0]))


def block_recon(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cfg, removed: list[int], heldout_ids: torch.Tensor | None = None,
                heldout_mask: torch.Tensor | None = None) -> BlockReconResult:
    """Train the kept block(s) next to each gap left by `removed` towards the teacher's residual (in place)."""
    _check(cfg, input_ids.shape[1])
    units = plan_units(student, teacher, list(removed), cfg.block_recon_blocks)
    rows = training_rows(attention_mask, cfg.block_recon_tokens)
    ids, mask = input_ids[rows], attention_mask[rows]  # [n, T]
    if heldout_ids is not None:
        e_ids = heldout_ids
        e_mask = heldout_mask if heldout_mask is not None else torch.ones_like(heldout_ids)
    else:
        e_ids, e_mask = ids, mask
    buffer = PairBuffer(cfg.block_recon_buffer, ids.shape[1])
    gen, start = torch.Generator().manual_seed(cfg.seed), time.perf_counter()
    records, losses, blocks = [], [], decoder_blocks(student)
    by_id = {id(m): n for n, m in student.named_modules()}
    trained, seen, steps = [], 0, 0
    student.eval()
    for unit in units:  # shallow to deep: a deeper unit's inputs see the shallower units' training
        stream = PairStream(student, teacher, unit.positions[0], unit.target, buffer, cfg.block_recon_batch_size)
        calls = CallCache(student, unit.positions)
        before = gap_error_sums(stream, calls, unit, e_ids, e_mask, cfg.block_recon_batch_size)
        trainable = _Trainable(student, unit)
        try:
            out = _train_unit(stream, calls, unit, ids, mask, cfg, gen, trainable, steps)
        finally:
            trainable.close()
            student.eval()
        after = before if out["reason"] else gap_error_sums(stream, calls, unit, e_ids, e_mask,
                                                            cfg.block_recon_batch_size)
        restored = bool(out["reason"]) or after[0] > before[0]  # never keep a unit that got worse
        if restored:
            trainable.restore_weights()
            after = before
        elif out["steps"]:
            trained += [by_id[id(blocks[p])] for p in unit.positions]
        records.append(_unit_record(student, unit, before, after, {**out, "restored": restored}))
        losses += out["losses"]
        seen, steps = seen + out["tokens_seen"], steps + out["steps"]
    buffer.release()
    return _result(records, losses, int(mask.sum()), seen, steps, time.perf_counter() - start, buffer,
                   "heldout" if heldout_ids is not None else "train", sorted(set(trained)), ids.shape[1])


def _result(records, losses, tokens, seen, steps, seconds, buffer: PairBuffer, data: str, trained,
            seq_len: int) -> BlockReconResult:
    """Aggregate the per-unit errors: every unit is measured on the same windows, so the RMS over units is
    the RMS over all units' tokens."""
    def rel(key):
        sq = sum(r[key] ** 2 for r in records)
        return (sq / len(records)) ** 0.5 if records else 0.0

    return BlockReconResult(error_before=rel("error_before"), error_after=rel("error_after"), error_data=data,
                            tokens=tokens, tokens_seen=seen, steps=steps, seconds=seconds, losses=losses,
                            units=records, trained=trained, buffer_cap_tokens=buffer.cap_rows * seq_len,
                            buffer_peak_tokens=buffer.peak_tokens, buffer_peak_bytes=buffer.peak_bytes)
