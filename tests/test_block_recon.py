"""Block-wise reconstruction (block-recon): what trains, what it reaches, its memory cap, and FLOP counts."""

import copy
import dataclasses

import pytest
import torch

from iterabre.blockrecon import plan_units, split_steps
from iterabre.config import RecoveryConfig
from iterabre.errors import IterabreError
from iterabre.flops import block_flops_per_token, count_flops, forward_flops_per_token, kd_flops_per_token
from iterabre.reconstruct import forward_capture
from iterabre.recovery import recover
from iterabre.surgery import decoder_blocks, remove_blocks
from iterabre.tiny import spread_weights, tiny_model

SEQ = 16


def _teacher(family="llama", layers=6):
    """A tiny model with weights large enough that a removed block changes the residual stream a lot."""
    return spread_weights(tiny_model(family, num_layers=layers, seed=0))


def _windows(n, seed=0, pad=False):
    """n random byte-token windows of SEQ tokens (the first one right-padded when `pad`)."""
    ids = torch.randint(0, 256, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[0, SEQ // 2:] = 0
    return ids, mask


def _cfg(**kw):
    base = dict(method="block-recon", block_recon_tokens=32 * SEQ, block_recon_steps=40, block_recon_lr=1e-3,
                block_recon_batch_size=4, block_recon_buffer=8 * SEQ, seed=0)
    return RecoveryConfig(**{**base, **kw})


def _gap_error(student, teacher, s_pos, t_pos, ids, mask):
    """Held-out relative RMS error of the student's residual after block s_pos vs the teacher's after t_pos,
    measured here with plain forward hooks (independent of iterabre.blockrecon's own bookkeeping)."""
    with torch.no_grad():
        out = forward_capture(student, decoder_blocks(student)[s_pos], ids, mask)["out"]
        target = forward_capture(teacher, decoder_blocks(teacher)[t_pos], ids, mask)["out"]
    keep = mask.bool()
    rel = (out[keep] - target[keep]).square().sum(-1) / target[keep].square().sum(-1)
    return float(rel.mean().sqrt())


def _run(family="llama", removed=(3,), pad=False, **kw):
    teacher = _teacher(family)
    student = remove_blocks(copy.deepcopy(teacher), list(removed))
    ids, mask = _windows(32, pad=pad)
    held, held_mask = _windows(8, seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    result = recover(student, teacher, ids, mask, _cfg(**kw), list(removed), heldout_ids=held,
                     heldout_mask=held_mask)
    return result, student, teacher, before, (held, held_mask)


# ---------------------------------------------------------------- which blocks train

def test_plan_units_before_both_and_gaps_at_the_ends():
    teacher = tiny_model("llama", num_layers=6)
    student = remove_blocks(copy.deepcopy(teacher), [0, 3, 4])  # keeps originals [1, 2, 5] at positions 0, 1, 2
    before = plan_units(student, teacher, [0, 3, 4], "before")
    # gap at 0 -> first kept block (pos 0), target = teacher after original 1 (pos 1);
    # gap 3-4 -> block before it (pos 1 = original 2), target = teacher after original 4 (pos 4).
    assert [(u.positions, u.target) for u in before] == [((0,), 1), ((1,), 4)]
    both = plan_units(student, teacher, [0, 3, 4], "both")
    assert [(u.positions, u.target) for u in both] == [((0,), 1), ((1, 2), 5)]
    end = remove_blocks(copy.deepcopy(teacher), [5])
    assert [(u.positions, u.target) for u in plan_units(end, teacher, [5], "both")] == [((4,), 5)]
    with pytest.raises(IterabreError, match="still has them"):
        plan_units(student, teacher, [2])
    with pytest.raises(IterabreError, match="block_recon_blocks"):
        plan_units(student, teacher, [3], "after")


def test_split_steps_is_proportional_and_sums():
    assert split_steps(10, [4, 4, 2]) == [4, 4, 2]
    assert split_steps(7, [3, 3, 3]) == [2, 2, 3] and sum(split_steps(101, [5, 7, 1])) == 101
    assert split_steps(5, [0, 0]) == [0, 0]


# ---------------------------------------------------------------- it heals, and only where it should

@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_block_recon_reduces_the_heldout_error_at_the_gap(family):
    teacher = _teacher(family)
    student = remove_blocks(copy.deepcopy(teacher), [3])
    held, held_mask = _windows(8, seed=1)
    gap_before = _gap_error(student, teacher, 2, 3, held, held_mask)  # student pos 2 = original 2; teacher pos 3
    ids, mask = _windows(32, pad=True)
    result = recover(student, teacher, ids, mask, _cfg(), [3], heldout_ids=held, heldout_mask=held_mask)
    gap_after = _gap_error(student, teacher, 2, 3, held, held_mask)
    info = result.extra["block_recon"]
    assert gap_after < 0.95 * gap_before  # random tiny blocks: measured 0.88 (Llama, Qwen2), 0.93 (Gemma2)
    assert info["error_before"] == pytest.approx(gap_before, rel=1e-4)  # its own bookkeeping agrees
    assert info["error_after"] == pytest.approx(gap_after, rel=1e-4) and info["error_data"] == "heldout"
    assert result.loss_after < result.loss_before  # the held-out KD loss of the whole model falls too
    assert result.method == "block-recon" and result.steps == 40 and not result.aborted
    assert result.tokens == int(mask.sum()) and info["tokens_seen"] > result.tokens  # padding excluded
    assert result.flops > 0 and result.seconds > 0 and len(result.losses) == 40


@pytest.mark.parametrize("which, trained", [("before", {2}), ("both", {2, 3})])
def test_only_the_intended_blocks_change(which, trained):
    result, student, teacher, before, _ = _run(block_recon_blocks=which)
    prefixes = tuple(f"model.layers.{p}." for p in trained)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(prefixes) for n in changed)
    assert {n.split(".")[2] for n in changed} == {str(p) for p in trained}
    assert result.extra["block_recon"]["trained"] == [f"model.layers.{p}" for p in sorted(trained)]
    assert all(p.requires_grad for p in student.parameters())  # flags restored
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_unit_that_gets_worse_is_restored():
    # lr 10 blows the block up: the guard (or the held-out check) must put the old weights back.
    result, student, _, before, _ = _run(block_recon_lr=10.0, block_recon_steps=10)
    unit = result.extra["block_recon"]["units"][0]
    assert unit["restored"] and result.extra["block_recon"]["trained"] == []
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())


def test_block_recon_kd_trains_after_the_blockwise_part():
    result, *_ = _run(method="block-recon+kd", tokens=256, batch_size=4, lr=1e-3)
    assert result.method == "block-recon+kd" and result.steps > 0 and not result.aborted
    assert result.extra["block_recon"]["units"][0]["blocks"] == [2]
    assert result.loss_after < result.loss_before and result.extra["loss_after_block_recon"] < result.loss_before


def test_block_recon_reconstructs_on_its_own_text_when_given():
    """recon_ids (self-generated calibration) replace the recovery windows for block-recon: the same
    weights as passing that text as the recovery windows, other weights than the recovery windows give."""
    teacher = _teacher()
    ids, mask = _windows(32)
    own, _ = _windows(32, seed=2)
    held, held_mask = _windows(8, seed=1)

    def trained(recovery_ids, recon_ids=None):
        student = remove_blocks(copy.deepcopy(teacher), [3])
        recover(student, teacher, recovery_ids, torch.ones_like(recovery_ids), _cfg(), [3], heldout_ids=held,
                heldout_mask=held_mask, recon_ids=recon_ids)
        return student.state_dict()

    with_own, as_recovery, plain = trained(ids, own), trained(own), trained(ids)
    assert all(torch.equal(with_own[k], as_recovery[k]) for k in with_own)
    assert not all(torch.equal(with_own[k], plain[k]) for k in with_own)


def test_iterative_removals_target_the_base_model():
    """Two iterations as the flow runs them: remove, heal towards the base, remove again, heal again."""
    teacher = _teacher()
    ids, mask = _windows(32)
    held, held_mask = _windows(8, seed=1)
    student = copy.deepcopy(teacher)
    # The 2nd removal widens the gap: original 2 (trained once already) now has to stand in for 3 and 4.
    for removed, s_pos, t_pos in [([3], 2, 3), ([4], 2, 4)]:
        student = remove_blocks(student, removed)
        gap_before = _gap_error(student, teacher, s_pos, t_pos, held, held_mask)
        recover(student, teacher, ids, mask, _cfg(), removed, heldout_ids=held, heldout_mask=held_mask)
        assert _gap_error(student, teacher, s_pos, t_pos, held, held_mask) < gap_before


def test_bad_settings_are_refused():
    teacher = _teacher()
    student = remove_blocks(copy.deepcopy(teacher), [3])
    ids, mask = _windows(8)
    with pytest.raises(IterabreError, match="block_recon_buffer"):
        recover(student, teacher, ids, mask, _cfg(block_recon_buffer=SEQ - 1), [3])
    with pytest.raises(IterabreError, match="block_recon_blocks"):
        recover(student, teacher, ids, mask, _cfg(block_recon_blocks="all"), [3])
    with pytest.raises(IterabreError, match="block_recon_lr"):
        recover(student, teacher, ids, mask, _cfg(block_recon_lr=0.0), [3])


# ---------------------------------------------------------------- the memory cap

def _buffer(tokens, cap):
    result, student, *_ = _run(block_recon_tokens=tokens, block_recon_buffer=cap, block_recon_steps=8)
    info = result.extra["block_recon"]
    return info, student.config.hidden_size


def test_captured_pairs_stay_under_the_cap_when_the_tokens_double():
    cap = 8 * SEQ
    small, d = _buffer(16 * SEQ, cap)
    large, _ = _buffer(32 * SEQ, cap)
    cap_bytes = 2 * cap * d * 4  # inputs + targets, float32
    assert small["tokens"] == 16 * SEQ and large["tokens"] == 32 * SEQ  # twice the pairs were captured ...
    assert small["buffer_peak_bytes"] == large["buffer_peak_bytes"] == cap_bytes  # ... in the same storage
    assert large["buffer_peak_tokens"] <= large["buffer_cap_tokens"] == cap
    # The measurement does see growth: without a binding cap the storage doubles with the tokens.
    loose_small, _ = _buffer(8 * SEQ, 64 * SEQ)
    loose_large, _ = _buffer(16 * SEQ, 64 * SEQ)
    assert loose_large["buffer_peak_bytes"] == 2 * loose_small["buffer_peak_bytes"]


# ---------------------------------------------------------------- FLOPs against a hand count

def _hand_counts(model):
    """Per-token forward FLOPs of one block and of the LM head of a tiny Llama, from its config by hand."""
    c = model.config
    h, i, heads, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads
    head_dim = c.head_dim
    block_weights = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * i  # q, o, k, v, gate, up, down
    attention = 2 * 2 * SEQ * heads * head_dim  # QK^T and AV
    return 2 * block_weights + attention, 2 * c.vocab_size * h


def test_flop_counter_matches_a_hand_count_forward_and_kd():
    student, teacher = tiny_model("llama", num_layers=3), tiny_model("llama", num_layers=4)
    block, head = _hand_counts(student)
    ids, _ = _windows(2)
    with count_flops() as fwd, torch.no_grad():
        teacher(input_ids=ids)
    assert fwd.total == 2 * SEQ * (4 * block + head) == 2 * SEQ * forward_flops_per_token(teacher, SEQ)
    assert fwd.backward == 0
    with count_flops() as kd:  # one KD micro-batch: teacher forward, student forward + backward (all trained)
        with torch.no_grad():
            teacher(input_ids=ids)
        student(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    assert kd.total == 2 * SEQ * ((4 * block + head) + 3 * (3 * block + head))
    assert kd.total == 2 * SEQ * kd_flops_per_token(student, teacher, SEQ)
    assert block_flops_per_token(decoder_blocks(student)[0], student.config, SEQ) == block


def test_block_recon_flops_match_a_hand_count():
    teacher = tiny_model("llama", num_layers=6)
    student = remove_blocks(copy.deepcopy(teacher), [3])  # trains student pos 2 towards teacher pos 3
    ids, mask = _windows(16)
    held, held_mask = _windows(4, seed=1)
    cfg = _cfg(block_recon_tokens=16 * SEQ, block_recon_steps=6, block_recon_batch_size=4, block_recon_buffer=8 * SEQ)
    result = recover(student, teacher, ids, mask, cfg, [3], heldout_ids=held, heldout_mask=held_mask)
    block, head = _hand_counts(student)
    capture = 2 * block + 4 * block  # student blocks 0-1 up to the unit's input, teacher blocks 0-3 to the target
    kd_eval = (5 * block + head) + (6 * block + head)  # held-out KD loss: student + teacher forward
    per_heldout_token = 2 * kd_eval + 2 * (capture + block)  # KD before / after; gap error before / after
    training = 16 * SEQ * capture + 6 * 4 * SEQ * 3 * block  # capture all pairs; 6 steps x 4 windows fwd + bwd
    assert result.flops == 4 * SEQ * per_heldout_token + training


def test_scoring_flops_are_returned_and_match_a_hand_count(tiny_model_dir, tmp_path):
    from iterabre import steps

    ids, _ = _windows(4)
    torch.save({"calib": ids}, tmp_path / "data.pt")
    block, head = _hand_counts(tiny_model("llama", num_layers=6))
    tokens, L = ids.numel(), 6
    pair = steps.score(tiny_model_dir, tmp_path / "data.pt", "block-influence", 1, "cpu")
    assert pair["flops"] == tokens * L * block  # one pass over the stack, no LM head
    output = steps.score(tiny_model_dir, tmp_path / "data.pt", "output", 1, "cpu")
    assert output["flops"] == tokens * (L + L * (L - 1) // 2) * block  # dense stream + every candidate's suffix
    angular = steps.score(tiny_model_dir, tmp_path / "data.pt", "angular", 3, "cpu")
    assert angular["flops"] == tokens * L * block  # runs of n compare cached inputs: still one pass
    ppl = steps.score(tiny_model_dir, tmp_path / "data.pt", "perplexity", 1, "cpu")
    # as output, plus an LM head per candidate, plus two over the first batch (here all 4 windows)
    # for the identity pass's logits check
    assert ppl["flops"] == tokens * ((L + L * (L - 1) // 2) * block + (L + 2) * head)


# ---------------------------------------------------------------- the flow and the real model

def test_block_recon_in_the_flow_after_every_removal(tiny_model_dir, tmp_path):
    from flows.compress import run_from_cli
    from iterabre.config import CompressConfig

    rec = RecoveryConfig(method="block-recon", batch_size=4, block_recon_steps=5, block_recon_batch_size=2)
    cfg = CompressConfig(model=str(tiny_model_dir), target_layers=4, calibration_tokens=128, recovery_tokens=256,
                         seq_len=32, eval_tasks="", device="cpu", output=str(tmp_path / "out"), recovery=rec,
                         schedule="iterative")
    report = run_from_cli(cfg, max_ppl_ratio=1e9, min_blimp_retained=0.0)
    assert len(report["steps"]) == 2
    for step in report["steps"]:
        rec = step["recovery"]
        assert rec["method"] == "block-recon" and rec["flops"] > 0 and rec["tokens"] > 0
        assert rec["extra"]["block_recon"]["units"] and "heldout_rel_error_after" in rec


def test_the_default_recipe_runs_through_the_flow(tiny_model_dir, tmp_path):
    """`iterabre compress` with no recipe options: one select step (output's and angular's sets compared),
    every block removed at once, then the repair the removal's gaps call for and KD in one recovery phase."""
    from flows.compress import run_from_cli
    from iterabre.config import CompressConfig

    cfg = CompressConfig(model=str(tiny_model_dir), target_layers=4, calibration_tokens=128, recovery_tokens=256,
                         seq_len=32, eval_tasks="", device="cpu", output=str(tmp_path / "out"),
                         recovery=RecoveryConfig(batch_size=4, block_recon_steps=5, block_recon_batch_size=2))
    report = run_from_cli(cfg, max_ppl_ratio=1e9, min_blimp_retained=0.0)
    [step] = report["steps"]
    assert len(step["removed"]) == 2 and report["final_num_layers"] == 4
    assert set(step["distances"]) == {"output", "angular"} and step["removed"] == step["candidates"][step["chosen"]]
    rec = step["recovery"]
    one_gap = max(step["removed"]) - min(step["removed"]) == 1
    assert rec["method"] == rec["extra"]["auto"] == ("reconstruct+kd" if one_gap else "block-recon+kd")
    assert rec["tokens"] == 256 and rec["loss_after"] < rec["loss_before"]


def test_self_generated_calibration_through_the_flow(tiny_model_dir, tmp_path, monkeypatch):
    """--calibration self-generated with one-shot block-recon+kd: scoring and block-recon read text sampled
    from the base model, KD the wikitext windows, and the job's compute counts the generation."""
    from flows.compress import run_from_cli
    from iterabre.config import CompressConfig

    monkeypatch.setenv("ITERABRE_CACHE_DIR", str(tmp_path / "cache"))
    rec = RecoveryConfig(method="block-recon+kd", batch_size=4, block_recon_tokens=64, block_recon_steps=5,
                         block_recon_batch_size=2)
    cfg = CompressConfig(model=str(tiny_model_dir), target_layers=4, calibration_tokens=128, recovery_tokens=256,
                         seq_len=32, eval_tasks="", device="cpu", output=str(tmp_path / "out"), recovery=rec,
                         calibration="self-generated")
    report = run_from_cli(cfg, max_ppl_ratio=1e9, min_blimp_retained=0.0)
    split, compute, [step] = report["data_split"], report["compute"], report["steps"]
    assert split["calibration"]["source"].startswith("self-generated") and split["block_recon"]["windows"] == 2
    assert compute["generation_flops"] > 0
    assert compute["total_flops"] == compute["generation_flops"] + compute["scoring_flops"] + compute["recovery_flops"]
    assert step["recovery"]["extra"]["block_recon"]["tokens"] == 64 and step["recovery"]["tokens"] == 256
    assert "generating calibration text" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_block_recon_heals_smollm2(smollm2_dir):
    from iterabre.data import load_documents, split_windows, token_windows
    from iterabre.models import load_model

    teacher, tokenizer = load_model(str(smollm2_dir))
    student = remove_blocks(copy.deepcopy(teacher), [20])
    windows = token_windows(tokenizer, load_documents("wikitext", "valid")[:30], 128)
    parts = split_windows(windows, 0, 8, 4, seed=0)  # 1,024 recovery tokens, 512 held out
    ids, held = parts["recovery"], parts["heldout"]
    one = torch.ones_like
    gap_before = _gap_error(student, teacher, 19, 20, held, one(held))
    cfg = RecoveryConfig(method="block-recon", block_recon_tokens=1024, block_recon_steps=20)  # default lr
    result = recover(student, teacher, ids, one(ids), cfg, [20], heldout_ids=held, heldout_mask=one(held))
    gap_after = _gap_error(student, teacher, 19, 20, held, one(held))
    info = result.extra["block_recon"]
    assert not result.aborted and info["trained"] == ["model.layers.19"]
    assert gap_after < 0.9 * gap_before, (gap_before, gap_after)
    assert result.loss_after < result.loss_before
    assert dataclasses.asdict(cfg)["block_recon_buffer"] >= info["buffer_peak_tokens"]


@pytest.mark.parametrize("removed, expected", [((2, 3), "reconstruct+kd"), ((1, 4), "block-recon+kd")])
def test_auto_repairs_one_gap_by_least_squares_and_several_block_wise(removed, expected):
    """`auto` runs reconstruct+kd when the removal is one contiguous run and block-recon+kd when it leaves
    several gaps: the same weights as asking for that method, and the record says which ran."""
    result, student, *_ = _run(removed=removed, method="auto", tokens=256, batch_size=4, lr=1e-3,
                               reconstruct_tokens=8 * SEQ)
    named, same, *_ = _run(removed=removed, method=expected, tokens=256, batch_size=4, lr=1e-3,
                           reconstruct_tokens=8 * SEQ)
    assert result.method == expected and result.extra["auto"] == expected and not result.aborted
    assert result.extra["gaps"] == (1 if expected == "reconstruct+kd" else 2)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), same.state_dict().values()))
