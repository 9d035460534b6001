"""The `iterabre` Prefect flow end to end on a tiny model: outputs, MLflow lineage, registry, caching."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows import tracking
from flows.compress import compress, run_from_cli
from iterabre import planning, steps
from iterabre.config import CompressConfig, RecoveryConfig, normalise
from iterabre.errors import IterabreError


def tiny_config(model_dir, output, **kw) -> CompressConfig:
    """6 -> 4 blocks in two steps (IteRABRe: output scorer, iterative, KD), a few hundred tokens each; no evaluation unless
    asked."""
    base = dict(model=str(model_dir), target_layers=4, calibration_tokens=128, recovery_tokens=256, seq_len=32,
                eval_tasks="", device="cpu", output=str(output), scorer="output", schedule="iterative",
                recovery=RecoveryConfig(method="kd", batch_size=4, lr=1e-3))
    return CompressConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def job(tiny_model_dir, tmp_path_factory):
    """One finished job (with a small wikitext evaluation and permissive gates) and its report."""
    cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("job") / "out", eval_tasks="wikitext",
                      eval_limit=2)
    report = run_from_cli(cfg, max_ppl_ratio=1e9, min_blimp_retained=0.0)
    return cfg, report


def _client() -> MlflowClient:
    return tracking.connect()


def test_output_layout_and_report(job):
    cfg, report = job
    out = Path(cfg.output)
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "tokenizer.json").exists()
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["step-01", "step-02"]
    assert not list(out.rglob("*.tmp-*"))  # every write went through a temp path
    assert not list((out / "work").glob("*-pruned"))  # pruned intermediates are dropped after recovery
    on_disk = json.loads((out / "report.json").read_text())
    for key in ("base_model", "base_num_layers", "final_num_layers", "removed_layers", "config",
                "data_version", "base_eval", "final_eval", "steps"):
        assert key in on_disk
    assert on_disk["base_num_layers"] == 6 and on_disk["final_num_layers"] == 4
    assert on_disk["removed_layers"] == [i for s in on_disk["steps"] for i in s["removed"]]
    assert len(set(on_disk["removed_layers"])) == 2
    assert on_disk["final_eval"]["wikitext"]["word_perplexity"] > 0
    assert (out / "report.md").exists()
    step = on_disk["steps"][0]
    assert len(step["scores"]) == 6 and step["num_layers"] == 5 and step["recovery"]["tokens"] >= 128
    compute = on_disk["compute"]  # FLOPs per phase, summed over the steps
    assert all(s["score_flops"] > 0 and s["recovery"]["flops"] > 0 for s in on_disk["steps"])
    assert compute["scoring_flops"] == sum(s["score_flops"] for s in on_disk["steps"])
    assert compute["recovery_flops"] == sum(s["recovery"]["flops"] for s in on_disk["steps"])
    assert compute["generation_flops"] == 0  # wikitext calibration: nothing generated
    assert compute["total_flops"] == compute["scoring_flops"] + compute["recovery_flops"]


def test_final_model_keeps_original_block_numbers(job):
    from transformers import AutoConfig

    cfg, report = job
    config = AutoConfig.from_pretrained(Path(cfg.output) / "final")
    assert config.num_hidden_layers == 4
    assert config.iterabre_original_layers == [i for i in range(6) if i not in report["removed_layers"]]


def test_mlflow_parent_and_child_runs(job):
    cfg, report = job
    client = _client()
    parent = client.get_run(report["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags[tracking.TAG_MODEL] == cfg.model and tags[tracking.TAG_REVISION] == "none"
    assert tags[tracking.TAG_FINGERPRINT] == normalise(cfg).fingerprint()  # eval_limit 2 -> 2.0
    assert tags["git.commit"] and tags["data.md5"] and tags["data.dirty"] in ("true", "false", "unknown")
    assert tags["prefect.flow_run_id"] != "none"
    assert parent.data.params["recovery.lr"] == "0.001" and parent.data.params["target_layers"] == "4"
    assert "final/wikitext/word_perplexity" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["tags.`iterabre.step` ASC"])
    assert [c.data.tags[tracking.TAG_STEP] for c in children] == ["1", "2"]
    first = children[0]
    assert first.data.params["removed"] == str(report["steps"][0]["removed"][0])
    assert {f"score/block_{i}" for i in range(6)} <= set(first.data.metrics)
    curve = client.get_metric_history(first.info.run_id, "recovery/loss")
    assert len(curve) == len(report["steps"][0]["recovery"]["losses"]) >= 1
    assert "checkpoint/model.safetensors" in [a.path for a in client.list_artifacts(first.info.run_id, "checkpoint")]


def test_registered_version_is_an_mlflow_model_with_lineage(job):
    import mlflow

    cfg, report = job
    reg = report["registry"]
    assert reg["name"] == tracking.registered_name(cfg.model) and reg["alias"] == "champion"
    assert report["promotion"]["alias"] == "champion" and report["promotion"]["gates"] == "champion"
    client = _client()
    version = client.get_model_version_by_alias(reg["name"], "champion")
    assert version.run_id == report["mlflow_run_id"] and int(version.version) == reg["version"]
    tags = version.tags
    assert tags["iterabre.base_model"] == cfg.model and tags["iterabre.num_layers"] == "4"
    assert tags["iterabre.removed_blocks"] == ",".join(map(str, report["removed_layers"]))
    assert int(tags["iterabre.num_params"]) == report["num_parameters"]["final"] < report["num_parameters"]["base"]
    assert float(tags["final/wikitext/word_perplexity"]) == report["final_eval"]["wikitext"]["word_perplexity"]
    run_tags = client.get_run(report["mlflow_run_id"]).data.tags
    assert tags["prefect.flow_run_id"] == run_tags["prefect.flow_run_id"] != "none"
    assert tags["git.commit"] == run_tags["git.commit"] and tags["data.md5"] == report["data_version"]["md5"]
    assert tags["iterabre.promotion"] == "champion" and tags["iterabre.promotion_reason"] == "; ".join(reg["reasons"])
    generate = mlflow.pyfunc.load_model(f"models:/{reg['name']}@champion")
    assert generate.predict(["Hello"], params={"max_new_tokens": 3})[0].startswith("Hello")


def test_model_card_in_final(job):
    cfg, report = job
    card = (Path(cfg.output) / "final" / "README.md").read_text()
    assert card.startswith("---\nlicense: unknown\n")  # a local folder without a licence of its own
    assert f"removal order): {', '.join(map(str, report['removed_layers']))}" in card
    assert "| wikitext | word_perplexity |" in card and f"models:/{report['registry']['name']}@champion" in card


def test_failing_gate_gives_challenger():
    assert planning.promotion({"wikitext": {"word_perplexity": 10.0}}, {"wikitext": {"word_perplexity": 30.0}},
                           0.9, 1.5)[0] == "challenger"


def test_identical_rerun_is_all_cache_hits(job, monkeypatch, caplog):
    cfg, report = job
    out = Path(cfg.output)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "steps").rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise AssertionError("a cached step was recomputed")
    for name in ("prepare_base", "prepare_data", "score", "prune", "recover", "evaluate", "publish"):
        monkeypatch.setattr(steps, name, boom)
    again = run_from_cli(cfg, max_ppl_ratio=1e9, min_blimp_retained=0.0)
    assert again["removed_layers"] == report["removed_layers"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    cached = [r for r in caplog.records if r.name == "prefect.task_runs" and "state Cached" in r.getMessage()]
    assert len(cached) == 11  # base, data, eval, 2 x (score, prune, recover), publish, eval


def test_one_shot_removes_everything_in_one_step(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "out", schedule="one-shot", target_layers=3)
    report = run_from_cli(cfg)
    assert len(report["steps"]) == 1 and len(report["steps"][0]["removed"]) == 3
    assert report["final_num_layers"] == 3 and report["steps"][0]["recovery"]["tokens"] >= 256
    assert report["registry"]["alias"] == "challenger"  # nothing evaluated: never champion


def test_one_shot_angular_kd_runs_through_the_flow(tiny_model_dir, tmp_path):
    """Gromov et al.'s recipe: one angular scoring pass, a contiguous run of blocks removed at once, then one
    KD phase with the whole budget."""
    cfg = CompressConfig(model=str(tiny_model_dir), target_layers=3, calibration_tokens=128, recovery_tokens=256,
                         seq_len=32, eval_tasks="", device="cpu", output=str(tmp_path / "out"), scorer="angular",
                         schedule="one-shot", recovery=RecoveryConfig(method="kd", batch_size=4))
    report = run_from_cli(cfg, max_ppl_ratio=1e9, min_blimp_retained=0.0)
    [step] = report["steps"]
    run = sorted(step["removed"])
    assert run == list(range(run[0], run[0] + 3)) and report["final_num_layers"] == 3  # contiguous
    assert step["recovery"]["method"] == "kd" and step["recovery"]["tokens"] == 256
    assert step["recovery"]["loss_after"] < step["recovery"]["loss_before"]


def test_select_auto_removes_the_closer_set_and_repairs_by_its_gaps(tiny_model_dir, tmp_path, capsys):
    """scorer=select: the step records both proposed sets and their distances and removes the smaller one;
    recovery auto then runs the repair its gaps call for, and the report counts all scoring FLOPs."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "out", schedule="one-shot", target_layers=3, scorer="select",
                      recovery=RecoveryConfig(method="auto", batch_size=4, lr=1e-3, reconstruct_tokens=64,
                                              block_recon_tokens=64, block_recon_steps=2))
    report = run_from_cli(cfg)
    [step] = report["steps"]
    assert set(step["candidates"]) == {"output", "angular"} and step["chosen"] in step["candidates"]
    assert step["distances"][step["chosen"]] == min(step["distances"].values())
    assert sorted(step["removed"]) == sorted(step["candidates"][step["chosen"]])
    run = sorted(step["removed"])
    one_gap = run == list(range(run[0], run[0] + 3))
    assert step["recovery"]["extra"]["auto"] == ("reconstruct+kd" if one_gap else "block-recon+kd")
    text = (tmp_path / "out" / "report.md").read_text()  # the user reads the choice, not only report.json
    printed = capsys.readouterr().out
    assert f"step 1: select removed {step['chosen']}'s set (output distance " in printed
    assert f"; auto repaired with {step['recovery']['extra']['auto']} (" in printed
    assert f"{step['chosen']} {', '.join(map(str, step['candidates'][step['chosen']]))} (" in text
    assert f"`auto` repaired with {step['recovery']['extra']['auto']}" in text
    work = tmp_path / "out" / "work"
    alone = steps.score(work / "base", work / "data.pt", "output", 3, "cpu")
    assert step["score_flops"] > alone["flops"]  # output's pass, angular's and the sets' walk
    client = _client()
    parent = client.get_run(report["mlflow_run_id"])
    [child] = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert child.data.params["select_chosen"] == step["chosen"]
    assert child.data.params["recovery_auto"] == step["recovery"]["extra"]["auto"]
    assert child.data.metrics["select/distance_angular"] == pytest.approx(step["distances"]["angular"])


def test_bad_config_fails_before_any_compute(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(steps, "prepare_base", lambda *a, **k: pytest.fail("compute started"))
    with pytest.raises(IterabreError, match="scorer"):
        run_from_cli(tiny_config(tiny_model_dir, tmp_path / "out", scorer="nope"))
    assert not (tmp_path / "out").exists()


def test_unreachable_tracking_store_fails_early(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setattr(steps, "prepare_base", lambda *a, **k: pytest.fail("compute started"))
    with pytest.raises(IterabreError, match="unreachable"):
        run_from_cli(tiny_config(tiny_model_dir, tmp_path / "out"))


def test_registered_name_is_sanitised():
    assert tracking.registered_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "iterabre-smollm2-135m-instruct"
    assert tracking.registered_name("/models/x/SmolLM2-135M.Q4_1.gguf") == "iterabre-smollm2-135m-q4-1"
    assert tracking.registered_name("smollm2-135m") == "iterabre-smollm2-135m"
