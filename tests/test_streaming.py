"""Streamed scoring (one block's weights on the device at a time) == the naive whole-model reference."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from iterabre import streaming
from iterabre.errors import IterabreError
from iterabre.scorers import SCORERS, naive_scores, score_blocks, streamed_scores
from iterabre.surgery import decoder_blocks, remove_blocks
from iterabre.tiny import FAMILY_CONFIGS, tiny_model
from conftest import assert_scores_close, padded_calib

# MoE families are not in iterabre.tiny: two small ones here (transformers 5 fuses their
# per-expert checkpoint tensors on load, which the streamed loader must do too).
MOE_CONFIGS = {
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      head_dim=8),
}
FAMILIES = ["llama", "qwen2", "gemma2", "gemma3", "gpt2", "mixtral", "qwen3_moe"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one torch thread avoids OpenMP spin-waits on a shared CPU (10x faster measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(family: str, num_layers: int = 6):
    """A tiny random float32 model of any family above."""
    if family not in MOE_CONFIGS:
        return tiny_model(family, num_layers)
    kwargs = {**FAMILY_CONFIGS["llama"], **MOE_CONFIGS[family], "num_hidden_layers": num_layers}
    torch.manual_seed(0)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_equals_naive_for_every_scorer(family, tmp_path, caplog):
    model = _model(family)
    model.save_pretrained(tmp_path)
    ids, mask = padded_calib()
    with caplog.at_level(logging.WARNING, logger="iterabre.scorers"):
        for name in SCORERS:
            naive = naive_scores(model, ids, mask, scorer=name, batch_size=2)
            # From the folder, every candidate of a batch in one block call (batches of 2 and 1 rows).
            assert_scores_close(streamed_scores(tmp_path, ids, mask, scorer=name, batch_size=2, device="cpu"), naive)
            if SCORERS[name].kind == "resume":  # from memory, one candidate per block call
                assert_scores_close(streamed_scores(model, ids, mask, scorer=name, batch_size=3, device="cpu",
                                             call_budget=1), naive)
    assert not caplog.records, "streamed scoring fell back to the whole model"


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_streamed_runs_of_blocks_after_removal(family, tmp_path):
    model = remove_blocks(_model(family), [1])
    model.save_pretrained(tmp_path)
    ids, mask = padded_calib()
    for name in SCORERS:
        got = streamed_scores(tmp_path, ids, mask, scorer=name, n=2, batch_size=2, device="cpu")
        assert_scores_close(got, naive_scores(model, ids, mask, scorer=name, n=2, batch_size=2))
        # 5 blocks left, runs of 2: starts at positions 0..3, keyed by original index.
        assert list(got) == [0, 2, 3, 4] and got.order == [0, 2, 3, 4, 5]


@pytest.mark.parametrize("conversions", [True, False])
def test_checkpoint_names_with_and_without_the_base_prefix(conversions, tmp_path, monkeypatch):
    # GPT-2 saves 'transformer.h.0...'; hub checkpoints of it drop the 'transformer.' prefix.
    # Without transformers' conversions (4.x has none) tensors are assigned by name.
    if not conversions:
        monkeypatch.setattr(streaming, "conversion_mapping", lambda model: None)
    model = _model("gpt2")
    model.save_pretrained(tmp_path)
    ids, mask = padded_calib()
    want = naive_scores(model, ids, mask, scorer="perplexity", batch_size=2)
    assert_scores_close(streamed_scores(tmp_path, ids, mask, scorer="perplexity", batch_size=2, device="cpu"), want)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    assert_scores_close(streamed_scores(tmp_path, ids, mask, scorer="perplexity", batch_size=2, device="cpu"), want)


def test_each_block_is_read_once_and_alone_on_the_device(tmp_path, monkeypatch):
    model = _model("qwen2")
    model.save_pretrained(tmp_path)
    ids, mask = padded_calib(n=5)
    loads, original = [], streaming.FolderSource.load

    def spy(self, j):
        # Before block j is read, no block holds weights: the previous one was freed.
        assert all(p.device.type == "meta" for b in self.blocks for p in b.parameters())
        block = original(self, j)
        loads.append(j)
        return block

    monkeypatch.setattr(streaming.FolderSource, "load", spy)
    ticks = []
    streamed_scores(tmp_path, ids, mask, scorer="output", batch_size=2, device="cpu",
                    progress=lambda done, total: ticks.append((done, total)))
    assert loads == list(range(6))  # one pass over the weights for all 3 batches
    assert ticks == [(d, 6) for d in range(1, 7)]


def test_streams_too_big_for_memory_are_walked_in_groups(tmp_path, monkeypatch):
    model = _model("llama")
    model.save_pretrained(tmp_path)
    ids, mask = padded_calib(n=5)
    want = naive_scores(model, ids, mask, scorer="output", batch_size=2)
    # Room for the streams of about one batch: 3 batches -> 3 passes over the weights.
    row = 7 * 12 * 32 * 4  # (L + 1) streams x T x d x float32
    monkeypatch.setattr(streaming, "_free_bytes", lambda device: int(2 * row / streaming.CPU_STREAM_SHARE))
    loads, original = [], streaming.FolderSource.load
    monkeypatch.setattr(streaming.FolderSource, "load", lambda self, j: loads.append(j) or original(self, j))
    assert_scores_close(streamed_scores(tmp_path, ids, mask, scorer="output", batch_size=2, device="cpu"), want)
    assert loads == list(range(6)) * 3


def test_streams_go_to_the_device_when_they_fit_else_to_cpu_memory(monkeypatch):
    config, cuda = _model("llama").config, torch.device("cuda", 0)  # only planned: no GPU needed
    row = 7 * 12 * 32 * 4  # (L + 1) streams x T x d x float32 per calibration row
    free = {"cuda": 0, "cpu": 2**40}
    monkeypatch.setattr(streaming, "_free_bytes", lambda device: free[device.type])
    one_call = streaming.call_bytes(config, 2, 12, torch.float32)
    free["cuda"] = int(5 * row / streaming.DEVICE_STREAM_SHARE)  # room for 5 rows of streams
    plan = streaming.plan_streams(config, cuda, [2, 2, 1], 12, 7, torch.float32, call_budget=3 * one_call)
    assert plan.stream_device == cuda and plan.groups == [[0, 1, 2]] and plan.per_call == 3
    free["cuda"] = int(4 * row / streaming.DEVICE_STREAM_SHARE)  # one row short: CPU memory, still one pass
    plan = streaming.plan_streams(config, cuda, [2, 2, 1], 12, 7, torch.float32, call_budget=3 * one_call)
    assert plan.stream_device.type == "cpu" and plan.groups == [[0, 1, 2]]
    free["cpu"] = int(4 * row / streaming.CPU_STREAM_SHARE)  # nor in CPU memory: two passes
    plan = streaming.plan_streams(config, cuda, [2, 2, 1], 12, 7, torch.float32, call_budget=1)
    assert plan.groups == [[0, 1], [2]] and plan.per_call == 1


def test_in_memory_model_is_left_as_it_was():
    model = _model("llama").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = padded_calib()
    streamed_scores(model, ids, mask, scorer="perplexity", batch_size=2, device="cpu")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model(ids, labels=ids).loss.backward()  # its weights are not inference tensors: it can still train


def test_streamed_falls_back_to_the_whole_model_when_replay_cannot_work(caplog):
    model = _model("llama", 4)
    # An extra transformation after the final norm that block replay does not know about.
    model.model.register_forward_hook(
        lambda mod, args, out: out.__class__(last_hidden_state=out.last_hidden_state.flip(-1)))
    ids, mask = padded_calib()
    with caplog.at_level(logging.WARNING, logger="iterabre.scorers"):
        got = streamed_scores(model, ids, mask, scorer="output", device="cpu")
    assert "scoring the whole model" in caplog.text and "final norm" in caplog.text
    assert_scores_close(got, naive_scores(model, ids, mask, scorer="output"), atol=1e-6)


def _one_line_error(folder, match: str) -> None:
    ids, mask = padded_calib()
    with pytest.raises(IterabreError, match=match) as err:
        streamed_scores(folder, ids, mask, device="cpu")
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    model = _model("llama")
    fewer, more, renamed = tmp_path / "fewer", tmp_path / "more", tmp_path / "renamed"
    for folder in (fewer, more, renamed):
        model.save_pretrained(folder)
    _edit_config(fewer, num_hidden_layers=5)  # the weights have a block 5 the config does not declare
    _one_line_error(fewer, r"tensors for block\(s\) 5 but its config.json declares 5 blocks")
    _edit_config(more, num_hidden_layers=8)
    _one_line_error(more, r"no tensors for block\(s\) 6-7 of the 8")
    tensors = load_file(renamed / "model.safetensors")
    tensors["model.layers.2.mlp.gate.weight"] = tensors.pop("model.layers.2.mlp.gate_proj.weight")
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(renamed, "model.layers.2.mlp.gate.weight")


def test_sharded_index_that_misses_a_block_or_points_elsewhere_is_refused(tmp_path):
    for folder in (tmp_path / "missing", tmp_path / "elsewhere"):
        _model("llama").save_pretrained(folder, max_shard_size="40KB")
    index_path = tmp_path / "missing" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".layers.3." not in k}
    index_path.write_text(json.dumps(index))
    _one_line_error(tmp_path / "missing", r"no tensors for block\(s\) 3 of the 6")
    index_path = tmp_path / "elsewhere" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.2.input_layernorm.weight"
    index["weight_map"][name] = next(f for f in sorted(set(index["weight_map"].values()))
                                     if f != index["weight_map"][name])
    index_path.write_text(json.dumps(index))
    _one_line_error(tmp_path / "elsewhere", "does not contain tensor model.layers.2.input_layernorm.weight")


def test_memory_formula_reads_shapes_only(tmp_path):
    model = _model("gemma2")
    model.save_pretrained(tmp_path)
    shell = streaming.build_shell(tmp_path, torch.float32)  # every parameter on meta
    assert all(p.device.type == "meta" for p in shell.parameters())
    formula = streaming.streamed_memory(shell, tokens=256, seq_len=128, batch_size=2, scorer="output")
    assert formula == streaming.streamed_memory(model, tokens=256, seq_len=128, batch_size=2, scorer="output")
    one_block = sum(p.numel() for p in decoder_blocks(model)[0].parameters()) * 4
    assert formula["one_block"] == one_block and formula["blocks"] == 2 * one_block
    assert formula["streams"] == 256 * 32 * 7 * 4  # tokens x d x (L + 1) x float32
    embedding = model.get_input_embeddings().weight.numel() * 4  # tied head: counted once
    assert embedding < formula["embedding_head"] < embedding + 64 * 32 * 4
    angular = streaming.streamed_memory(shell, tokens=256, seq_len=128, batch_size=2, scorer="angular", n=2)
    assert angular["streams"] == 256 * 32 * 3 * 4


def test_score_step_streams_from_the_folder(tiny_model_dir, tmp_path, monkeypatch):
    from iterabre import models, steps

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    data = tmp_path / "data.pt"
    torch.save({"calib": ids}, data)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    want = score_blocks(model, ids, torch.ones_like(ids), scorer="angular", n=2)

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the score step loaded the whole model")

    monkeypatch.setattr(models, "load_model", no_whole_model)
    got = steps.score(tiny_model_dir, data, "angular", 2, "cpu")
    assert got["order"] == want.order
    assert_scores_close({int(k): v for k, v in got["scores"].items()}, dict(want))
