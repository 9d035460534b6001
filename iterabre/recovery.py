"""Recovery (healing) of a pruned student by distillation from its teacher, torchtune style.

`recover` checks its inputs and dispatches on `cfg.method` through `RECOVERY_METHODS`.
The KD methods share one straight-line loop: pick the trainable parameters (all, the blocks
next to the removed ones, or LoRA adapters), plan shuffled micro-batches until the token
budget is spent, run AdamW with warmup + cosine/constant lr, clip, and guard: a NaN/Inf loss
or one that grows past `max_loss_ratio` x the first loss restores the pre-recovery weights.
The student is changed in place and handed back as a plain transformers model in eval mode.

Precision: the models come in their working dtype (float32, or bfloat16 on CUDA). Weights that
train get float32 master copies for the optimizer (bf16 ones are upcast for the phase and cast
back at its end); the frozen teacher and frozen student weights stay in the working dtype, and
bf16 weights mean bf16 autocast for compute. Processes: the loop asks a `dist` context
(iterabre.distributed; `SINGLE` for one process) for its rows of each micro-batch, the wrapped
student (DDP or FSDP2) and teacher, and sums over processes, so 1 and N processes run this code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from iterabre.config import RecoveryConfig, check_recovery
from iterabre.distributed import SINGLE, Single, weights_digest
from iterabre.errors import IterabreError
from iterabre.kd import KDLoss
from iterabre.memory import peak_mb, start_peak

TRAINABLE = ("all", "adjacent", "lora")
LR_SCHEDULES = ("cosine", "constant")
CLIP_NORM = 1.0
GUARD_EMA = 0.7  # smoothing of the guarded loss: one noisy batch must not abort a run
GUARD_FLOOR = 1e-2  # nats; below this a student already matches, so ratios of tiny losses mean nothing


@dataclass
class RecoveryResult:
    """What one recovery phase did; `to_dict()` goes into report.json."""

    method: str
    trainable: str
    loss_before: float | None = None  # KD loss on held-out (or the first batch) before training
    loss_after: float | None = None  # the same after training (== before if aborted)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, train loss)
    tokens: int = 0  # non-padding tokens trained on
    steps: int = 0  # optimizer steps taken
    seconds: float = 0.0  # wall time of the whole phase, evaluations included
    tokens_per_s: float = 0.0  # training throughput (evaluations excluded)
    aborted: bool = False
    reason: str = ""
    peak_mem_mb: float = 0.0  # CUDA: peak allocated; CPU: growth of the process's max RSS
    stopped_early: bool = False  # early stopping saw the held-out KD loss plateau (not an abort)
    heldout_checks: list[tuple[int, float]] = field(default_factory=list)  # (tokens trained, held-out KD)
    extra: dict = field(default_factory=dict)  # method-specific details (e.g. reconstruct stats)
    flops: int = 0  # FLOPs of everything `recover` ran (held-out checks included, like `seconds`); iterabre.flops
    world_size: int = 1  # processes that trained together
    fsdp: bool = False  # whether they held FSDP2 shards (else DDP replicas)
    dtype: str = "float32"  # working dtype of the weights (trained ones had float32 masters)
    rank_digests: list[str] = field(default_factory=list)  # per process: its weights after training

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RecoveryJob:
    """Everything a recovery method gets; one object so methods share one signature."""

    student: nn.Module
    teacher: nn.Module
    input_ids: torch.Tensor  # [N,T]
    attention_mask: torch.Tensor  # [N,T]
    cfg: RecoveryConfig
    removed: list[int]  # ORIGINAL indices of the blocks removed in this step
    progress: Callable[[dict], None] | None = None
    device: str = "cpu"
    heldout_ids: torch.Tensor | None = None
    heldout_mask: torch.Tensor | None = None
    dist: Single = SINGLE  # this process's place among the processes that train together
    recon_ids: torch.Tensor | None = None  # [M,T] block-recon's / reconstruct's own text (self-generated); None: input_ids

    def recon_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) block-recon and reconstruct fit on: their own text if given, else the recovery windows."""
        if self.recon_ids is None:
            return self.input_ids, self.attention_mask
        return self.recon_ids, torch.ones_like(self.recon_ids)  # generated windows: every position is real


# ---------------------------------------------------------------- pure helpers

def plan_steps(mask: torch.Tensor, batch_size: int, grad_accum: int, budget: int,
               seed: int) -> list[list[torch.Tensor]]:
    """Row indices per micro-batch, grouped per optimizer step, until `budget` valid tokens are planned."""
    lengths = mask.sum(dim=1)  # [N] valid tokens per sequence
    if budget > 0 and int(lengths.sum()) == 0:
        raise IterabreError("the recovery data has no non-padding tokens.", "pass text with attention_mask = 1")
    gen = torch.Generator().manual_seed(seed)
    order, micro, planned = torch.empty(0, dtype=torch.long), [], 0
    while planned < budget:
        if order.numel() < batch_size:  # epoch again: data shorter than the budget
            order = torch.cat([order, torch.randperm(mask.shape[0], generator=gen)])
            continue
        idx, order = order[:batch_size], order[batch_size:]
        micro.append(idx)
        planned += int(lengths[idx].sum())
    return [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`."""
    if step < warmup:  # linear warmup that never starts at lr=0 (that step would be wasted)
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def adjacent_blocks(original: list[int], removed: list[int]) -> list[int]:
    """Original indices of the kept blocks nearest before and after each removed block."""
    kept, out = sorted(original), set()
    for r in removed:
        if r in kept:
            raise IterabreError(f"block {r} is listed as removed but is still in the model.",
                                "pass the ORIGINAL indices of the blocks that remove_blocks dropped")
        before = [o for o in kept if o < r]
        after = [o for o in kept if o > r]
        out.update(([before[-1]] if before else []) + ([after[0]] if after else []))
    return sorted(out)


class LossGuard:
    """Flags a NaN/Inf loss, or a smoothed loss above `ratio` x the first one."""

    def __init__(self, ratio: float | None):
        self.ratio, self.first, self.ema = ratio, None, None

    def check(self, loss: float) -> str:
        """'' while training looks healthy, else the reason to abort."""
        if not math.isfinite(loss):
            return f"loss became {loss}"
        if self.first is None:
            self.first = self.ema = loss
            return ""
        self.ema = GUARD_EMA * self.ema + (1 - GUARD_EMA) * loss
        limit = (self.ratio or math.inf) * max(self.first, GUARD_FLOOR)
        if self.ema > limit:
            return f"loss grew to {self.ema:.4g} (smoothed), over {self.ratio} x the first loss {self.first:.4g}"
        return ""


def plateaued(losses: list[float], tol: float) -> bool:
    """True when the newest held-out loss beats the best earlier one by less than `tol` (relative)."""
    if len(losses) < 2:
        return False
    best, last = min(losses[:-1]), losses[-1]
    if not math.isfinite(last):
        return True
    return best - last <= tol * abs(best)  # <=: no improvement at all is a plateau, even at tol=0


def within_budget(steps: list[list[torch.Tensor]], mask: torch.Tensor, budget: int) -> list[list[torch.Tensor]]:
    """The planned steps minus any trailing ones that would train on more than `budget` tokens.

    `plan_steps` overshoots by up to one micro-batch; a step that hands its unused tokens on
    (adaptive budget) must not, or the job would spend more than its total budget.
    """
    lengths, kept, used = mask.sum(dim=1), [], 0
    for micro in steps:
        tokens = sum(int(lengths[idx].sum()) for idx in micro)
        if used + tokens > budget:
            break
        kept.append(micro)
        used += tokens
    return kept


class Plateau:
    """Early stopping: held-out KD loss every `every` trained tokens; stop once it plateaus."""

    def __init__(self, evaluate: Callable[[nn.Module], float], every: int, tol: float, first: float):
        self.evaluate, self.every, self.tol = evaluate, every, tol
        self.checks: list[tuple[int, float]] = [(0, first)]  # (tokens trained, held-out loss)

    def __call__(self, model: nn.Module, tokens: int) -> bool:
        """Whether to stop now, after `tokens` trained tokens (evaluates only when a check is due)."""
        if tokens - self.checks[-1][0] < self.every:
            return False
        self.checks.append((tokens, self.evaluate(model)))
        return plateaued([loss for _, loss in self.checks], self.tol)


# ---------------------------------------------------------------- devices, memory, loss

def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(student: nn.Module, teacher: nn.Module, bf16: bool) -> torch.dtype | None:
    """The autocast dtype of a student/teacher pair; None: each model computes in its own dtype.

    Weights held in bf16 (the teacher always holds the working dtype) mean bf16 compute, also
    for float32 master copies; float32 models compute in float32, except on CUDA with `bf16`.
    """
    held = {p.dtype for model in (student, teacher) for p in model.parameters()}
    low = [d for d in LOW_PRECISION if d in held]
    if low:
        return low[0]
    return torch.bfloat16 if bf16 and _model_device(student).type == "cuda" else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on the model's device; none for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _run(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, hidden: bool, dtype: torch.dtype | None):
    """One forward pass of a causal LM on its own device, without KV cache."""
    device = _model_device(model)
    with _autocast(device, dtype):
        return model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                     output_hidden_states=hidden)


def pair_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
              loss_fn: KDLoss, bf16: bool = True) -> tuple[torch.Tensor, dict]:
    """KD loss of the student against the teacher on one micro-batch (teacher under no_grad)."""
    dtype = compute_dtype(student, teacher, bf16)
    with torch.no_grad():
        t_out = _run(teacher, ids, mask, loss_fn.needs_hidden, dtype)
    s_out = _run(student, ids, mask, loss_fn.needs_hidden, dtype)
    dev = s_out.logits.device
    t_hidden = t_out.hidden_states[-1].to(dev) if loss_fn.needs_hidden else None
    s_hidden = s_out.hidden_states[-1] if loss_fn.needs_hidden else None
    return loss_fn(s_out.logits, t_out.logits.to(dev), mask.to(dev), ids.to(dev), s_hidden, t_hidden)


@torch.no_grad()
def kd_loss_on(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
               cfg: RecoveryConfig, batch_size: int = 8) -> float:
    """Token-weighted KD loss (as configured by cfg) over a held-out set, in eval mode."""
    loss_fn, was_training = KDLoss.from_config(cfg), student.training
    student.eval()
    teacher.eval()
    total, weight = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        b_ids, b_mask = ids[start:start + batch_size], mask[start:start + batch_size]
        n = int(b_mask.sum())
        if n:
            loss, _ = pair_loss(student, teacher, b_ids, b_mask, loss_fn, cfg.bf16)
            total, weight = total + float(loss) * n, weight + n
    student.train(was_training)
    return total / weight if weight else float("nan")


# ---------------------------------------------------------------- trainable parameters

def _block_param_names(student: nn.Module, original: list[int]) -> list[str]:
    """Names of the parameters of the blocks whose original index is in `original`."""
    from iterabre.surgery import decoder_blocks, original_indices

    wanted = set(original)
    ids = {id(p) for j, block in zip(original_indices(student), decoder_blocks(student)) if j in wanted
           for p in block.parameters()}
    return [n for n, p in student.named_parameters() if id(p) in ids]


def _dense_trainable(student: nn.Module, names: list[str]):
    """Train `names` only; finish(keep=False) copies back a CPU snapshot taken before training."""
    params = dict(student.named_parameters())
    snapshot = {n: params[n].detach().to("cpu", copy=True) for n in names}
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in snapshot)

    def finish(keep: bool) -> nn.Module:
        if not keep:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(snapshot[n])
        for n, p in params.items():
            p.requires_grad_(flags[n])
        return student

    return student, [params[n] for n in names], finish


def _block_linear_names(student: nn.Module) -> list[str]:
    """Full names of the Linear / GPT-2 Conv1D layers inside decoder blocks (LoRA targets)."""
    from iterabre.surgery import decoder_blocks

    inside = {id(m) for block in decoder_blocks(student) for m in block.modules()
              if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    return [name for name, m in student.named_modules() if id(m) in inside]


def _lora_trainable(student: nn.Module, cfg: RecoveryConfig):
    """Wrap with LoRA adapters; finish merges them (keep) or drops them (abort) -> plain model."""
    from peft import LoraConfig, get_peft_model

    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=_block_linear_names(student))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # seeded init, caller's RNG untouched
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft's, not ours
        torch.manual_seed(cfg.seed)
        model = get_peft_model(student, lora)
    params = [p for p in model.parameters() if p.requires_grad]

    def finish(keep: bool) -> nn.Module:
        base = model.merge_and_unload() if keep else model.unload()
        if base is not student:  # recover() promises in-place changes
            raise RuntimeError("peft returned a new model object instead of the unwrapped student")
        for n, p in student.named_parameters():
            p.requires_grad_(flags[n])
        return student

    return model, params, finish


def select_trainable(student: nn.Module, cfg: RecoveryConfig, removed: list[int], trainable: str):
    """(model to call, parameters to optimise, finish(keep) -> student) for the chosen mode."""
    if trainable == "lora":
        return _lora_trainable(student, cfg)
    if trainable == "adjacent":
        if not removed:
            raise IterabreError("trainable='adjacent' needs the removed block indices.",
                                "pass removed=[...] or use trainable='all'")
        from iterabre.surgery import original_indices

        names = _block_param_names(student, adjacent_blocks(original_indices(student), list(removed)))
        return _dense_trainable(student, names)
    return _dense_trainable(student, [n for n, _ in student.named_parameters()])


# ---------------------------------------------------------------- training loop

def _progress_bar(total: int):
    """A tqdm bar over tokens, off when stderr is not a TTY or ITERABRE_NO_PROGRESS=1."""
    from tqdm import tqdm

    off = not sys.stderr.isatty() or os.environ.get("ITERABRE_NO_PROGRESS") == "1"
    return tqdm(total=total, unit="tok", desc="recovery", disable=off, leave=False)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """Seed dropout etc. for the loop without disturbing the caller's RNG state."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _accumulate(job: RecoveryJob, model: nn.Module, teacher: nn.Module, micro: list[torch.Tensor],
                loss_fn: KDLoss):
    """Forward + backward of this process's rows of one step's micro-batches.

    -> (mean loss over the whole micro-batches, valid tokens in them), equal on every process.
    """
    dist, total, tokens = job.dist, 0.0, 0
    for idx in micro:  # idx: [batch_size] rows of the whole micro-batch
        everyone = int(job.attention_mask[idx].sum())
        mine = dist.rows(idx)  # [batch_size / world] this process's rows
        ids, mask = job.input_ids[mine], job.attention_mask[mine]
        # DDP and FSDP average gradients over the processes; weighting each process's token mean
        # by its share of the tokens makes that average the gradient of the whole micro-batch's
        # token mean, as one process would compute it (share == 1 for one process). Exact for
        # the KL and hidden terms; CE averages over token pairs (one fewer per row), whose shares
        # equal the token shares when the processes get equally many full rows.
        share = int(mask.sum()) * dist.world / max(everyone, 1)
        loss, _ = pair_loss(model, teacher, ids, mask, loss_fn, job.cfg.bf16)
        (loss * share / len(micro)).backward()
        total, tokens = total + loss.detach().item() * share / dist.world / len(micro), tokens + everyone
    return dist.all_sum(total), tokens


def can_fuse(params: list) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters (floating, all on one CPU/CUDA device)."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))


def make_optimizer(params: list, cfg: RecoveryConfig) -> torch.optim.Optimizer:
    """AdamW, fused when possible: on CPU the per-tensor update took 0.41 s vs 0.06 s per step on
    the 113M-parameter SmolLM2 student (about 8 % of a 4 x 128-token step), same math."""
    fused = can_fuse(params) or None  # None: torch picks foreach / for-loop itself
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def _loop(job: RecoveryJob, model: nn.Module, teacher: nn.Module, params: list, steps: list,
          monitor: Plateau | None = None) -> dict:
    """Optimise over the planned steps; stop when the guard trips or the monitor sees a plateau."""
    cfg, loss_fn, guard = job.cfg, KDLoss.from_config(job.cfg), LossGuard(job.cfg.max_loss_ratio)
    opt = make_optimizer(params, cfg)
    warmup = round(cfg.warmup_frac * len(steps))
    out = dict(losses=[], tokens=0, reason="", seconds=0.0, stopped=False)
    start, bar = time.perf_counter(), _progress_bar(cfg.tokens)
    model.train()
    for step, micro in enumerate(steps):
        lr = cfg.lr * lr_factor(step, len(steps), warmup, cfg.lr_schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, tokens = _accumulate(job, model, teacher, micro, loss_fn)
        out["reason"] = guard.check(loss)  # the same loss on every process: they stop together
        if out["reason"]:  # checked before opt.step, so the bad update is never applied
            break
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["tokens"] += tokens
        out["losses"].append((step, loss))
        out["seconds"] = time.perf_counter() - start
        bar.update(tokens)
        if job.progress:
            job.progress(dict(step=step, tokens=out["tokens"], loss=loss, lr=lr,
                              tokens_per_s=out["tokens"] / max(out["seconds"], 1e-9)))
        if monitor is not None and step + 1 < len(steps) and monitor(model, out["tokens"]):
            out["stopped"] = True
            break
    bar.close()
    return out


def _eval_set(job: RecoveryJob) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out data when given, else the first micro-batch of the training data."""
    if job.heldout_ids is not None:
        mask = job.heldout_mask if job.heldout_mask is not None else torch.ones_like(job.heldout_ids)
        return job.heldout_ids, mask
    return job.input_ids[:job.cfg.batch_size], job.attention_mask[:job.cfg.batch_size]


def _set_checkpointing(student: nn.Module, on: bool) -> None:
    """Gradient checkpointing on/off (non-reentrant, so frozen embeddings still pass gradients)."""
    if not getattr(student, "supports_gradient_checkpointing", False):
        return
    kwargs = {"use_reentrant": False}
    if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
        student.activation_checkpointing_enable(kwargs) if on else student.activation_checkpointing_disable()
    else:
        student.gradient_checkpointing_enable(kwargs) if on else student.gradient_checkpointing_disable()


def float32_masters(params: list) -> list[tuple[nn.Parameter, torch.dtype]]:
    """Upcast trained bf16/fp16 weights to float32 in place -> [(parameter, its dtype before)].

    AdamW then keeps float32 state, and updates of lr-size are not rounded away as they are on
    bf16 weights (measured in docs/SCALING.md). LoRA adapters are float32 already (peft).
    """
    low = [(p, p.dtype) for p in params if p.dtype in LOW_PRECISION]
    for p, _ in low:
        p.data = p.data.float()
    return low


def _cast_back(masters: list[tuple[nn.Parameter, torch.dtype]]) -> None:
    """The trained weights back in the working dtype, as they are saved and loaded next."""
    for p, dtype in masters:
        p.data = p.data.to(dtype)


def train_kd(job: RecoveryJob, trainable: str, method: str) -> RecoveryResult:
    """Distil the teacher into the student in place; restore the old weights if the guard trips."""
    cfg, student, dist = job.cfg, job.student, job.dist
    device = dist.compute_device(job.device)
    start, mem = time.perf_counter(), start_peak(device)
    eval_ids, eval_mask = _eval_set(job)
    steps = plan_steps(job.attention_mask, cfg.batch_size, cfg.grad_accum, cfg.tokens, cfg.seed)
    compute = compute_dtype(student, job.teacher, cfg.bf16)  # before the masters hide the bf16 weights
    model, params, finish = select_trainable(student, cfg, job.removed, trainable)
    masters = float32_masters(params)
    keep = False  # any exception below also restores the pre-recovery weights
    try:
        if cfg.grad_checkpointing:
            _set_checkpointing(student, True)
        trained, teacher = dist.wrap(model, True, compute), dist.wrap(job.teacher, False, compute)
        params = [p for p in trained.parameters() if p.requires_grad]  # FSDP2: its sharded parameters

        def heldout(m: nn.Module) -> float:  # every process evaluates all of it; the mean makes them agree
            return dist.all_mean(kd_loss_on(m, teacher, eval_ids, eval_mask, cfg))

        loss_before = heldout(trained)
        monitor = None
        if cfg.early_stop_tokens > 0:  # adaptive budget: unused tokens go to the next step, so never overshoot
            steps = within_budget(steps, job.attention_mask, cfg.tokens)
            monitor = Plateau(heldout, cfg.early_stop_tokens, cfg.early_stop_tol, loss_before)
        with _seeded(device, cfg.seed):
            out = _loop(job, trained, teacher, params, steps, monitor)
        digests = dist.all_gather(weights_digest(dist, params))
        loss_after = loss_before if out["reason"] else _final_loss(trained, heldout, monitor, out["tokens"])
        if not out["reason"] and not math.isfinite(loss_after):
            out["reason"] = f"held-out loss is {loss_after} after training"
        keep = not out["reason"]
        if keep:
            dist.unwrap(trained, model)  # FSDP: the shards gathered into rank 0's plain model
    finally:
        _cast_back(masters)
        finish(keep)
        if cfg.grad_checkpointing:
            _set_checkpointing(student, False)
        student.eval()
    return RecoveryResult(
        method=method, trainable=trainable, loss_before=loss_before,
        loss_after=loss_after if keep else loss_before, losses=out["losses"],
        tokens=out["tokens"], steps=len(out["losses"]), seconds=time.perf_counter() - start,
        tokens_per_s=out["tokens"] / out["seconds"] if out["seconds"] else 0.0,
        aborted=bool(out["reason"]), reason=out["reason"], peak_mem_mb=peak_mb(device, mem),
        stopped_early=out["stopped"], heldout_checks=monitor.checks[1:] if monitor else [],
        rank_digests=digests)


def _final_loss(model: nn.Module, heldout: Callable[[nn.Module], float], monitor: Plateau | None,
                tokens: int) -> float:
    """Held-out KD loss after training; reuses the monitor's last check when it was taken right here."""
    if monitor is not None and len(monitor.checks) > 1 and monitor.checks[-1][0] == tokens:
        return monitor.checks[-1][1]
    return heldout(model)


# ---------------------------------------------------------------- methods

def _recover_none(job: RecoveryJob) -> RecoveryResult:
    """No training; the held-out loss is measured only when a held-out set was given."""
    start = time.perf_counter()
    loss = None
    if job.heldout_ids is not None:
        loss = kd_loss_on(job.student, job.teacher, *_eval_set(job), job.cfg)
    return RecoveryResult(method="none", trainable="none", loss_before=loss, loss_after=loss,
                          seconds=time.perf_counter() - start)


def _recover_kd(job: RecoveryJob) -> RecoveryResult:
    """KD with cfg.trainable parameters (all | adjacent | lora)."""
    return train_kd(job, job.cfg.trainable, "kd")


def _recover_lora_kd(job: RecoveryJob) -> RecoveryResult:
    """KD through LoRA adapters, merged into the weights afterwards."""
    return train_kd(job, "lora", "lora-kd")


def _recover_reconstruct(job: RecoveryJob) -> RecoveryResult:
    """Closed-form reconstruction of the blocks next to the gap (iterabre.reconstruct)."""
    from iterabre.blockrecon import training_rows
    from iterabre.reconstruct import reconstruct

    device = torch.device(job.device)
    start, mem = time.perf_counter(), start_peak(device)
    eval_ids, eval_mask = _eval_set(job)
    before = kd_loss_on(job.student, job.teacher, eval_ids, eval_mask, job.cfg)
    ids, mask = job.recon_text()  # the recovery windows, or the self-generated text
    if job.cfg.reconstruct_tokens:  # the fit's statistics settle long before KD's budget is read
        rows = training_rows(mask, job.cfg.reconstruct_tokens)
        ids, mask = ids[rows], mask[rows]  # [n, T]
    info = reconstruct(job.student, job.teacher, ids, mask, job.cfg, list(job.removed))
    after = kd_loss_on(job.student, job.teacher, eval_ids, eval_mask, job.cfg)
    seconds = time.perf_counter() - start
    tokens = info.tokens  # what the fit read, not what KD will
    return RecoveryResult(method="reconstruct", trainable="reconstruct", loss_before=before, loss_after=after,
                          tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds if seconds else 0.0,
                          peak_mem_mb=peak_mb(device, mem), extra={"reconstruct": dataclasses.asdict(info)})


def _then_kd(first: RecoveryResult, job: RecoveryJob, method: str) -> RecoveryResult:
    """KD with the phase's budget after a closed-form or block-wise repair (`first`): one record of both.

    An aborted KD part falls back to the weights `first` left (train_kd restores them).
    """
    second = train_kd(job, job.cfg.trainable, method)
    second.extra = {**first.extra, f"loss_after_{first.method.replace('-', '_')}": first.loss_after}
    second.loss_before = first.loss_before
    second.seconds += first.seconds
    second.peak_mem_mb = max(first.peak_mem_mb, second.peak_mem_mb)
    return second


def _recover_reconstruct_kd(job: RecoveryJob) -> RecoveryResult:
    """Reconstruct, then KD."""
    return _then_kd(_recover_reconstruct(job), job, "reconstruct+kd")


def _recover_block_recon(job: RecoveryJob) -> RecoveryResult:
    """Block-wise reconstruction, global propagation: Adam on the kept block(s) at each gap (iterabre.blockrecon)."""
    from iterabre.blockrecon import block_recon

    device = torch.device(job.device)
    start, mem = time.perf_counter(), start_peak(device)
    eval_ids, eval_mask = _eval_set(job)
    before = kd_loss_on(job.student, job.teacher, eval_ids, eval_mask, job.cfg)
    info = block_recon(job.student, job.teacher, *job.recon_text(), job.cfg, list(job.removed),
                       job.heldout_ids, job.heldout_mask)
    after = kd_loss_on(job.student, job.teacher, eval_ids, eval_mask, job.cfg)
    seconds = time.perf_counter() - start
    aborted = [u["reason"] for u in info.units if u["reason"]]
    details = {k: v for k, v in dataclasses.asdict(info).items() if k != "losses"}  # losses: the result's own
    return RecoveryResult(method="block-recon", trainable=job.cfg.block_recon_blocks, loss_before=before,
                          loss_after=after, losses=info.losses, tokens=info.tokens, steps=info.steps,
                          seconds=seconds, tokens_per_s=info.tokens_seen / info.seconds if info.seconds else 0.0,
                          aborted=bool(aborted), reason="; ".join(aborted), peak_mem_mb=peak_mb(device, mem),
                          extra={"block_recon": details})


def _recover_block_recon_kd(job: RecoveryJob) -> RecoveryResult:
    """Block-wise reconstruction, then KD with the phase's token budget."""
    return _then_kd(_recover_block_recon(job), job, "block-recon+kd")


def gap_count(job: RecoveryJob) -> int:
    """How many gaps the removed blocks leave in the student (a contiguous run leaves one)."""
    from iterabre.blockrecon import units_for
    from iterabre.surgery import original_indices

    return len(units_for(original_indices(job.student), original_indices(job.teacher), job.removed))


def auto_method(gaps: int) -> str:
    """The repair `auto` runs for a removal that leaves `gaps` gaps: least squares then KD for one gap,
    block-wise reconstruction then KD for several (the best of each measured at equal compute,
    docs/BENCHMARKS.md §5: a least-squares fit is cheap for one gap and beat block-recon there; with
    many gaps its captures add up and block-recon+kd kept more)."""
    return "reconstruct+kd" if gaps == 1 else "block-recon+kd"


def _recover_auto(job: RecoveryJob) -> RecoveryResult:
    """reconstruct+kd or block-recon+kd, by the gaps this removal leaves (`auto_method`)."""
    gaps = gap_count(job)
    method = auto_method(gaps)
    result = RECOVERY_METHODS[method](job)
    result.extra |= {"auto": method, "gaps": gaps}
    return result


RECOVERY_METHODS: dict[str, Callable[[RecoveryJob], RecoveryResult]] = {
    "none": _recover_none,
    "kd": _recover_kd,
    "lora-kd": _recover_lora_kd,
    "reconstruct": _recover_reconstruct,
    "reconstruct+kd": _recover_reconstruct_kd,
    "block-recon": _recover_block_recon,
    "block-recon+kd": _recover_block_recon_kd,
    "auto": _recover_auto,
}


# ---------------------------------------------------------------- entry point

def _check_data(ids: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    """input_ids must be a 2-D integer tensor with a same-shaped attention mask."""
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32) or mask.shape != ids.shape:
        raise IterabreError(f"{what} ids {tuple(ids.shape)} / mask {tuple(mask.shape)} are not a matching "
                            "[sequences, tokens] integer pair.", "pass token windows from iterabre.data")


def _dtype_name(model: nn.Module) -> str:
    """'bfloat16' / 'float32' / ...: the dtype most of the model's weights are held in."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.") if counts else "float32"


def _prepare_models(student: nn.Module, teacher: nn.Module, device: str) -> None:
    """Both models on `device`; the teacher frozen in eval mode."""
    if student is teacher:
        raise IterabreError("the student and the teacher are the same object.",
                            "distil from an unpruned copy (copy.deepcopy before removing blocks)")
    student.to(device)
    teacher.to(device).eval().requires_grad_(False)


def recover(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            cfg: RecoveryConfig, removed: list[int] = (), progress: Callable[[dict], None] | None = None,
            device: str = "cpu", heldout_ids: torch.Tensor | None = None,
            heldout_mask: torch.Tensor | None = None, dist: Single = SINGLE,
            recon_ids: torch.Tensor | None = None) -> RecoveryResult:
    """Heal `student` in place towards `teacher` with `cfg.method`; returns what happened.

    `dist`: this process's place when several train together (iterabre.distributed); then only
    rank 0's `student` is sure to hold the result (under FSDP the others keep their old weights).
    `recon_ids` [M,T]: the text block-recon and reconstruct fit on (self-generated calibration); KD
    always trains on `input_ids`.
    """
    check_recovery(cfg)
    _check_data(input_ids, attention_mask, "recovery")
    if recon_ids is not None:
        _check_data(recon_ids, recon_ids, "reconstruction")
    if heldout_ids is not None:
        _check_data(heldout_ids, heldout_mask if heldout_mask is not None else heldout_ids, "held-out")
    _prepare_models(student, teacher, device)
    job = RecoveryJob(student, teacher, input_ids, attention_mask, cfg, list(removed), progress, device,
                      heldout_ids, heldout_mask, dist, recon_ids)
    from iterabre.flops import count_flops

    with count_flops() as counted:  # from the shapes of every matmul / attention call the method makes
        result = RECOVERY_METHODS[cfg.method](job)
    result.flops = int(dist.all_sum(counted.total))  # every process's share of the work
    result.world_size, result.fsdp, result.dtype = dist.world, dist.fsdp, _dtype_name(teacher)
    return result
