"""Streamed ridge least squares: accumulate Gram matrices over batches, solve once in float64.

Reconstruction fits a linear layer `Y ≈ X @ W` on every calibration token. Keeping X and Y
would cost memory linear in the number of tokens; the normal equations only need
`X^T X [d_in, d_in]` and `X^T Y [d_in, d_out]`, which are summed chunk by chunk, so memory
depends on the layer's width alone. Everything is float64: Gram matrices of bf16/fp32
activations lose too many digits in fp32 once a few thousand tokens are summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iterabre.errors import IterabreError

SINGULAR_PIVOT = 1e-11  # relative Cholesky pivot below which the system counts as singular (cond > ~1e11)


@dataclass
class GramState:
    """Running sums of the normal equations for one linear fit."""

    XtX: torch.Tensor  # [d_in, d_in] float64
    XtY: torch.Tensor  # [d_in, d_out] float64
    YtY: float = 0.0  # sum of squared targets (for relative residual errors)
    n: int = 0  # tokens (rows) accumulated so far


def new_gram(d_in: int, d_out: int, device: torch.device | str = "cpu") -> GramState:
    """An empty accumulator for a fit with `d_in` features and `d_out` outputs."""
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
    return GramState(XtX=zeros(d_in, d_in), XtY=zeros(d_in, d_out))


def accumulate_gram(state: GramState | None, X: torch.Tensor, Y: torch.Tensor) -> GramState:
    """Add the rows X[N, d_in], Y[N, d_out] to `state` (created on first use); returns it."""
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise IterabreError(f"least-squares rows must be X[N, d_in] and Y[N, d_out], got "
                            f"{tuple(X.shape)} and {tuple(Y.shape)}.", "flatten tokens to rows first")
    if state is None:
        state = new_gram(X.shape[1], Y.shape[1], X.device)
    X, Y = X.to(state.XtX), Y.to(state.XtX)
    state.XtX.addmm_(X.T, X)
    state.XtY.addmm_(X.T, Y)
    state.YtY += float(Y.square().sum())
    state.n += X.shape[0]
    return state


def with_bias_column(X: torch.Tensor) -> torch.Tensor:
    """X[N, d] -> [X | 1][N, d+1], so the last row of the solution is the bias."""
    return torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)


def solve_ridge(XtX: torch.Tensor, XtY: torch.Tensor, ridge: float, num_tokens: int | None = None,
                relative: bool = True, prior: torch.Tensor | None = None) -> torch.Tensor:
    """W[d_in, d_out] minimising ||XW - Y||^2 + lam ||W - prior||^2 via Cholesky, in float64.

    lam = ridge * mean(diag(XtX)) when `relative` (scale-free: the same ridge works for any
    activation magnitude and token count), else lam = ridge. `prior` (default 0) is what W is
    pulled towards: the current weights turn the fit into a regularised correction.
    """
    if ridge < 0:
        raise IterabreError(f"ridge={ridge} is negative.", "use ridge >= 0 (e.g. 1e-2)")
    d_in = XtX.shape[0]
    if ridge == 0 and num_tokens is not None and num_tokens < d_in:
        raise _underdetermined(d_in, num_tokens)
    A = XtX.to(torch.float64)
    lam = ridge * float(A.diagonal().mean()) if relative else ridge
    A = A + lam * torch.eye(d_in, dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(A)
    # Rank-deficient X^T X often still factors in floating point, with a pivot at round-off level:
    # treat pivots below SINGULAR_PIVOT x the largest diagonal entry as singular too.
    pivots = L.diagonal().square() if int(info) == 0 else None
    if pivots is None or float(pivots.min()) <= SINGULAR_PIVOT * float(A.diagonal().max()):
        raise _underdetermined(d_in, num_tokens)
    B = XtY.to(torch.float64)
    if prior is not None and lam > 0:
        B = B + lam * prior.to(B)
    return torch.cholesky_solve(B, L)


def solve_state(state: GramState, ridge: float, relative: bool = True,
                prior: torch.Tensor | None = None) -> torch.Tensor:
    """`solve_ridge` on an accumulated `GramState` (checks the token count too)."""
    return solve_ridge(state.XtX, state.XtY, ridge, num_tokens=state.n, relative=relative, prior=prior)


def residual_sq(state: GramState, W: torch.Tensor) -> float:
    """||XW - Y||^2 from the Gram sums alone: YtY - 2 tr(W^T XtY) + tr(W^T XtX W)."""
    W = W.to(state.XtX)
    return state.YtY - 2.0 * float((W * state.XtY).sum()) + float((W * (state.XtX @ W)).sum())


def _underdetermined(d_in: int, num_tokens: int | None) -> IterabreError:
    """The error for a singular system, naming how many tokens a ridge-free fit needs."""
    have = f"only {num_tokens} calibration tokens" if num_tokens is not None else "too few independent tokens"
    return IterabreError(
        f"least-squares system is singular: {have} for a layer with {d_in} input features "
        f"(a ridge-free fit needs >= {d_in} tokens with linearly independent activations).",
        f"use more calibration tokens (>= {d_in}) or a ridge > 0 (e.g. --ridge 1e-2)")
