"""Least-squares reconstruction: the ridge solver, the fit plan, and the recovery it gives."""

import copy

import pytest
import torch

from iterabre.config import RecoveryConfig
from iterabre.errors import IterabreError
from iterabre.lstsq import accumulate_gram, residual_sq, solve_ridge, solve_state, with_bias_column
from iterabre.reconstruct import fit_plan, reconstruct, relative_hidden_error
from iterabre.surgery import remove_blocks
from iterabre.tiny import tiny_model


def _problem(n=200, d_in=12, d_out=5, seed=0):
    """A noisy random linear problem X[n,d_in] @ W + noise = Y[n,d_out] in float64."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    W = torch.randn(d_in, d_out, generator=g, dtype=torch.float64)
    return X, X @ W + 0.1 * torch.randn(n, d_out, generator=g, dtype=torch.float64)


def test_solve_ridge_matches_lstsq_and_streaming_equals_one_shot():
    X, Y = _problem()
    state = None
    for rows in torch.split(torch.arange(X.shape[0]), 37):  # uneven chunks
        state = accumulate_gram(state, X[rows].float(), Y[rows].float())
    one_shot = accumulate_gram(None, X.float(), Y.float())
    assert state.n == one_shot.n == X.shape[0]
    torch.testing.assert_close(state.XtX, one_shot.XtX)
    torch.testing.assert_close(state.XtY, one_shot.XtY)
    W = solve_state(state, ridge=0.0)
    Xf, Yf = X.float().double(), Y.float().double()  # what the accumulator saw
    torch.testing.assert_close(W, torch.linalg.lstsq(Xf, Yf).solution, rtol=1e-8, atol=1e-8)
    # The Gram-only residual equals the directly computed one.
    assert residual_sq(state, W) == pytest.approx(float((Xf @ W - Yf).square().sum()), rel=1e-8)


def test_ridge_is_relative_to_the_gram_diagonal_and_shrinks():
    X, Y = _problem()
    XtX, XtY = X.T @ X, X.T @ Y
    lam = 0.5 * float(XtX.diagonal().mean())
    expected = torch.linalg.solve(XtX + lam * torch.eye(X.shape[1], dtype=X.dtype), XtY)
    torch.testing.assert_close(solve_ridge(XtX, XtY, 0.5), expected)
    assert solve_ridge(XtX, XtY, 0.5).norm() < solve_ridge(XtX, XtY, 0.0).norm()
    # Scaling the activations must not change a relative ridge's solution.
    torch.testing.assert_close(solve_ridge(100 * XtX, 100 * XtY, 0.5), expected)


def test_bias_column_recovers_an_offset():
    X, Y = _problem()
    with_offset = solve_ridge(*_gram(with_bias_column(X), Y + 3.0), 0.0)
    without = solve_ridge(*_gram(with_bias_column(X), Y), 0.0)
    torch.testing.assert_close(with_offset[:-1], without[:-1])  # the offset goes to the bias row only
    torch.testing.assert_close(with_offset[-1] - without[-1], torch.full((Y.shape[1],), 3.0, dtype=X.dtype))


def _gram(X, Y):
    """(X^T X, X^T Y) of a one-shot problem."""
    return X.T @ X, X.T @ Y


def test_too_few_tokens_without_ridge_names_the_number_needed():
    X, Y = _problem(n=8, d_in=12)
    state = accumulate_gram(None, X, Y)
    with pytest.raises(IterabreError, match=r"only 8 calibration tokens.*>= 12 tokens") as err:
        solve_state(state, ridge=0.0)
    assert "ridge > 0" in err.value.fix
    solve_state(state, ridge=1e-2)  # the suggested fix works


def test_rank_deficient_features_raise_even_with_enough_tokens():
    X, Y = _problem(n=50, d_in=6)
    X[:, 5] = X[:, 4]  # duplicate feature: X^T X is singular
    with pytest.raises(IterabreError, match="singular"):
        solve_ridge(*_gram(X, Y), 0.0)


def _calibration(n, seq_len=32, seed=0):
    """Random byte-token windows with a padded tail on the first row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq_len // 2:] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reconstruction_lowers_heldout_error(family):
    teacher = tiny_model(family, num_layers=6)
    student = remove_blocks(copy.deepcopy(teacher), [3])
    ids, mask = _calibration(32)
    held, held_mask = _calibration(8, seed=1)
    before = relative_hidden_error(student, teacher, held, held_mask)
    untouched = {n: p.clone() for n, p in student.named_parameters()}
    result = reconstruct(student, teacher, ids, mask, RecoveryConfig(ridge=1e-3), [3],
                         modules="o_proj,down_proj")
    after = relative_hidden_error(student, teacher, held, held_mask)
    assert after < 0.9 * before
    assert result.error_after < result.error_before
    assert result.fitted == ["model.layers.2.self_attn.o_proj", "model.layers.2.mlp.down_proj"]
    assert result.tokens == int(mask.sum())  # padding excluded
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, untouched[n])}
    assert changed == {f"model.layers.2.{m}.weight" for m in ("self_attn.o_proj", "mlp.down_proj")}


def test_down_proj_fit_is_exact_least_squares_on_calibration():
    """With only down_proj refit, the measured error equals the optimum the solver promised."""
    teacher = tiny_model("llama", num_layers=6)
    student = remove_blocks(copy.deepcopy(teacher), [3])
    ids, mask = _calibration(48)
    result = reconstruct(student, teacher, ids, mask, RecoveryConfig(ridge=0.0), [3])
    assert result.error_after < result.error_before
    # The next run measures the fitted model by a forward pass: it matches the Gram-sum prediction,
    # and refitting from the optimum cannot improve any further.
    again = reconstruct(student, teacher, ids, mask, RecoveryConfig(ridge=0.0), [3])
    assert again.error_before == pytest.approx(result.error_after, rel=1e-4)
    assert again.error_after == pytest.approx(result.error_after, rel=1e-4)


def test_ridge_towards_current_weights_keeps_them_at_large_ridge():
    teacher = tiny_model("llama", num_layers=6)
    student = remove_blocks(copy.deepcopy(teacher), [3])
    old = student.model.layers[2].mlp.down_proj.weight.clone()
    ids, mask = _calibration(8)
    reconstruct(student, teacher, ids, mask, RecoveryConfig(ridge=1e6), [3], ridge_target="current")
    torch.testing.assert_close(student.model.layers[2].mlp.down_proj.weight, old, rtol=0, atol=1e-4)
    # Classic ridge shrinks towards zero weights, which is worse than no fit: the guard undoes it.
    result = reconstruct(student, teacher, ids, mask, RecoveryConfig(ridge=1e6), [3], ridge_target="zero")
    assert result.restored == ["model.layers.2"] and result.fitted == []
    torch.testing.assert_close(student.model.layers[2].mlp.down_proj.weight, old, rtol=0, atol=1e-4)


def test_fit_plan_targets_and_gap_at_start():
    teacher = tiny_model("llama", num_layers=6)
    student = remove_blocks(copy.deepcopy(teacher), [0, 3, 4])
    # student keeps originals [1, 2, 5]: gap at 0 -> fit block 1 (pos 0), target = teacher after block 1;
    # gap 3-4 -> fit block 2 (pos 1), target = teacher state entering block 5 (after original 4).
    assert fit_plan(student, teacher, [0, 3, 4]) == [(0, 1), (1, 4)]
    with pytest.raises(IterabreError, match="still has them"):
        fit_plan(student, teacher, [2])


def test_architecture_without_projections_is_refused():
    teacher = tiny_model("gpt2", num_layers=4)
    student = remove_blocks(copy.deepcopy(teacher), [2])
    ids, mask = _calibration(4)
    with pytest.raises(IterabreError, match=r"self_attn\.o_proj and mlp\.down_proj"):
        reconstruct(student, teacher, ids, mask, RecoveryConfig(), [2])


def test_recover_dispatches_reconstruct():
    from iterabre.recovery import recover

    teacher = tiny_model("llama", num_layers=6)
    student = remove_blocks(copy.deepcopy(teacher), [3])
    ids, mask = _calibration(48)
    result = recover(student, teacher, ids, mask, RecoveryConfig(method="reconstruct", ridge=1e-3), [3])
    info = result.extra["reconstruct"]
    assert result.method == "reconstruct" and info["fitted"] == ["model.layers.2.mlp.down_proj"]
    assert info["error_after"] < info["error_before"]


def test_reconstruct_tokens_fits_on_the_first_windows_only():
    """reconstruct_tokens=N: the fit reads the first windows reaching N tokens, so it equals a fit on just
    those windows (bit for bit) and differs from one on all of them; 0 reads every window."""
    from iterabre.recovery import recover

    teacher = tiny_model("llama", num_layers=6)
    ids, mask = _calibration(48)
    fit = lambda n, i, m: recover(remove_blocks(copy.deepcopy(teacher), [3]), teacher, i, m,  # noqa: E731
                                  RecoveryConfig(method="reconstruct", ridge=1e-3, reconstruct_tokens=n), [3])
    part = int(mask[:2].sum())  # the first two windows' tokens
    capped, alone, every = fit(part, ids, mask), fit(0, ids[:2], mask[:2]), fit(0, ids, mask)
    assert capped.extra["reconstruct"]["tokens"] == alone.extra["reconstruct"]["tokens"] == part
    assert every.extra["reconstruct"]["tokens"] == int(mask.sum()) > part
    assert capped.extra["reconstruct"]["error_after"] == alone.extra["reconstruct"]["error_after"]
    assert every.extra["reconstruct"]["error_after"] != alone.extra["reconstruct"]["error_after"]


def test_reconstruct_fits_on_its_own_text_when_given():
    """recon_ids (self-generated text): the least-squares fit reads it, capped by reconstruct_tokens, and
    not the recovery windows, which KD alone trains on."""
    from iterabre.recovery import recover

    teacher = tiny_model("llama", num_layers=6)
    ids, mask = _calibration(48)
    own, _ = _calibration(8, seed=1)
    fit = lambda i, m, recon=None, n=0: recover(  # noqa: E731
        remove_blocks(copy.deepcopy(teacher), [3]), teacher, i, m,
        RecoveryConfig(method="reconstruct", ridge=1e-3, reconstruct_tokens=n), [3], recon_ids=recon)
    given, alone, capped = fit(ids, mask, own), fit(own, torch.ones_like(own)), fit(ids, mask, own, n=64)
    assert given.extra["reconstruct"]["tokens"] == own.numel() and capped.extra["reconstruct"]["tokens"] == 64
    assert given.extra["reconstruct"]["error_after"] == alone.extra["reconstruct"]["error_after"]


@pytest.mark.slow
def test_reconstruct_smollm2_one_block(smollm2_dir):
    from iterabre.data import load_documents, split_windows, token_windows
    from iterabre.models import load_model

    teacher, tok = load_model(str(smollm2_dir))
    windows = token_windows(tok, load_documents("wikitext", "valid")[:40], 128)
    parts = split_windows(windows, 16, 0, 4, seed=0)  # 2048 calibration tokens, 512 held out
    student = remove_blocks(copy.deepcopy(teacher), [20])
    before = relative_hidden_error(student, teacher, parts["heldout"])
    result = reconstruct(student, teacher, parts["calib"], None, RecoveryConfig(ridge=0.3), [20])
    after = relative_hidden_error(student, teacher, parts["heldout"])
    assert result.fitted == ["model.layers.19.mlp.down_proj"] and result.tokens == 2048
    assert result.error_after < result.error_before
    assert after < 0.9 * before  # measured: 0.279 -> 0.190 on 2048 tokens
