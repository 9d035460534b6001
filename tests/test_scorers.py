"""Block scorers: fast path == naive reference on every tiny family, semantics, selection, errors."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from iterabre.errors import IterabreError
from iterabre import scorers
from iterabre.scorers import (SCORERS, lowest_blocks, naive_scores, naive_set_distances, score_blocks,
                              select_removal, set_distances)
from iterabre.surgery import original_indices, remove_blocks
from iterabre.tiny import FAMILY_CONFIGS, tiny_model
from conftest import assert_scores_close, padded_calib

ALL_FAMILIES = list(FAMILY_CONFIGS)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_fast_equals_naive_for_every_scorer(family, caplog):
    model = tiny_model(family, num_layers=6)
    ids, mask = padded_calib()
    with caplog.at_level(logging.WARNING, logger="iterabre.scorers"):
        for name in SCORERS:
            fast = score_blocks(model, ids, mask, scorer=name, batch_size=2)
            assert_scores_close(fast, naive_scores(model, ids, mask, scorer=name, batch_size=2), atol=1e-4)
            assert sorted(fast) == list(range(6))
    assert not caplog.records, "the fast path fell back to naive scoring"


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fast_equals_naive_for_runs_after_removal(family):
    model = remove_blocks(tiny_model(family, num_layers=6), [1])
    ids, mask = padded_calib()
    for name in SCORERS:
        fast = score_blocks(model, ids, mask, scorer=name, n=2, batch_size=2)
        assert_scores_close(fast, naive_scores(model, ids, mask, scorer=name, n=2, batch_size=2), atol=1e-4)
        # 5 blocks left, runs of 2: starts at positions 0..3, keyed by original index.
        assert list(fast) == [0, 2, 3, 4] and fast.order == [0, 2, 3, 4, 5]


def test_output_score_matches_real_removal():
    model = tiny_model("qwen2", num_layers=5)
    ids, mask = padded_calib()
    scores = score_blocks(model, ids, mask, scorer="output")
    with torch.no_grad():
        full = model.model(ids, attention_mask=mask).last_hidden_state
    for block in (0, 3):
        pruned = remove_blocks(copy.deepcopy(model), [block])
        with torch.no_grad():
            without = pruned.model(ids, attention_mask=mask).last_hidden_state
        cos = F.cosine_similarity(full[mask.bool()], without[mask.bool()], dim=-1)
        assert scores[block] == pytest.approx(1 - cos.mean().item(), abs=1e-5)


def test_perplexity_score_is_log_ppl_without_the_block():
    model = tiny_model("llama", num_layers=4)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    scores = score_blocks(model, ids, torch.ones_like(ids), scorer="perplexity")
    pruned = remove_blocks(copy.deepcopy(model), [2])
    with torch.no_grad():
        loss = pruned(ids, labels=ids).loss.item()  # mean next-token NLL = log-perplexity
    assert scores[2] == pytest.approx(loss, abs=1e-5)


def test_padding_is_excluded_and_batching_does_not_matter():
    model = tiny_model("mistral", num_layers=4)
    ids, mask = padded_calib()
    repadded = ids.masked_fill(mask == 0, 7)  # other tokens under the padding
    for name in ("output", "block-influence", "perplexity"):
        base = score_blocks(model, ids, mask, scorer=name, batch_size=3)
        assert_scores_close(score_blocks(model, repadded, mask, scorer=name, batch_size=3), base, atol=1e-6)
        assert_scores_close(score_blocks(model, ids, mask, scorer=name, batch_size=1), base, atol=1e-5)
    # Without the mask the padded positions count, and the scores move.
    unmasked = score_blocks(model, repadded, torch.ones_like(mask), scorer="output")
    assert max(abs(unmasked[k] - base[k]) for k in base) > 1e-4


def test_fallback_to_naive_when_replay_cannot_reproduce(caplog):
    model = tiny_model("llama", num_layers=4)
    # An extra transformation after the final norm that the fast path does not know about.
    model.model.register_forward_hook(
        lambda mod, args, out: out.__class__(last_hidden_state=out.last_hidden_state.flip(-1)))
    ids, mask = padded_calib()
    with caplog.at_level(logging.WARNING, logger="iterabre.scorers"):
        fast = score_blocks(model, ids, mask, scorer="output")
    assert "using naive scoring" in caplog.text and "final norm" in caplog.text
    assert_scores_close(fast, naive_scores(model, ids, mask, scorer="output"), atol=1e-6)


def test_progress_is_reported_and_mode_restored():
    model = tiny_model("llama", num_layers=4).train()
    ids, mask = padded_calib()
    calls = []
    record = lambda done, total: calls.append((done, total))  # noqa: E731
    score_blocks(model, ids, mask, scorer="output", batch_size=2, progress=record)
    assert calls == [(d, 8) for d in range(1, 9)]  # 2 batches x 4 candidates
    calls.clear()
    naive_scores(model, ids, mask, scorer="angular", n=2, batch_size=3, progress=record)
    assert calls == [(1, 1)]
    assert model.training


def test_bad_inputs_raise_with_fix():
    model = tiny_model("llama", num_layers=4)
    ids, mask = padded_calib()
    with pytest.raises(IterabreError, match="output, block-influence, angular, perplexity"):
        score_blocks(model, ids, mask, scorer="nope")
    with pytest.raises(IterabreError, match="n=4"):
        score_blocks(model, ids, mask, scorer="angular", n=4)
    with pytest.raises(IterabreError, match="does not match"):
        score_blocks(model, ids, mask[:, :5])
    with pytest.raises(IterabreError, match="no scorable tokens|No scorable tokens"):
        score_blocks(model, ids, torch.zeros_like(mask))


def test_lowest_blocks_ranks_with_deterministic_ties():
    scores = {0: 0.5, 2: 0.1, 3: 0.3, 5: 0.1, 7: 0.9}
    assert lowest_blocks(scores, 1) == [2]
    assert lowest_blocks(scores, 3) == [2, 5, 3]
    with pytest.raises(IterabreError, match="only 5"):
        lowest_blocks(scores, 6)


def test_lowest_blocks_contiguous_follows_remaining_order():
    model = remove_blocks(tiny_model("llama", num_layers=6), [2])  # remaining: 0 1 3 4 5
    ids, mask = padded_calib()
    scores = score_blocks(model, ids, mask, scorer="angular", n=2)
    start = min(scores, key=lambda i: (scores[i], i))
    order = original_indices(model)
    run = lowest_blocks(scores, 2, contiguous=True)
    assert run == order[order.index(start):order.index(start) + 2]
    # Explicit order wins, e.g. after a JSON round trip that dropped the attribute.
    assert lowest_blocks({1: 0.2, 3: 0.1}, 2, contiguous=True, order=[0, 1, 3, 4]) == [3, 4]
    assert lowest_blocks({0: 0.3, 1: 0.2, 2: 0.9}, 3, contiguous=True) == [1, 2, 3]
    with pytest.raises(IterabreError, match="runs past the last block"):
        lowest_blocks({3: 0.1}, 2, contiguous=True, order=[0, 1, 3])


@pytest.mark.slow
def test_smollm2_fast_equals_naive_and_pruned_reload_generates(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    fast = score_blocks(model, ids, mask, scorer="output", batch_size=2)
    assert_scores_close(fast, naive_scores(model, ids, mask, scorer="output", batch_size=2), atol=1e-4)

    remove_blocks(model, [15])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 29 and 15 not in reloaded.config.iterabre_original_layers
    prompt = ids[:1, :12]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                  do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(prompt, use_cache=False, **kwargs)
        assert torch.equal(reloaded.generate(prompt, use_cache=True, **kwargs), expected)


# ---------------------------------------------------------------- whole removal sets (select)

SETS = {"run": [1, 2], "spread": [0, 5], "one": [3]}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_streamed_set_distances_equal_naive(family, monkeypatch, caplog):
    """The block walk gives the naive reference's distances (whole model rerun once per set) on every family,
    without falling back to it."""
    model = tiny_model(family, num_layers=6)
    ids, mask = padded_calib()
    want = naive_set_distances(model, ids, mask, SETS, batch_size=2)
    monkeypatch.setattr(scorers, "naive_set_distances", lambda *a, **k: pytest.fail("fell back to naive"))
    with caplog.at_level(logging.WARNING, logger="iterabre.scorers"):
        got = set_distances(model, ids, mask, SETS, batch_size=2, device="cpu", call_budget=1)
    assert_scores_close(got, want, atol=1e-5)
    assert not caplog.records


def test_set_distances_after_removal_take_original_indices():
    """On an already pruned model the sets name original blocks; one block's set is its output score."""
    model = remove_blocks(tiny_model("gemma2", num_layers=6), [1])
    ids, mask = padded_calib()
    got = set_distances(model, ids, mask, {"a": [2, 3], "b": [5]}, batch_size=2, device="cpu")
    assert_scores_close(got, naive_set_distances(model, ids, mask, {"a": [2, 3], "b": [5]}, batch_size=2))
    assert got["b"] == pytest.approx(naive_scores(model, ids, mask, scorer="output", batch_size=2)[5], abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_one_block_set_is_its_output_score_and_sets_are_joint(family):
    """Removing one block moves the output by what the output scorer says; a pair is scored together, not as
    the sum of its blocks' scores; the model keeps every block and weight afterwards."""
    model = tiny_model(family, num_layers=6)
    ids, mask = padded_calib()
    before = [p.clone() for p in model.parameters()]
    scores = naive_scores(model, ids, mask, scorer="output")
    got = set_distances(model, ids, mask, {"0": [0], "3": [3], "5": [5], "pair": [1, 2]}, device="cpu")
    for block in (0, 3, 5):
        assert got[str(block)] == pytest.approx(scores[block], abs=1e-6)
    assert got["pair"] > 0 and got["pair"] != pytest.approx(scores[1] + scores[2], abs=1e-4)
    assert original_indices(model) == list(range(6))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("bad", [{"x": [9]}, {"x": []}, {"x": list(range(4))}])
def test_bad_removal_set_is_refused(bad):
    model = tiny_model("llama", num_layers=4)
    ids, mask = padded_calib()
    with pytest.raises(IterabreError, match="proper subset"):
        set_distances(model, ids, mask, bad, device="cpu")


def test_select_takes_the_smallest_distance_ties_to_the_first_named():
    assert select_removal({"output": 0.2, "angular": 0.1}) == "angular"
    assert select_removal({"output": 0.1, "angular": 0.1}) == "output"
    assert select_removal({"angular": 0.1, "output": 0.1}) == "angular"
