"""The memory planner: counts from config.json on the meta device, the activation table against
autograd's own count, the 1B refusal, the JSON shape, the CLI's exit codes and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from iterabre import planner
from iterabre.cli import app
from iterabre.errors import IterabreError
from iterabre.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
LLAMA_1B = REPO / "configs" / "models" / "llama-1b-random"
GiB = planner.GiB


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A folder holding only the config.json of a tiny 6-block Llama (no weights)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_config("llama").save_pretrained(folder)
    return folder


def test_counts_match_the_real_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    m = planner.counts_for(str(tiny_dir))
    real = AutoModelForCausalLM.from_config(tiny_config("llama"))
    blocks = real.model.layers
    assert m.num_layers == 6 and m.hidden == 32 and m.intermediate == 64 and m.kv_dim == 16 and m.heads == 4
    assert m.total_params == sum(p.numel() for p in real.parameters())
    assert m.block_params == sum(p.numel() for p in blocks[0].parameters())
    assert m.params_with(6) == m.total_params and m.linears == 7
    assert m.lora_width == sum(l.in_features + l.out_features for l in blocks[0].modules()
                               if isinstance(l, torch.nn.Linear))


def test_published_configs_give_the_published_sizes():
    """configs/models/ hold the published architectures: their parameter counts are the published ones."""
    sizes = {"llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512, "llama-3.1-70b": 70_553_706_496}
    for name, params in sizes.items():
        assert planner.counts_for(str(REPO / "configs" / "models" / name)).total_params == params
    assert 1.0e9 < planner.counts_for(str(LLAMA_1B)).total_params < 1.2e9


def _saved_bytes_per_token_block(mode: str, dtype: torch.dtype) -> float:
    """Bytes autograd saves per token per block of the tiny Llama, counted with saved-tensor hooks
    (the difference between a 4-block and a 2-block model, so embeddings and head cancel)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", layers), dtype=dtype).train()
        if mode == "frozen":  # gradients pass through frozen blocks down to the embeddings
            model.requires_grad_(False)
            model.get_input_embeddings().weight.requires_grad_(True)
        if mode == "lora":
            names = [n for n, x in model.named_modules() if isinstance(x, torch.nn.Linear) and ".layers." in n]
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=names))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(0, 256, (2, 24)), use_cache=False)
        return sum(seen.values())

    return (saved(4) - saved(2)) / 2 / (2 * 24)


@pytest.mark.parametrize("mode,dtype", [("trained", torch.float32), ("frozen", torch.float32),
                                        ("lora", torch.float32), ("trained", torch.bfloat16),
                                        ("lora", torch.bfloat16)])
def test_activation_table_is_autograds_count(tiny_dir, mode, dtype):
    m = planner.counts_for(str(tiny_dir))
    name = "float32" if dtype == torch.float32 else "bfloat16"
    assert _saved_bytes_per_token_block(mode, dtype) == planner.activation_bytes_per_token(m, name, mode, 8)


def test_1b_full_kd_refused_under_16gib_lora_accepted():
    m = planner.counts_for(str(LLAMA_1B))
    full = planner.Job(target_layers=18, device="cpu")
    refused = planner.plan(m, full, 16 * GiB)
    assert not refused.fits and refused.phase("recovery").fits is False
    assert refused.phase("recovery").total > 20 * GiB  # teacher, student, grads, AdamW and restore copy, fp32
    assert any(s.startswith("--trainable lora") for s in refused.suggestions)
    line = planner.refusal(refused)
    assert line.startswith("the recovery phase needs") and "16.0 GiB" in line and "--trainable lora" in line
    lora = planner.plan(m, planner.Job(target_layers=18, trainable="lora", device="cpu"), 16 * GiB)
    assert lora.fits and lora.phase("recovery").total < 16 * GiB
    bf16 = planner.plan(m, planner.Job(target_layers=18, dtype="bfloat16", device="cpu"), 16 * GiB)
    assert not bf16.fits  # float32 masters, gradients and AdamW state of every weight: still > 16 GiB


def test_checkpointing_switches_on_when_only_it_fits():
    m = planner.counts_for("models/smollm2-135m") or planner.counts_from_config(
        planner.read_config(LLAMA_1B / "config.json"))
    job = planner.Job(target_layers=m.num_layers - 4, batch_size=16, seq_len=1024, device="cpu")
    without = planner.recovery_phase(m, job, False).total
    with_ckpt = planner.recovery_phase(m, job, True).total
    assert with_ckpt < without
    limit = (with_ckpt + without) // 2
    auto = planner.estimate(m, job, limit, None)
    assert auto.grad_checkpointing and auto.auto_checkpointing and auto.fits
    assert "switched on by the planner" in auto.phase("recovery").note
    roomy = planner.estimate(m, job, 10 * without, None)
    assert not roomy.grad_checkpointing and not roomy.auto_checkpointing


def test_fsdp_shards_and_ddp_replicates():
    m = planner.counts_from_config(planner.read_config(REPO / "configs/models/llama-3.1-8b/config.json"))
    one = planner.recovery_phase(m, planner.Job(target_layers=24, device="cuda"), False).total
    ddp = planner.recovery_phase(m, planner.Job(target_layers=24, device="cuda", num_processes=8), False).total
    fsdp = planner.recovery_phase(m, planner.Job(target_layers=24, device="cuda", num_processes=8, fsdp=True),
                                  False).total
    assert ddp > one > 8 * fsdp / 2  # DDP adds gradient buckets; FSDP's shards are ~1/8 plus gathered blocks
    assert fsdp < 80 * GiB < one


def test_float32_weights_on_cuda_compute_in_bf16_under_autocast():
    """Activations and KD logits follow the compute dtype: a float32 model under CUDA autocast saves bf16 ones
    (an H200 measured 6.8 GiB where float32 activations would have planned 9.6, docs/BENCHMARKS.md §2)."""
    m = planner.counts_from_config(planner.read_config(REPO / "configs/models/llama-1b-random/config.json"))

    def parts(**kw):
        job = planner.Job(target_layers=20, device="cuda", method="kd", trainable="adjacent", seq_len=1024, **kw)
        return planner.recovery_parts(m, job, False)[0]

    auto, autocast, fp32 = parts(dtype="auto"), parts(dtype="float32"), parts(dtype="float32", bf16=False)
    assert autocast["activations"] == auto["activations"] and autocast["KD logits"] == auto["KD logits"]
    assert fp32["activations"] > 1.5 * autocast["activations"] and "autocast weight copies" not in fp32
    assert autocast["teacher"] == 2 * auto["teacher"]  # the weights themselves stay float32


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("scorer", ["output", "perplexity", "angular"])
def test_score_phase_is_the_streamed_scorers_formula(family, scorer):
    # The planner has counts, the bench and the scorer a model shell: both reach streaming.memory_parts.
    from iterabre.streaming import shell_from_config, streamed_memory

    config = tiny_config(family)
    m = planner.counts_from_config(config)
    job = planner.Job(target_layers=2, scorer=scorer, blocks_per_step=2, calibration_tokens=512, seq_len=64)
    phase = planner.score_phase(m, job)
    want = streamed_memory(shell_from_config(config), tokens=512, seq_len=64, batch_size=planner.SCORE_BATCH,
                           scorer=scorer, n=2 if scorer == "angular" else 1)
    assert phase.per_process - phase.parts["runtime"] == want["total"]


def test_parallelized_evaluation_splits_the_weights_over_the_gpus():
    m = planner.counts_from_config(planner.read_config(REPO / "configs/models/llama-3.1-70b/config.json"))
    one = planner.evaluate_phase(m, planner.Job(target_layers=60, device="cuda", num_processes=8))
    split = planner.evaluate_phase(m, planner.Job(target_layers=60, device="cuda", num_processes=8,
                                                  eval_parallelize=True))
    assert split.parts["model"] == one.parts["model"] // 8 and "split over 8 GPUs" in split.note
    assert one.per_process > 80 * GiB > split.per_process  # 70B in bf16 fits eight 80 GB GPUs only split


def test_cpu_processes_share_the_ram(tiny_dir):
    m = planner.counts_for(str(tiny_dir))
    p = planner.estimate(m, planner.Job(target_layers=4, device="cpu", num_processes=2), 64 * GiB, None)
    rec = p.phase("recovery")
    assert rec.processes == 2 and rec.total == 2 * rec.per_process


def test_plan_json_shape(tiny_dir):
    m = planner.counts_for(str(tiny_dir))
    d = json.loads(json.dumps(planner.plan(m, planner.Job(target_layers=4), 8 * GiB, 8 * GiB).to_dict()))
    assert [p["phase"] for p in d["phases"]] == [p for p in planner.PHASES if p != "generate"]  # wikitext
    assert d["fits"] is True and d["working_dtype"] == "float32" and d["device_memory"] == 8 * GiB
    for p in d["phases"]:
        assert isinstance(p["bytes_per_process"], int) and p["bytes_per_process"] == sum(p["parts"].values())
        assert p["fits"] is True and p["limit"] == 8 * GiB
    assert set(d["grad_checkpointing"]) == {"on", "auto"} and d["suggestions"] == []


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * 2**30), ("16GB", 16 * 10**9), ("512 MiB", 512 * 2**20),
                                           ("1.5TiB", int(1.5 * 2**40)), ("4096", 4096)])
def test_parse_bytes(text, expected):
    assert planner.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["80XB", "lots", "", "-1GiB", "0GB", "GiB"])
def test_parse_bytes_refuses(text):
    with pytest.raises(IterabreError, match="does not parse"):
        planner.parse_bytes(text)


# ---------------------------------------------------------------- CLI

def _plan(*args: str):
    return CliRunner().invoke(app, ["plan", *args])


def test_cli_fits_exit_0(tiny_dir):
    r = _plan("--model", str(tiny_dir), "--target-layers", "4", "--device", "cpu", "--device-memory", "8GiB")
    assert r.exit_code == 0, r.output
    assert "recovery (device)" in r.output and "yes" in r.output


def test_cli_70b_fits_eight_gpus_only_with_parallel_evaluation():
    args = ("--model", str(REPO / "configs/models/llama-3.1-70b"), "--target-ratio", "0.75", "--device", "cuda",
            "--device-memory", "80GB", "--num-processes", "8", "--fsdp", "--trainable", "lora")
    without = _plan(*args)
    assert without.exit_code == 1 and "--eval-parallelize" in without.output, without.output
    assert _plan(*args, "--eval-parallelize").exit_code == 0


def test_generate_batch_is_selfgens_default():
    import inspect

    from iterabre.selfgen import self_generated_calibration

    assert planner.GENERATE_BATCH == inspect.signature(self_generated_calibration).parameters["batch_size"].default


def test_self_generated_calibration_plans_the_whole_model_on_one_device():
    m = planner.counts_from_config(planner.read_config(REPO / "configs/models/llama-3.1-70b/config.json"))
    job = planner.Job(target_layers=60, device="cuda", calibration="self-generated")
    gen = planner.generate_phase(m, job)
    assert gen.parts["model"] == 2 * m.total_params  # bf16, not split: 141 GB
    assert gen.parts["KV cache"] == 2 * m.num_layers * planner.GENERATE_BATCH * job.seq_len * m.kv_dim * 2
    args = ("--model", str(REPO / "configs/models/llama-3.1-70b"), "--target-ratio", "0.75", "--device", "cuda",
            "--device-memory", "80GB", "--num-processes", "8", "--fsdp", "--trainable", "lora", "--eval-parallelize")
    assert _plan(*args).exit_code == 0
    r = _plan(*args, "--calibration", "self-generated")
    lines = [line for line in r.output.splitlines() if line.startswith("does not fit")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert "generate phase" in lines[0] and "--calibration wikitext" in lines[0]


def test_cli_json_is_the_plan(tiny_dir):
    r = _plan("--model", str(tiny_dir / "config.json"), "--target-ratio", "0.5", "--device", "cuda",
              "--device-memory", "80GiB", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["job"]["target_layers"] == 3 and d["working_dtype"] == "bfloat16" and d["fits"]
    assert d["host_memory"] is None and d["phases"][0]["fits"] is None  # planned for another machine


def test_cli_does_not_fit_exit_1_names_phase_and_fix():
    r = _plan("--model", str(LLAMA_1B), "--target-layers", "18", "--device", "cpu", "--device-memory", "16GiB")
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.startswith("does not fit")]
    assert len(lines) == 1 and "recovery phase" in lines[0] and "--trainable lora" in lines[0]
    ok = _plan("--model", str(LLAMA_1B), "--target-layers", "18", "--device", "cpu", "--device-memory", "16GiB",
               "--trainable", "lora")
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("args,message", [
    (["--device-memory", "80XB"], "does not parse"),
    (["--device", "tpu"], "unknown device"),
])
def test_cli_bad_input_one_line(tiny_dir, args, message):
    r = _plan("--model", str(tiny_dir), "--target-layers", "4", *args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_folder_without_config(tmp_path):
    r = _plan("--model", str(tmp_path), "--target-layers", "4", "--device-memory", "8GiB")
    assert r.exit_code == 2 and "has no config.json" in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_cuda_plan_without_gpu_needs_a_size(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = _plan("--model", str(tiny_dir), "--target-layers", "4", "--device", "cuda")
    assert r.exit_code == 2 and "--device-memory" in r.output


# ---------------------------------------------------------------- compress's check

def test_check_plan_refuses_what_does_not_fit(tiny_dir, monkeypatch):
    from iterabre.config import CompressConfig

    cfg = CompressConfig(model=str(tiny_dir), target_layers=4, device="cpu")
    assert planner.check_plan(cfg).fits
    monkeypatch.setattr(planner, "machine_memory", lambda device: 64 * 2**20)
    with pytest.raises(IterabreError, match="phase needs"):
        planner.check_plan(cfg)


def test_check_plan_skips_without_a_local_config():
    from iterabre.config import CompressConfig

    assert planner.check_plan(CompressConfig(model="some-org/never-fetched", target_layers=4, device="cpu")) is None


def test_least_squares_statistics_are_a_moment_of_their_own_not_added_to_kd():
    """reconstruct+kd / auto fit before any weight trains and free the float64 statistics before KD: the recovery
    peak is the larger of the fit and KD's own peak, never their sum; the fit alone (reconstruct) peaks there."""
    m = planner.counts_for(str(REPO / "configs" / "models" / "llama-3.1-8b"))
    job = lambda method: planner.Job(target_layers=24, method=method, device="cuda")  # noqa: E731
    kd, kd_moment = planner.recovery_parts(m, job("block-recon+kd"), False)
    for method in ("auto", "reconstruct+kd"):
        parts, moment = planner.recovery_parts(m, job(method), False)
        assert (parts, moment) == (kd, kd_moment)  # KD's peak is the larger one for a full-weight 8B student
    fit, moment = planner.recovery_parts(m, job("reconstruct"), False)
    assert moment == "least-squares fit" and fit["least-squares statistics (float64)"] == planner.reconstruct_stats(m)
    assert "optimizer (AdamW, 2 fp32 states)" not in fit
