"""Recovery across processes (torchrun, gloo on the CPU; DDP and FSDP2) and the working dtype.

The slow tests start real `torchrun` process groups of 2 (about 15-30 s each on 2 cores): they
check that 2 processes train the same model as 1 with the same global batch. Measured on a tiny
Llama (4 optimizer steps of 4 x 32 tokens, lr 1e-3): weights differ from the one-process run by
at most 3e-7 (DDP and FSDP2 alike) while training moves them by 2.5e-3, and the logged KD losses
(about 1e-3 nats) by at most 5e-7: the stated tolerance is 1e-5 on every weight and 1e-5 nats on
every loss. (A KL of near-equal logits is a difference of O(1) terms, so float32 noise that
changes with the batch split is ~1e-7 absolute, large relative to the loss itself.)
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from iterabre import distributed, steps
from iterabre.config import CompressConfig, RecoveryConfig, validate
from iterabre.distributed import (Single, launch_env, launch_settings, meta_copy, torchrun_command,
                                  weights_digest)
from iterabre.errors import IterabreError
from iterabre.kd import KDLoss
from iterabre.models import load_model, working_dtype
from iterabre.recovery import RecoveryJob, _accumulate, recover
from iterabre.surgery import remove_blocks
from iterabre.tiny import tiny_model

WEIGHT_TOL = 1e-5  # max |w_2proc - w_1proc|; measured 3e-7, training moves weights by ~2.5e-3
LOSS_ATOL = 1e-5  # nats; measured 5e-7
RECOVERY = dict(method="kd", tokens=512, batch_size=4, lr=1e-3)  # 4 optimizer steps of 4 windows x 32 tokens


def _cfg(**kw) -> CompressConfig:
    base = dict(model="x", target_layers=4, calibration_tokens=128, recovery_tokens=256, seq_len=32,
                eval_tasks="", device="cpu")
    return CompressConfig(**{**base, **kw})


# ---------------------------------------------------------------- launch settings, bad input

def test_launch_file_becomes_a_torchrun_command(tmp_path):
    settings = launch_settings()  # the repository's configs/torchrun.yaml
    assert settings.path.endswith("configs/torchrun.yaml")
    cmd = torchrun_command(settings, 2, tmp_path / "job.json")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-3:] == ["-m", "iterabre.distributed", str(tmp_path / "job.json")]
    assert int(launch_env(settings, 2)["OMP_NUM_THREADS"]) >= 1  # 'auto' resolved to cores / N


@pytest.mark.parametrize("text,named", [
    ("torchrun: {nproc_per_node: 4}\n", "nproc_per_node"),
    ("torchrun: {}\nworkers: 3\n", "unknown keys"),
    ("torchrun: [\n", "not valid YAML"),
])
def test_bad_launch_file_is_one_error(tmp_path, monkeypatch, text, named):
    path = tmp_path / "torchrun.yaml"
    path.write_text(text)
    monkeypatch.setenv(distributed.LAUNCH_CONFIG_ENV, str(path))
    with pytest.raises(IterabreError, match=named):
        launch_settings()


@pytest.mark.parametrize("kw,named", [
    (dict(num_processes=0), "num_processes=0 must be an integer >= 1"),
    (dict(fsdp=True), "--fsdp shards the models over several processes"),
    (dict(num_processes=8), "batch_size=4 is smaller than num_processes=8"),
    (dict(dtype="float16"), "unknown dtype 'float16'"),
])
def test_bad_process_or_dtype_settings_are_refused_up_front(kw, named):
    with pytest.raises(IterabreError, match=named):
        validate(_cfg(**kw))


@pytest.mark.parametrize("args,named", [
    (["--num-processes", "0"], "num_processes=0"),
    (["--fsdp"], "--fsdp"),
    (["--num-processes", "2", "--device", "cuda"], "no CUDA GPU"),
])
def test_cli_refuses_bad_process_settings_with_one_line(tiny_model_dir, tmp_path, args, named):
    from iterabre.cli import app

    if named == "no CUDA GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(app, ["compress", "--model", str(tiny_model_dir), "--target-layers", "4",
                                      "--output", str(tmp_path / "out"), *args])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and named in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- dtypes

def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_cpu(tiny_model_dir):
    assert working_dtype("auto", "cuda") == "bfloat16" and working_dtype("auto", "cpu") == "float32"
    assert working_dtype("bfloat16", "cpu") == "bfloat16"
    model, _ = load_model(str(tiny_model_dir), dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bf16_recovery_trains_fp32_masters_and_leaves_the_teacher_alone(monkeypatch):
    import iterabre.recovery as rec

    teacher = tiny_model("llama", 4).to(torch.bfloat16)
    student = remove_blocks(copy.deepcopy(teacher), [1])
    seen = {}
    make = rec.make_optimizer

    def spy(params, cfg):  # what the optimizer (and so its state) is built on
        seen["dtypes"] = {p.dtype for p in params}
        return make(params, cfg)

    monkeypatch.setattr(rec, "make_optimizer", spy)
    ids = torch.randint(0, 256, (8, 32))
    result = recover(student, teacher, ids, torch.ones_like(ids), RecoveryConfig(**{**RECOVERY, "tokens": 256}),
                     [1], heldout_ids=ids[:4], heldout_mask=torch.ones_like(ids[:4]))
    assert seen["dtypes"] == {torch.float32}  # float32 master copies of the bf16 weights
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}  # cast back for saving
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert result.dtype == "bfloat16" and result.loss_after < result.loss_before and not result.aborted


# ---------------------------------------------------------------- the loop's arithmetic over processes

class _Rank(Single):
    """Rank `rank` of `world` without a process group (all_sum is left to the test)."""

    def rows(self, idx):
        return idx[self.rank::self.world]


def test_shares_weighted_by_tokens_average_to_the_one_process_gradient():
    """DDP/FSDP average the processes' gradients; with uneven padding that must still be the
    gradient of the whole micro-batch's token mean (what one process computes)."""
    teacher = tiny_model("llama", 3)
    student = remove_blocks(copy.deepcopy(teacher), [1])
    ids = torch.randint(0, 256, (4, 16))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # rank 1 gets fewer tokens than rank 0
    mask[3, 9:] = 0
    cfg = RecoveryConfig(**RECOVERY)

    def grads(dist: Single) -> tuple[list[torch.Tensor], float]:
        model = copy.deepcopy(student).train()
        job = RecoveryJob(model, teacher, ids, mask, cfg, [1], dist=dist)
        loss, _ = _accumulate(job, model, teacher, [torch.arange(4)], KDLoss.from_config(cfg))
        return [p.grad.clone() for p in model.parameters()], loss

    whole, loss = grads(Single())
    parts = [grads(_Rank(rank=r, world=2)) for r in (0, 1)]
    for one, *two in zip(whole, *(g for g, _ in parts)):
        torch.testing.assert_close(sum(two) / 2, one, rtol=1e-4, atol=1e-7)  # DDP's mean of the two
    # all_sum of the two; KL of near-equal logits is a difference of O(1) terms, so fp32 noise is ~1e-7
    assert sum(part_loss for _, part_loss in parts) == pytest.approx(loss, abs=1e-6)


def test_meta_copy_costs_no_weights_and_keeps_ties():
    model = tiny_model("llama", 2)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them
    shell = meta_copy(model)
    assert all(p.is_meta for p in shell.parameters())
    assert shell.lm_head.weight is shell.model.embed_tokens.weight
    assert not any(b.is_meta for b in shell.buffers())  # rotary tables are in no state dict: copied
    assert weights_digest(Single(), list(model.parameters())) == weights_digest(
        Single(), list(copy.deepcopy(model).parameters()))


# ---------------------------------------------------------------- real process groups (torchrun + gloo)

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny teacher, its student with block 2 removed, the windows, and the one-process recovery."""
    from iterabre.tiny import byte_tokenizer

    root = tmp_path_factory.mktemp("dist")
    tiny_model("llama", 6).save_pretrained(root / "teacher")
    byte_tokenizer().save_pretrained(root / "teacher")
    steps.prune(root / "teacher", [2], root / "student")
    data = steps.prepare_data(_cfg(), root / "teacher", root, budgets=[512])
    one = steps.recover(root / "student", root / "teacher", data, RECOVERY, [2], (0, 16), root / "one", "cpu")
    return root, data, one


def _recover_in_two(work, fsdp: bool, progress: list) -> tuple[dict, dict]:
    root, data, _ = work
    out = root / ("fsdp" if fsdp else "ddp")
    record = steps.recover(root / "student", root / "teacher", data, RECOVERY, [2], (0, 16), out, "cpu",
                           progress=progress.append, num_processes=2, fsdp=fsdp)
    return record, load_file(out / "model.safetensors")


def _assert_matches_one_process(work, record: dict, weights: dict) -> None:
    root, _, one = work
    reference = load_file(root / "one" / "model.safetensors")
    assert set(weights) == set(reference)
    assert max(float((weights[k] - reference[k]).abs().max()) for k in weights) < WEIGHT_TOL
    moved = max(float((reference[k] - w).abs().max()) for k, w in load_file(root / "student" /
                                                                             "model.safetensors").items())
    assert moved > 100 * WEIGHT_TOL  # the tolerance is far below what training changes
    assert record["tokens"] == one["tokens"] and record["steps"] == one["steps"]  # same global batches
    for (s2, l2), (s1, l1) in zip(record["losses"], one["losses"], strict=True):
        assert s2 == s1 and l2 == pytest.approx(l1, abs=LOSS_ATOL)
    assert record["loss_after"] == pytest.approx(one["loss_after"], abs=LOSS_ATOL)


@pytest.mark.slow
def test_ddp_in_two_processes_matches_one(work):
    progress = []
    record, weights = _recover_in_two(work, fsdp=False, progress=progress)
    assert record["world_size"] == 2 and not record["fsdp"]  # really two processes, as replicas
    assert len(record["rank_digests"]) == 2 and len(set(record["rank_digests"])) == 1  # identical weights
    _assert_matches_one_process(work, record, weights)
    assert [p["tokens"] for p in progress] == [128, 256, 384, 512]  # rank 0's progress reached the caller


@pytest.mark.slow
def test_fsdp2_in_two_processes_matches_one(work):
    record, weights = _recover_in_two(work, fsdp=True, progress=[])
    assert record["world_size"] == 2 and record["fsdp"]
    assert len(record["rank_digests"]) == 2 and len(set(record["rank_digests"])) == 1  # gathered views agree
    _assert_matches_one_process(work, record, weights)


@pytest.mark.slow
@pytest.mark.parametrize("method, fsdp", [("block-recon+kd", False), ("block-recon+kd", True), ("auto", True)])
def test_block_recon_kd_in_two_processes_matches_one(work, method, fsdp):
    """block-recon+kd (and the default auto, which on this one gap fits by least squares): every process
    repairs the gap block alike on the whole windows, then KD is shared as for kd; the result equals one
    process's."""
    root, data, _ = work
    rec = {**RECOVERY, "method": method, "block_recon_steps": 4, "block_recon_batch_size": 2}
    one = steps.recover(root / "student", root / "teacher", data, rec, [2], (0, 16), root / f"{method}-one", "cpu")
    out = root / f"{method}-two-{fsdp}"
    two = steps.recover(root / "student", root / "teacher", data, rec, [2], (0, 16), out, "cpu",
                        num_processes=2, fsdp=fsdp)
    expected = "reconstruct+kd" if method == "auto" else method
    assert two["method"] == one["method"] == expected and two["world_size"] == 2
    assert len(set(two["rank_digests"])) == 1  # the processes agree
    ref, got = load_file(root / f"{method}-one" / "model.safetensors"), load_file(out / "model.safetensors")
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < WEIGHT_TOL
    assert two["loss_after"] == pytest.approx(one["loss_after"], abs=LOSS_ATOL)


@pytest.mark.slow
def test_a_user_error_in_the_processes_is_raised_as_one(work):
    root, data, _ = work
    with pytest.raises(IterabreError, match="trainable='adjacent' needs the removed block indices"):
        steps.recover(root / "student", root / "teacher", data, {**RECOVERY, "trainable": "adjacent"}, [], (0, 16),
                      root / "bad", "cpu", num_processes=2)
    assert not (root / "bad").exists()


@pytest.mark.slow
def test_flow_with_two_processes_removes_the_same_blocks_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    from flows.compress import run_from_cli

    def job(n: int) -> CompressConfig:  # 6 -> 4 blocks in two steps
        return _cfg(model=str(tiny_model_dir), output=str(tmp_path / f"n{n}"), num_processes=n, schedule="iterative",
                    recovery=RecoveryConfig(method="kd", batch_size=4, lr=1e-3))

    one = run_from_cli(job(1))
    two = run_from_cli(job(2))
    assert two["removed_layers"] == one["removed_layers"] and len(two["removed_layers"]) == 2
    assert [s["recovery"]["world_size"] for s in two["steps"]] == [2, 2]
    assert [s["recovery"]["world_size"] for s in one["steps"]] == [1, 1]
    report = json.loads((tmp_path / "n2" / "report.json").read_text())
    assert report["config"]["num_processes"] == 2

    def boom(*a, **k):
        raise AssertionError("a finished step ran again")
    for name in ("prepare_base", "prepare_data", "score", "prune", "recover", "publish"):
        monkeypatch.setattr(steps, name, boom)
    again = run_from_cli(job(2))  # the same job again: every task is a cache hit
    assert again["removed_layers"] == two["removed_layers"]
