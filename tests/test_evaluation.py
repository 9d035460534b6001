"""Evaluation harness: local lm-eval tasks on real data (tiny model), scoring logic on
hand-made data with a stub LM, error paths, and one slow check on the real SmolLM2."""

import json
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lm_eval.api.model import LM

from iterabre.errors import IterabreError
from iterabre.evaluation import evaluate, local_tasks, parse_tasks, run_evaluate
from iterabre.evaluation.harness import check_limit, evaluate_lm, subtask_names
from iterabre.tiny import byte_tokenizer, tiny_model

BLIMP = subtask_names("blimp")
XCOPA = subtask_names("xcopa")


# ---------------------------------------------------------------- stub LM + hand-made data

class LookupLM(LM):
    """Scores a continuation by a lookup table (default -100) and records every request."""

    def __init__(self, table: dict[str, float], rolling: float = -2.0):
        super().__init__()
        self.table, self.rolling, self.seen = table, rolling, []

    def loglikelihood(self, requests):
        self.seen += [r.args for r in requests]
        return [(self.table.get(cont.strip(), -100.0), False) for _ctx, cont in (r.args for r in requests)]

    def loglikelihood_rolling(self, requests):
        self.seen += [r.args for r in requests]
        return [self.rolling for _ in requests]

    def generate_until(self, requests):
        raise AssertionError("no local task generates text")


def _write(path, rows: dict[str, list]):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)


def _blimp_rows(n_right: int, n_wrong: int) -> dict[str, list]:
    """Pairs whose good sentence is in the table (right) or whose bad one is (wrong)."""
    good = [f"good{i}" for i in range(n_right + n_wrong)]
    bad = [f"bad{i}" for i in range(n_right + n_wrong)]
    return {"sentence_good": good, "sentence_bad": bad}


def _xcopa_rows(lang: str, labels: list[int], questions: list[str]) -> dict[str, list]:
    n = len(labels)
    return {"premise": [f"Premise {lang} {i}." for i in range(n)],
            "choice1": [f"First {lang} {i}" for i in range(n)],
            "choice2": [f"Second {lang} {i}" for i in range(n)],
            "question": questions, "label": labels, "idx": list(range(n))}


@pytest.fixture
def handmade(tmp_path):
    """A data dir where the LookupLM's right answers are known for every item.

    BLiMP: adjunct_island 1/1 right, every other phenomenon 1/2 right.
    XCOPA: et 1/1 right, every other language 1/3 right. The table favours good0 and bad1,
    and for XCOPA the (lower-cased) right choice of item 0 and the wrong ones of items 1, 2.
    """
    for task in BLIMP:
        rows = _blimp_rows(1, 0) if task == "blimp_adjunct_island" else _blimp_rows(1, 1)
        _write(tmp_path / "blimp" / f"{task.removeprefix('blimp_')}.parquet", rows)
    for task in XCOPA:
        lang = task.removeprefix("xcopa_")
        labels, questions = ([0], ["cause"]) if lang == "et" else ([0, 0, 1], ["cause", "effect", "effect"])
        _write(tmp_path / "xcopa" / lang / "test.parquet", _xcopa_rows(lang, labels, questions))
    docs = ["= Title = \n a @-@ b , c \n", "= Other = \n d e f \n"]
    _write(tmp_path / "wikitext-2" / "test.parquet", {"text": docs})
    table = {"good0": -1.0, "bad0": -5.0, "good1": -5.0, "bad1": -1.0}
    for lang in (t.removeprefix("xcopa_") for t in XCOPA):
        # item 0 (label 0) right; items 1 (label 0) and 2 (label 1) wrong
        table |= {f"first {lang} 0": -1.0, f"second {lang} 1": -1.0, f"first {lang} 2": -1.0}
    return tmp_path, table


def test_blimp_scoring_and_unweighted_group(handmade):
    data, table = handmade
    lm = LookupLM(table)
    r = evaluate_lm(lambda: lm, "blimp", data_dir=data)
    assert r["blimp_adjunct_island"]["acc"] == 1.0
    assert r["blimp_causative"]["acc"] == 0.5
    # Unweighted over phenomena (lm-eval's blimp); weighted by size would be 67/133.
    assert r["blimp"]["acc"] == pytest.approx((1.0 + 66 * 0.5) / 67)
    # Empty context, each sentence is a " "-prefixed continuation, as in the built-in task.
    assert ("", " good0") in lm.seen and ("", " bad0") in lm.seen


def test_xcopa_prompts_and_weighted_group(handmade):
    data, table = handmade
    lm = LookupLM(table)
    r = evaluate_lm(lambda: lm, "xcopa", data_dir=data)
    assert r["xcopa_et"]["acc"] == 1.0
    assert r["xcopa_zh"]["acc"] == pytest.approx(1 / 3)
    # Weighted by size like lm-eval's xcopa: 11 right of 31 items (unweighted would be 0.394).
    assert r["xcopa"]["acc"] == pytest.approx(11 / 31)
    # Premise without its period + language connective; choices start lower-case.
    assert ("Premise et 0 sest", " first et 0") in lm.seen
    assert ("Premise et 0 sest", " second et 0") in lm.seen
    assert ("Premise tr 1 bu yüzden", " first tr 1") in lm.seen
    assert ("Premise zh 0 因为", " first zh 0") in lm.seen


def test_wikitext_metrics_from_rolling_loglikelihood(handmade):
    data, table = handmade
    lm = LookupLM(table, rolling=-2.0)
    r = evaluate_lm(lambda: lm, "wikitext", data_dir=data)["wikitext"]
    docs = pq.read_table(data / "wikitext-2" / "test.parquet").column("text").to_pylist()
    # Counts come from the raw documents (lm-eval's formula), log-likelihood -2 per document.
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert r["word_perplexity"] == pytest.approx(math.exp(4.0 / words))
    assert r["byte_perplexity"] == pytest.approx(math.exp(4.0 / n_bytes))
    assert r["bits_per_byte"] == pytest.approx(4.0 / n_bytes / math.log(2))
    # lm-eval's detokeniser ran on the text the model saw.
    assert ("= Title =\na-b, c\n",) in lm.seen


def test_limit_keeps_first_documents_and_caller_rng(handmade):
    data, table = handmade
    lm = LookupLM(table)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    r = evaluate_lm(lambda: lm, "xcopa_zh", limit=1, data_dir=data, seed=0)
    assert r["xcopa_zh"]["acc"] == 1.0  # item 0 only, which the table gets right
    assert {ctx for ctx, _ in lm.seen} == {"Premise zh 0 因为"}
    assert torch.equal(torch.rand(3), expected), "lm-eval's reseeding must not leak to the caller"


# ---------------------------------------------------------------- real data, tiny model

def test_local_tasks_on_tiny_model():
    model, tok = tiny_model("llama"), byte_tokenizer()
    model.train()
    r = evaluate(model, tok, "blimp,xcopa", limit=2, batch_size=16)
    assert set(r) == {"blimp", "xcopa", *BLIMP, *XCOPA}
    for task, metrics in r.items():
        assert 0.0 <= metrics["acc"] <= 1.0 and metrics["acc_stderr"] >= 0.0, task
    assert model.training, "evaluate must restore the caller's train/eval mode"
    w = evaluate(model, tok, ["wikitext"], limit=1)["wikitext"]
    assert set(w) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(math.isfinite(v) for v in w.values())
    assert w["byte_perplexity"] > 1.0 and w["word_perplexity"] > w["byte_perplexity"]
    assert w["bits_per_byte"] == pytest.approx(math.log2(w["byte_perplexity"]))


def test_rolling_batch_size_fits_budget():
    from iterabre.evaluation.harness import rolling_batch_size

    # SmolLM2: 8192 x 49152 fp32 logits, two copies = 3.2 GB per window -> one window at 4 GiB.
    assert rolling_batch_size(32, 8192, 49152) == 1
    assert rolling_batch_size(32, 128, 260, budget=2 * 128 * 260 * 4 * 5) == 5
    assert rolling_batch_size(3, 128, 260) == 3, "never above the requested batch"
    assert rolling_batch_size(8, 10**6, 10**6, budget=1) == 1, "at least one window"


def test_wikitext_batches_are_capped_and_scores_unchanged(monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from iterabre.evaluation import harness

    model, tok = tiny_model("llama"), byte_tokenizer()
    sizes, real = [], HFLM._loglikelihood_tokens

    def spy(self, requests, *args, **kwargs):
        sizes.append(len(requests))
        return real(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", spy)
    full = evaluate(model, tok, "wikitext", limit=3, batch_size=8)["wikitext"]
    assert max(sizes) > 2, "the uncapped run should batch several windows"
    vocab = model.get_output_embeddings().weight.shape[0]
    max_length = model.config.max_position_embeddings
    monkeypatch.setattr(harness, "ROLLING_LOGITS_BUDGET", 2 * 2 * max_length * vocab * 4)
    sizes.clear()
    capped = evaluate(model, tok, "wikitext", limit=3, batch_size=8)["wikitext"]
    assert sizes and max(sizes) == 2
    assert capped == pytest.approx(full, rel=1e-5)


def test_wikitext_progress_is_one_bar_over_windows(capfd):
    evaluate(tiny_model("llama"), byte_tokenizer(), "wikitext", limit=2, batch_size=1)
    err = capfd.readouterr().err.replace("\r", "\n")
    assert "Scoring rolling windows" in err
    assert "Running loglikelihood requests" not in err, "lm-eval's per-batch bars must be off"


def test_run_evaluate_writes_json(tmp_path):
    from iterabre.models import save_model

    save_model(tiny_model("llama"), byte_tokenizer(), tmp_path / "tiny")
    out = tmp_path / "eval" / "result.json"
    record = run_evaluate(str(tmp_path / "tiny"), "xcopa_et,blimp_causative", limit=2, output=out)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert set(on_disk["results"]) == {"xcopa_et", "blimp_causative"}
    assert on_disk["tasks"] == ["xcopa_et", "blimp_causative"] and on_disk["num_layers"] == 6
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temp file left
    run_evaluate(str(tmp_path / "tiny"), "xcopa_et", limit=2, output=tmp_path / "folder")
    assert set(json.loads((tmp_path / "folder" / "results.json").read_text())["results"]) == {"xcopa_et"}


def test_parallelized_evaluation_matches_the_in_memory_one(tmp_path):
    # lm-eval loads the folder itself with device_map="auto" (every visible GPU; CPU memory here):
    # the same metrics as the model evaluated in memory, through the same harness.
    from iterabre.evaluation.harness import evaluate_parallel
    from iterabre.models import save_model

    model = tiny_model("llama")
    save_model(model, byte_tokenizer(), tmp_path / "tiny")
    want = evaluate(model, byte_tokenizer(), "xcopa_et,wikitext", limit=2)
    got = evaluate_parallel(tmp_path / "tiny", "xcopa_et,wikitext", limit=2)
    assert set(got) == set(want)
    for task in want:
        for metric, value in want[task].items():
            assert got[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    record = run_evaluate(str(tmp_path / "tiny"), "xcopa_et", limit=2, parallelize=True)
    assert record["device"] == "parallel" and record["num_layers"] == 6
    assert record["results"]["xcopa_et"] == got["xcopa_et"]


# ---------------------------------------------------------------- errors

def test_missing_data_file_says_dvc_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("ITERABRE_DATA_DIR", str(tmp_path))
    with pytest.raises(IterabreError, match="dvc pull") as e:
        evaluate_lm(lambda: pytest.fail("no model may be built"), "xcopa")
    assert "xcopa" in str(e.value) and "test.parquet" in str(e.value)


HUB_TASK = """task: hub_only
dataset_path: iterabre-tests/no-such-dataset
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_target: 0
doc_to_choice: ["yes", "no"]
metric_list:
  - metric: acc
"""


@pytest.fixture
def small_registry(tmp_path, monkeypatch):
    """Stand-in for lm-eval's ~15k built-in tasks (indexing those costs 8-60 s): one hub task."""
    from iterabre.evaluation import harness

    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "hub_only.yaml").write_text(HUB_TASK)
    monkeypatch.setattr(harness, "builtin_tasks_dir", lambda: tmp_path / "registry")


def test_unknown_task_lists_local_tasks(small_registry):
    with pytest.raises(IterabreError, match="wikitxt") as e:
        evaluate_lm(lambda: pytest.fail("no model may be built"), "wikitext,wikitxt")
    assert "blimp" in str(e.value) and "xcopa" in str(e.value)


def test_hub_task_offline_is_a_clear_error(small_registry, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(IterabreError, match="hub_only need the Hugging Face hub"):
        evaluate_lm(lambda: pytest.fail("no model may be built"), "xcopa_et,hub_only", limit=1)


@pytest.mark.parametrize("bad", [0, -1, "5", True])
def test_bad_limit(bad):
    with pytest.raises(IterabreError, match="limit"):
        check_limit(bad)


def test_limit_and_task_parsing():
    assert check_limit(0.05) == 0.05 and check_limit(3.0) == 3 and check_limit(None) is None
    assert parse_tasks(" wikitext, blimp,,blimp ") == ["wikitext", "blimp"]
    assert parse_tasks(["xcopa_et"]) == ["xcopa_et"]
    with pytest.raises(IterabreError, match="no evaluation task"):
        parse_tasks(" , ")
    assert len(BLIMP) == 67 and len(XCOPA) == 11 and len(local_tasks()) == 3 + 67 + 11


# ---------------------------------------------------------------- real model

@pytest.mark.slow
def test_smollm2_blimp_and_wikitext(smollm2_dir):
    from iterabre.models import load_model

    model, tok = load_model(str(smollm2_dir))
    r = evaluate(model, tok, "blimp", limit=2, batch_size=32)
    assert r["blimp"]["acc"] > 0.6  # chance is 0.5; SmolLM2-135M scores ~0.8 on full BLiMP
    w = evaluate(model, tok, "wikitext", limit=1)["wikitext"]
    assert math.isfinite(w["word_perplexity"]) and 5 < w["word_perplexity"] < 200
