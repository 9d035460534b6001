"""bench/base_eval.py: chunking of the full suite, claims shared by two processes, group scores."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import base_eval  # noqa: E402
import common  # noqa: E402

from iterabre.evaluation.harness import subtask_names  # noqa: E402


def test_chunks_cover_every_leaf_task_once_in_order():
    chunks = base_eval.plan_chunks()
    leaves = [t for tasks in chunks.values() for t in tasks]
    assert leaves == ["wikitext", *subtask_names("blimp"), *subtask_names("xcopa")]
    assert len(subtask_names("blimp")) == 67 and len(subtask_names("xcopa")) == 11
    assert len(chunks) == 1 + base_eval.SLICES["blimp"] + base_eval.SLICES["xcopa"]


def _done(chunks: dict, skip: str = "") -> dict:
    """Fake finished chunks: leaf i gets acc = i / 100 and stderr = 0.01 * (1 + i % 3)."""
    done, i = {}, 0
    for chunk, tasks in chunks.items():
        if chunk == skip:
            continue
        results = {}
        for task in tasks:
            results[task] = {"word_perplexity": 30.0} if task == "wikitext" else \
                {"acc": i / 100, "acc_stderr": 0.01 * (1 + i % 3)}
            i += 1
        done[chunk] = {"tasks": tasks, "results": results, "seconds": 1.0}
    return done


def test_blimp_group_is_the_unweighted_mean_with_its_stderr():
    chunks = base_eval.plan_chunks()
    out = base_eval.summary(_done(chunks), chunks, limit=None)
    leaves = [m for c, r in _done(chunks).items() if c.startswith("blimp/") for m in r["results"].values()]
    k = len(leaves)
    assert out["blimp"]["acc"] == pytest.approx(sum(m["acc"] for m in leaves) / k)
    # the stderr of a mean of k independent estimates: sqrt(sum se^2) / k
    assert out["blimp"]["acc_stderr"] == pytest.approx(math.sqrt(sum(m["acc_stderr"] ** 2 for m in leaves)) / k)
    assert out["blimp"]["n"] == 67 * 1000 and out["xcopa"]["n"] == 11 * 500
    assert out["wikitext"] == {"word_perplexity": 30.0}


def test_a_group_with_a_missing_chunk_is_not_summarised_and_limits_cap_sizes():
    chunks = base_eval.plan_chunks()
    out = base_eval.summary(_done(chunks, skip="blimp/3of6"), chunks, limit=7)
    assert "blimp" not in out and out["xcopa"]["n"] == 11 * 7


def test_two_processes_claim_different_chunks_and_a_dead_claim_is_retaken(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    s, chunks = {"model": "m", "batch_size": 1, "limit": 1}, {"a": ["wikitext"], "b": ["xcopa_et"]}
    monkeypatch.setattr(base_eval, "plan_chunks", lambda: chunks)
    assert base_eval.claim_next("t", s, chunks) == "a"  # claimed by this (live) process
    assert base_eval.claim_next("t", s, chunks) == "b"
    assert base_eval.claim_next("t", s, chunks) is None
    with base_eval.locked_state("t", s) as state:
        state["claims"]["a"] = 2 ** 22 + 12345  # beyond pid_max: a process that is gone
    assert base_eval.claim_next("t", s, chunks) == "a"
    base_eval.save_chunk("t", s, "a", {"tasks": ["wikitext"], "results": {"wikitext": {"x": 1.0}}, "seconds": 2.0})
    with base_eval.locked_state("t", s) as state:
        assert "a" in state["chunks"] and "a" not in state["claims"]
