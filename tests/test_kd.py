"""KD loss against an explicit-loop numpy reference, masking, chunking and gradients."""

import math

import numpy as np
import pytest
import torch

from iterabre.errors import IterabreError
from iterabre.kd import KDLoss, forward_kl, forward_kl_reference, hidden_mse, next_token_ce


def _case(seed=0):
    """A tiny [2,3,5] batch: logits, hidden [2,3,4], ids, and a mask with one padded token."""
    gen = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen) * 2
    hs, ht = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    ids = torch.tensor([[1, 4, 0], [3, 2, 2]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # last token of row 1 is padding
    return s, t, hs, ht, ids, mask


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _ref_kl(s, t, mask, temp):
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            p, q = _softmax(t[b, i] / temp), _softmax(s[b, i] / temp)
            total += sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(len(p)))
            n += 1
    return total / n * temp**2


def _ref_ce(s, ids, mask):
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            if mask[b, i] and mask[b, i + 1]:
                total -= math.log(_softmax(s[b, i])[ids[b, i + 1]])
                n += 1
    return total / n


def _ref_mse(hs, ht, mask):
    rows = [(hs[b, i] - ht[b, i]) ** 2 for b in range(hs.shape[0]) for i in range(hs.shape[1]) if mask[b, i]]
    return float(np.mean(rows))


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_forward_kl_matches_loops(temp):
    s, t, _, _, _, mask = _case()
    got = forward_kl(s, t, mask, temperature=temp)
    assert got.item() == pytest.approx(_ref_kl(s.double().numpy(), t.double().numpy(), mask.numpy(), temp), rel=1e-5)


def test_ce_and_mse_match_loops():
    s, _, hs, ht, ids, mask = _case()
    assert next_token_ce(s, ids, mask).item() == pytest.approx(_ref_ce(s.double().numpy(), ids.numpy(), mask.numpy()),
                                                               rel=1e-5)
    assert hidden_mse(hs, ht, mask).item() == pytest.approx(_ref_mse(hs.numpy(), ht.numpy(), mask.numpy()), rel=1e-5)


def test_kdloss_mixes_weighted_terms():
    s, t, hs, ht, ids, mask = _case()
    sn, tn, m = s.double().numpy(), t.double().numpy(), mask.numpy()
    loss_fn = KDLoss(temperature=2.0, kd_weight=0.5, ce_weight=0.3, hidden_weight=0.2)
    total, parts = loss_fn(s, t, mask, ids, hs, ht)
    expected = 0.5 * _ref_kl(sn, tn, m, 2.0) + 0.3 * _ref_ce(sn, ids.numpy(), m) + 0.2 * _ref_mse(hs.numpy(), ht.numpy(), m)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert set(parts) == {"kd", "ce", "hidden"}
    assert parts["kd"].item() == pytest.approx(_ref_kl(sn, tn, m, 2.0), rel=1e-5)


def test_padding_positions_do_not_change_loss():
    s, t, hs, ht, ids, mask = _case()
    loss_fn = KDLoss(temperature=2.0, ce_weight=0.5, hidden_weight=0.5)
    base, _ = loss_fn(s, t, mask, ids, hs, ht)
    s2, t2, hs2, ht2, ids2 = s.clone(), t.clone(), hs.clone(), ht.clone(), ids.clone()
    s2[1, 2], t2[1, 2], hs2[1, 2], ht2[1, 2], ids2[1, 2] = float("nan"), 1e4, float("inf"), -7.0, 4
    changed, _ = loss_fn(s2, t2, mask, ids2, hs2, ht2)
    assert changed.item() == base.item()
    # ...while the same edit at a valid position does change it (the test can fail).
    s3 = s.clone()
    s3[1, 1, 0] += 3.0  # one logit: a shift of the whole row would leave softmax unchanged
    assert loss_fn(s3, t, mask, ids, hs, ht)[0].item() != base.item()


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    s, t, _, _, _, mask = _case()
    assert forward_kl(s, s.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert forward_kl(s, t, mask).item() > 0


def test_chunking_gives_same_value_and_gradient():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(3, 7, 11, generator=gen, requires_grad=True)
    t, ids = torch.randn(3, 7, 11, generator=gen), torch.randint(0, 11, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    grads, values = [], []
    for chunk in (4, 1000):  # 4 -> several checkpointed chunks; 1000 -> one plain chunk
        loss, _ = KDLoss(temperature=2.0, ce_weight=1.0, chunk=chunk)(s, t, mask, ids)
        (grad,) = torch.autograd.grad(loss, s)
        values.append(loss.item())
        grads.append(grad)
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][2, 5:].abs().sum() == 0  # padded positions get no gradient


@pytest.mark.parametrize("temp, chunk, pad", [(1.0, 1000, False), (1.0, 4, True), (2.0, 5, True)])
def test_fused_kl_matches_autograd_reference_in_value_and_gradient(temp, chunk, pad):
    """The hand-written backward gives autograd's gradient, with and without padding and chunks."""
    gen = torch.Generator().manual_seed(2)
    s = (torch.randn(3, 7, 50, generator=gen) * 3).requires_grad_(True)
    t = torch.randn(3, 7, 50, generator=gen) * 3
    mask = torch.ones(3, 7, dtype=torch.long)
    if pad:
        mask[1, 4:] = 0
    values, grads = [], []
    for fn in (forward_kl, forward_kl_reference):
        loss = fn(s, t, mask, temperature=temp, chunk=chunk)
        values.append(loss.item())
        grads.append(torch.autograd.grad(loss * 3.0, s)[0])  # an upstream gradient != 1
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_bad_inputs_raise():
    s, t, _, _, ids, mask = _case()
    with pytest.raises(IterabreError, match="temperature"):
        forward_kl(s, t, mask, temperature=0)
    with pytest.raises(IterabreError, match="vocabulary"):
        forward_kl(s, t[..., :4], mask)
    with pytest.raises(IterabreError, match="mask"):
        forward_kl(s, t, mask[:, :2])
    with pytest.raises(IterabreError, match="weights"):
        KDLoss(kd_weight=0.0)
    with pytest.raises(IterabreError, match="input_ids"):
        KDLoss(ce_weight=1.0)(s, t, mask)
    with pytest.raises(IterabreError, match="hidden"):
        KDLoss(hidden_weight=1.0)(s, t, mask, ids)
