"""Retraining-free recovery: refit the projections next to a removed block by least squares.

After blocks are removed, the kept block `s` just before the gap feeds the next kept block
a residual stream that no longer matches the dense model. Its output is

    out_s = h + attn_out + mlp_out,   mlp_out = post(down_proj(m)),  attn_out = post(o_proj(a))

where `post` is the identity for Llama/Qwen2/Qwen3/Mistral/Phi3 and an RMSNorm for
sandwich-norm blocks (Gemma2/3, OLMo2). Holding everything else fixed, `out_s` is affine in
the weights of the last projection, so "make out_s equal the teacher's residual T entering
the same next block" (global propagation: the dense model's state, not the previous step's)
is an ordinary least-squares problem with inputs X = m (captured from the *pruned* student
with forward hooks) and target Y = T - out_s + mlp_out. We solve it with ridge on streamed
float64 Gram matrices (`iterabre.lstsq`), so memory does not grow with the token count.

Default: refit `down_proj` only. That fit is exact: nothing after `down_proj` in the block
depends on it. Refitting `o_proj` as well ("o_proj,down_proj") is optional and sequential:
`o_proj` is fitted with the MLP output held fixed (an approximation, since the MLP input
depends on `o_proj` through the post-attention norm), then `down_proj` is refitted exactly
on the new activations. If a fit makes the residual error worse, the old weights come back.
For sandwich norms the target is mapped back through the norm's gain (direction exact,
per-token scale kept from the current output): an approximation there.

Two choices measured on SmolLM2-135M (block 20 removed, 2048 wikitext tokens, 1536 features
in down_proj, held-out relative final-hidden error 0.279 without recovery):
- the ridge pulls W towards the *current* weights, not zero (the fit is a regularised
  correction): 0.190 at ridge 0.3 vs 0.200 for classic ridge at its best, 0.253 at ridge 1e-2;
- each token's row is weighted by 1/||T_t||: the attention-sink token at position 0 has a
  residual norm ~100x the others and would otherwise dominate both the fit and the error.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from iterabre.errors import IterabreError
from iterabre.lstsq import accumulate_gram, residual_sq, solve_state, with_bias_column
from iterabre.memory import peak_mb, start_peak

# Projection name -> attribute path inside a decoder block.
PROJECTIONS = {"o_proj": ("self_attn", "o_proj"), "down_proj": ("mlp", "down_proj")}
# Sandwich-norm blocks normalise each sub-layer's output before adding it to the residual.
POST_NORMS = {"o_proj": "post_attention_layernorm", "down_proj": "post_feedforward_layernorm"}
DEFAULT_MODULES = ("down_proj",)


@dataclass
class ReconstructResult:
    """What one reconstruction did: residual errors (relative, calibration data), cost, modules."""

    # Relative residual error at the fitted block's output, sqrt(sum_t w_t^2 ||out_t - T_t||^2 /
    # sum_t w_t^2 ||T_t||^2) over calibration tokens; with weighting="norm" (w_t = 1/||T_t||) that is
    # the RMS of the per-token relative errors.
    error_before: float
    error_after: float  # the same after the fits (exact from the Gram sums, or a measuring pass)
    seconds: float
    peak_mem_mb: float
    fitted: list[str] = field(default_factory=list)  # module names whose weights changed
    tokens: int = 0  # non-padding calibration tokens per fit
    gaps: list[dict] = field(default_factory=list)  # per fitted block: position, target, errors
    restored: list[str] = field(default_factory=list)  # blocks whose fit was undone (it hurt)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed block has run."""


# ---------------------------------------------------------------- model structure

def _decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks (via iterabre.surgery)."""
    from iterabre.surgery import decoder_blocks

    return decoder_blocks(model)


def _original_indices(model: nn.Module) -> list[int]:
    """Base-model numbering of the model's remaining blocks (via iterabre.surgery)."""
    from iterabre.surgery import original_indices

    return list(original_indices(model))


def projection(block: nn.Module, name: str) -> nn.Linear:
    """The `name` projection (o_proj / down_proj) of a decoder block, or a clear error."""
    if name not in PROJECTIONS:
        raise IterabreError(f"unknown reconstruction module {name!r}.",
                            f"use one or more of {', '.join(PROJECTIONS)} (e.g. 'down_proj')")
    module = block
    for attr in PROJECTIONS[name]:
        module = getattr(module, attr, None)
    if not isinstance(module, nn.Linear):
        wanted = " and ".join(".".join(p) for p in PROJECTIONS.values())
        raise IterabreError(
            f"reconstruction needs decoder blocks with {wanted}; {type(block).__name__} has no "
            f"{'.'.join(PROJECTIONS[name])} linear layer.",
            "use --recovery kd (or lora-kd) for this architecture")
    return module


def post_norm(block: nn.Module, name: str) -> nn.Module | None:
    """The norm applied to the projection's output before the residual add (sandwich norms), or None."""
    # A post-feedforward norm marks sandwich blocks; only there is post_attention_layernorm a post-norm
    # (in Llama-style blocks it is the pre-MLP norm and must not be inverted).
    if getattr(block, "post_feedforward_layernorm", None) is None:
        return None
    return getattr(block, POST_NORMS[name])


def fit_plan(student: nn.Module, teacher: nn.Module, removed) -> list[tuple[int, int]]:
    """[(student block position, teacher block position)] to fit, one per gap left by `removed`.

    The fitted block is the kept one just before the gap (or the first kept block if the gap is
    at the start); its target is the teacher's hidden state entering the student's next kept block
    (the teacher's last block output if the fitted block is the student's last).
    """
    s_orig, t_orig = _original_indices(student), _original_indices(teacher)
    still = sorted(set(removed) & set(s_orig))
    if still:
        raise IterabreError(f"blocks {still} are listed as removed but the student still has them.",
                            "call surgery.remove_blocks on the student before reconstructing")
    plan = []
    for r in sorted(set(removed)):
        before = [p for p, o in enumerate(s_orig) if o < r]
        s_pos = before[-1] if before else 0  # gap at the start: fit the first kept block instead
        plan.append((s_pos, _teacher_target(s_orig, t_orig, s_pos)))
    return sorted(set(plan))


def _teacher_target(s_orig: list[int], t_orig: list[int], s_pos: int) -> int:
    """Teacher position whose output is the state entering the student's block after `s_pos`."""
    if s_orig[s_pos] not in t_orig:
        raise IterabreError(f"the teacher lacks original block {s_orig[s_pos]} that the student keeps.",
                            "use the base model (or the previous step's model) as teacher")
    if s_pos + 1 == len(s_orig):
        return len(t_orig) - 1
    nxt = s_orig[s_pos + 1]
    return max(p for p, o in enumerate(t_orig) if o < nxt)


# ---------------------------------------------------------------- activation capture

def _first(x):
    """A block/module output as a tensor (some blocks return tuples)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def forward_capture(model: nn.Module, stop_block: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                    taps: dict[str, tuple[nn.Module, str]] | None = None) -> dict[str, torch.Tensor]:
    """Run `model` until `stop_block` finishes; {"out": its output, tap name: tapped tensor}.

    `taps` maps a name to (module, "input" | "output"). The pass stops right after the block,
    so later blocks and the LM head (the big vocab matmul) never run.
    """
    got: dict[str, torch.Tensor] = {}

    def tap(name, where):
        if where == "input":
            return lambda mod, args: got.__setitem__(name, _first(args))
        return lambda mod, args, out: got.__setitem__(name, _first(out))

    def stop(mod, args, out):
        got["out"] = _first(out)
        raise _Stop

    with ExitStack() as stack:
        for name, (module, where) in (taps or {}).items():
            hook = module.register_forward_pre_hook if where == "input" else module.register_forward_hook
            stack.callback(hook(tap(name, where)).remove)
        stack.callback(stop_block.register_forward_hook(stop).remove)
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
    if "out" not in got:
        raise IterabreError("the forward pass never reached the block to reconstruct.",
                            "check that the block belongs to this model")
    return got


def _rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B,T,D] -> float64 [N,D] keeping only non-padding tokens."""
    return x.reshape(-1, x.shape[-1])[keep].double()


def _batches(ids: torch.Tensor, mask: torch.Tensor, batch_size: int):
    """Consecutive (ids, mask) row batches."""
    for start in range(0, ids.shape[0], batch_size):
        yield ids[start:start + batch_size], mask[start:start + batch_size]


def _device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


# ---------------------------------------------------------------- the fit

@dataclass
class FitOptions:
    """Knobs of the fit; `from_config` takes `ridge` from a RecoveryConfig, the rest from overrides."""

    modules: tuple[str, ...] = DEFAULT_MODULES  # projections to refit, attention first
    ridge: float = 0.3  # relative to mean diag(X^T X); see the module docstring for the SmolLM2 sweep
    ridge_relative: bool = True  # False: `ridge` is an absolute lambda
    ridge_target: str = "current"  # current: shrink towards the old weights | zero: classic ridge
    weighting: str = "norm"  # norm: every token counts equally (rows / ||T_t||) | none: raw squared error

    @classmethod
    def from_config(cls, cfg, **override) -> "FitOptions":
        """Defaults, cfg.ridge, then every override that is not None."""
        opts = dataclasses.asdict(cls(ridge=cfg.ridge))
        opts.update({k: v for k, v in override.items() if v is not None})
        opts["modules"] = _module_names(opts["modules"])
        _check_choice("ridge_target", opts["ridge_target"], ("current", "zero"))
        _check_choice("weighting", opts["weighting"], ("norm", "none"))
        return cls(**opts)


def _check_choice(field_name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Reject an unknown option value, listing the allowed ones."""
    if value not in allowed:
        raise IterabreError(f"unknown reconstruction {field_name}={value!r}.", f"use one of {', '.join(allowed)}")


def _module_names(spec) -> tuple[str, ...]:
    """'o_proj,down_proj' or a sequence -> validated names in block order (attention first)."""
    names = tuple(s.strip() for s in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    if not names:
        raise IterabreError("no reconstruction module given.", "use 'down_proj' or 'o_proj,down_proj'")
    for name in names:
        if name not in PROJECTIONS:
            raise IterabreError(f"unknown reconstruction module {name!r}.",
                                f"use one or more of {', '.join(PROJECTIONS)} (e.g. 'down_proj')")
    # Attention runs before the MLP: fitting in that order lets down_proj see the new o_proj.
    return tuple(n for n in PROJECTIONS if n in names)


def _norm_gain(norm: nn.Module, d: int, like: torch.Tensor) -> torch.Tensor:
    """Effective per-channel gain g of an RMSNorm-like module (norm(1) = g), float64 [d]."""
    ones = torch.ones(1, d, dtype=like.dtype, device=like.device)
    gain = norm(ones).double().reshape(-1)
    tiny = torch.full_like(gain, 1e-6)
    return torch.where(gain.abs() < 1e-6, tiny, gain)  # avoid dividing by a zeroed channel


def _invert_post_norm(target: torch.Tensor, current: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Pre-norm output whose RMSNorm points along `target`, with the current per-token scale."""
    u = target / gain  # norm(y) = y / rms(y) * g, so norm(y) ∝ target needs y ∝ target / g
    rms = lambda z: z.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-12)  # noqa: E731
    return u * (rms(current) / rms(u))


def _row_weights(T: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-token weights [N,1]: 1/||T_t|| so attention-sink tokens (norms ~100x) don't dominate."""
    if weighting == "none":
        return T.new_ones(T.shape[0], 1)
    return 1.0 / T.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _gap_pass(student, teacher, s_pos, t_pos, ids, mask, batch_size, weighting, name=None):
    """One pass over the calibration data: (weighted error sum, reference sum, Gram state if `name`)."""
    block, t_block = _decoder_blocks(student)[s_pos], _decoder_blocks(teacher)[t_pos]
    taps, gain, state = {}, None, None
    if name is not None:
        proj, norm = projection(block, name), post_norm(block, name)
        taps = {"x": (proj, "input"), "y": (proj, "output"), "c": (norm or proj, "output")}
    err, ref, s_dev, t_dev = 0.0, 0.0, _device(student), _device(teacher)
    for b_ids, b_mask in _batches(ids, mask, batch_size):
        target = forward_capture(teacher, t_block, b_ids.to(t_dev), b_mask.to(t_dev))["out"]
        got = forward_capture(student, block, b_ids.to(s_dev), b_mask.to(s_dev), taps)
        keep = b_mask.reshape(-1).bool().to(s_dev)
        T, out = _rows(target.to(s_dev), keep), _rows(got["out"], keep)  # [N,d]
        w = _row_weights(T, weighting)  # [N,1]
        err, ref = err + float((w * (out - T)).square().sum()), ref + float((w * T).square().sum())
        if name is None:
            continue
        # out is affine in this projection's contribution c: the c that hits T is T - out + c.
        want = T - out + _rows(got["c"], keep)
        if norm is not None:
            gain = _norm_gain(norm, want.shape[1], got["c"]) if gain is None else gain
            want = _invert_post_norm(want, _rows(got["y"], keep), gain)
        X = _rows(got["x"], keep)
        X = with_bias_column(X) if proj.bias is not None else X
        state = accumulate_gram(state, w * X, w * want)
    return err, ref, state


def _current_solution(proj: nn.Linear) -> torch.Tensor:
    """The layer as a solution matrix W[d_in(+1), d_out] (last row = bias when it has one)."""
    W = proj.weight.detach().double().T
    return torch.cat([W, proj.bias.detach().double()[None]]) if proj.bias is not None else W


def _apply_solution(proj: nn.Linear, W: torch.Tensor) -> None:
    """Write the solution W[d_in(+1), d_out] into the layer (last row = bias when it has one)."""
    d_in = proj.weight.shape[1]
    proj.weight.data.copy_(W[:d_in].T.to(proj.weight.dtype))
    if proj.bias is not None:
        proj.bias.data.copy_(W[d_in].to(proj.bias.dtype))


def _fit_block(student, teacher, s_pos, t_pos, ids, mask, opts: FitOptions, batch_size) -> dict:
    """Fit `opts.modules` of student block `s_pos` in order; restore the old weights if the error grew."""
    block = _decoder_blocks(student)[s_pos]
    projs = {name: projection(block, name) for name in opts.modules}  # fail before any forward pass
    backup = {name: {k: v.clone() for k, v in p.state_dict().items()} for name, p in projs.items()}
    run = lambda name=None: _gap_pass(student, teacher, s_pos, t_pos, ids, mask, batch_size,  # noqa: E731
                                      opts.weighting, name)
    err0, err1 = None, None
    for name, proj in projs.items():
        err, ref, state = run(name)
        err0 = err if err0 is None else err0
        prior = _current_solution(proj) if opts.ridge_target == "current" else None
        W = solve_state(state, opts.ridge, opts.ridge_relative, prior)
        _apply_solution(proj, W)
        err1 = residual_sq(state, W)  # exact for the last fit when nothing after it is nonlinear in W
    if projs and (opts.modules[-1] != "down_proj" or post_norm(block, "down_proj") is not None):
        err1, _, _ = run()  # approximate targets (o_proj last, sandwich norm): measure instead
    restored = err1 > err0
    if restored:  # possible with approximate targets; never keep a fit that made things worse
        for name, proj in projs.items():
            proj.load_state_dict(backup[name])
        err1 = err0
    return dict(student_pos=s_pos, teacher_pos=t_pos, err_before=err0, err_after=err1, ref=ref,
                tokens=state.n, restored=restored)


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate the calibration batch; returns a mask (all ones if none given)."""
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise IterabreError(f"calibration input_ids must be [N, T] with N > 0, got {tuple(input_ids.shape)}.",
                            "pass a LongTensor of token windows")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if mask.shape != input_ids.shape:
        raise IterabreError(f"attention_mask {tuple(mask.shape)} does not match input_ids "
                            f"{tuple(input_ids.shape)}.", "pass a mask with the same shape")
    if int(mask.sum()) == 0:
        raise IterabreError("the calibration data has no non-padding tokens.", "pass text with attention_mask = 1")
    return mask


def reconstruct(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, cfg, removed, modules=None, batch_size: int | None = None,
                **options) -> ReconstructResult:
    """Refit the projections of the kept block before each gap left by `removed` (in place).

    `modules` ('down_proj' | 'o_proj,down_proj') and `options` (ridge, ridge_relative,
    ridge_target, weighting) override what `cfg` says; see `FitOptions`.
    """
    mask = _check_inputs(input_ids, attention_mask)
    opts = FitOptions.from_config(cfg, modules=modules, **options)
    plan = fit_plan(student, teacher, removed)
    batch_size = batch_size or max(cfg.batch_size, 1)
    start, was_training = time.perf_counter(), student.training
    mem = start_peak(_device(student))
    student.eval()
    gaps = []
    try:
        with torch.no_grad():
            for s_pos, t_pos in plan:  # shallow to deep: later gaps see the earlier fits
                gaps.append(_fit_block(student, teacher, s_pos, t_pos, input_ids, mask, opts, batch_size))
    finally:
        student.train(was_training)
    return _result(student, gaps, opts.modules, time.perf_counter() - start, mem)


def _result(student: nn.Module, gaps: list[dict], names, seconds: float, mem: int) -> ReconstructResult:
    """Aggregate per-gap sums into relative errors and module names."""
    ref = sum(g["ref"] for g in gaps) or 1.0
    rel = lambda key: (sum(g[key] for g in gaps) / ref) ** 0.5 if gaps else 0.0  # noqa: E731
    blocks = _decoder_blocks(student)
    by_id = {id(m): n for n, m in student.named_modules()}
    fitted = [by_id[id(projection(blocks[g["student_pos"]], n))] for g in gaps if not g["restored"] for n in names]
    restored = [by_id[id(blocks[g["student_pos"]])] for g in gaps if g["restored"]]
    return ReconstructResult(error_before=rel("err_before"), error_after=rel("err_after"), seconds=seconds,
                             peak_mem_mb=peak_mb(_device(student), mem), fitted=fitted,
                             tokens=max((g["tokens"] for g in gaps), default=0), gaps=gaps, restored=restored)


# ---------------------------------------------------------------- memory + metric


def final_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states after the final norm [B,T,d], without computing logits."""
    out = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state


def relative_hidden_error(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, batch_size: int = 8) -> float:
    """||h_s - h_t|| / ||h_t|| of the final (normed) hidden states over all non-padding tokens."""
    mask = _check_inputs(input_ids, attention_mask)
    err, ref = 0.0, 0.0
    with torch.no_grad():
        for ids, m in _batches(input_ids, mask, batch_size):
            keep = m.reshape(-1).bool()
            hs = _rows(final_hidden(student, ids.to(_device(student)), m.to(_device(student))).cpu(), keep)
            ht = _rows(final_hidden(teacher, ids.to(_device(teacher)), m.to(_device(teacher))).cpu(), keep)
            err, ref = err + float((hs - ht).square().sum()), ref + float(ht.square().sum())
    return (err / ref) ** 0.5 if ref > 0 else 0.0
