"""Pure planning of a compression job: targets, budgets, windows, which blocks go, promotion.

No I/O and no torch: every function maps a config and small values to small values, so the
flow, the tests and bench/ can reason about a job before anything runs.
"""

from __future__ import annotations

import dataclasses
import math

from iterabre.config import CompressConfig, budget_schedule_name
from iterabre.errors import IterabreError


def target_layers_for(cfg: CompressConfig, base_layers: int) -> int:
    """Blocks to keep: target_layers, or round(ratio * base); must be in [1, base_layers)."""
    target = cfg.target_layers if cfg.target_layers is not None else round(cfg.target_ratio * base_layers)
    if not 1 <= target < base_layers:
        raise IterabreError(f"target of {target} blocks is out of range for a model with {base_layers} blocks.",
                            f"pick a target between 1 and {base_layers - 1}")
    return target


def num_steps_for(cfg: CompressConfig, base_layers: int) -> list[int]:
    """Blocks removed per iteration, e.g. 30 -> 26 with 1 per step: [1, 1, 1, 1]; one-shot: [4]."""
    total = base_layers - target_layers_for(cfg, base_layers)
    if cfg.schedule == "one-shot":
        return [total]
    full, rest = divmod(total, cfg.blocks_per_step)
    return [cfg.blocks_per_step] * full + ([rest] if rest else [])


def final_budget(total_tokens: int, num_steps: int, schedule: str = "equal",
                 final_share: float = CompressConfig.final_share, unit: int = 1) -> int:
    """Tokens of the recovery phase after the last removal: share * total for 'final', else 0.

    One step (one-shot) has nothing after its single recovery to add, so it keeps the whole budget.
    """
    if budget_schedule_name(schedule) != "final" or num_steps < 2:
        return 0
    return round(total_tokens // unit * final_share) * unit


def split_units(units: int, weights: list[int]) -> list[int]:
    """`units` split in proportion to `weights` (largest remainder, ties to later steps); sums to `units`."""
    total = sum(weights)
    out = [units * w // total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (units * weights[i] % total, i), reverse=True)
    for i in by_remainder[:units - sum(out)]:
        out[i] += 1
    return out


def step_budgets(total_tokens: int, num_steps: int, schedule: str = "equal",
                 final_share: float = CompressConfig.final_share, unit: int = 1) -> list[int]:
    """Split the recovery budget over steps in whole `unit`s (see `budget_plan` for each schedule).

    `unit` is the tokens of one micro-batch: a phase trains whole micro-batches, so a budget that
    is not a multiple of it would be rounded up by the training loop and the job would overspend.
    """
    schedule = budget_schedule_name(schedule)
    if num_steps < 1:
        return []
    pool = total_tokens // unit - final_budget(total_tokens, num_steps, schedule, final_share, unit) // unit
    # increasing: step i gets weight i, because later removals cut a model that is already weaker
    weights = list(range(1, num_steps + 1)) if schedule == "increasing" else [1] * num_steps
    return [n * unit for n in split_units(pool, weights)]


def micro_batch_tokens(cfg: CompressConfig) -> int:
    """Tokens in one recovery micro-batch: the unit every phase's budget is a multiple of."""
    return cfg.recovery.batch_size * cfg.seq_len


def budget_plan(cfg: CompressConfig, num_steps: int) -> dict:
    """How a job spends cfg.recovery_tokens: per-step budgets, a final phase, a pool for carried tokens.

    Every budget is whole micro-batches (`micro_batch_tokens`), so each phase trains exactly its
    budget; equal / increasing / final: sum(steps) + final == the total rounded down to whole
    micro-batches (`usable`). adaptive: steps start equal;
    a step that stops early hands its unused tokens to the next (`next_carry`), whose extra
    windows come from `carry_pool` tokens reserved after the step windows (the most that can
    ever be carried is everything but the last step's share).
    """
    schedule, unit = budget_schedule_name(cfg.budget_schedule), micro_batch_tokens(cfg)
    budgets = step_budgets(cfg.recovery_tokens, num_steps, schedule, cfg.final_share, unit)
    pool = sum(budgets[:-1]) if schedule == "adaptive" else 0
    return {"schedule": schedule, "total": cfg.recovery_tokens, "usable": cfg.recovery_tokens // unit * unit,
            "micro_batch_tokens": unit, "steps": budgets,
            "final": final_budget(cfg.recovery_tokens, num_steps, schedule, cfg.final_share, unit), "carry_pool": pool}


def data_budgets(plan: dict) -> list[int]:
    """Budgets `prepare_data` reserves recovery windows for: each step, then the final phase / carry pool."""
    return plan["steps"] + [b for b in (plan["final"], plan["carry_pool"]) if b > 0]


def next_carry(budget: int, used: int) -> int:
    """Tokens a step hands to the next under 'adaptive': what it was given minus what it trained on."""
    return max(0, budget - used)


def carry_range(pool: tuple[int, int] | None, carry: int, seq_len: int) -> tuple[int, int] | None:
    """The first windows of the carry pool that hold `carry` tokens; None when nothing is carried."""
    if carry <= 0 or pool is None:
        return None
    return pool[0], pool[0] + min(math.ceil(carry / seq_len), pool[1] - pool[0])


def step_recovery(cfg: CompressConfig, budget: int) -> dict:
    """One phase's RecoveryConfig as a dict: cfg.recovery with `budget` tokens (+ early stop if adaptive)."""
    rec = {**dataclasses.asdict(cfg.recovery), "tokens": budget}
    if budget_schedule_name(cfg.budget_schedule) == "adaptive":
        rec.update(early_stop_tokens=cfg.adaptive_eval_tokens, early_stop_tol=cfg.adaptive_tol)
    return rec


def recovery_ranges(budgets: list[int], seq_len: int) -> list[tuple[int, int]]:
    """Disjoint [start, stop) slices of the recovery windows, one per step, covering its budget."""
    ranges, start = [], 0
    for budget in budgets:
        n = max(1, math.ceil(budget / seq_len))  # a zero budget still gets one window (held-out free)
        ranges.append((start, start + n))
        start += n
    return ranges


def plan_removal(scores: dict, k: int, scorer: str, order: list[int]) -> list[int]:
    """The k least important blocks (original indices); a contiguous run for the angular scorer.

    `order` is the remaining blocks' original indices: after earlier removals a run of k
    blocks starting at block i is not i..i+k-1.
    """
    from iterabre.scorers import lowest_blocks

    scores = {int(i): float(s) for i, s in scores.items()}  # JSON round trips turn keys into str
    return [int(i) for i in lowest_blocks(scores, k, contiguous=scorer == "angular", order=list(order))]


def promotion(base_eval: dict, final_eval: dict, min_blimp_retained: float,
              max_ppl_ratio: float) -> tuple[str, list[str]]:
    """('champion' | 'challenger', reasons): champion only when every measured gate passes."""
    checks = []
    blimp = [e.get("blimp", {}).get("acc") for e in (base_eval, final_eval)]
    if None not in blimp and blimp[0] > 0:
        ok = blimp[1] / blimp[0] >= min_blimp_retained
        checks.append((ok, f"blimp acc retained {blimp[1] / blimp[0]:.3f} (gate >= {min_blimp_retained})"))
    ppl = [e.get("wikitext", {}).get("word_perplexity") for e in (base_eval, final_eval)]
    if None not in ppl and ppl[0] > 0:
        ok = ppl[1] / ppl[0] <= max_ppl_ratio
        checks.append((ok, f"perplexity ratio {ppl[1] / ppl[0]:.3f} (gate <= {max_ppl_ratio})"))
    if not checks:
        return "challenger", ["no gate metric (blimp acc, wikitext word_perplexity) was evaluated"]
    return ("champion" if all(ok for ok, _ in checks) else "challenger"), [why for _, why in checks]


def recon_windows(cfg: CompressConfig) -> int:
    """Windows of self-generated text block-recon or reconstruct fits on (0: it uses the recovery windows).

    Shin et al. (2024) reconstruct on text sampled from the dense model; `calibration=self-generated`
    does that for block-recon (`block_recon_tokens`) and for reconstruct (`reconstruct_tokens`): one
    set, reused at every gap and step, like the scoring text. KD keeps training on wikitext: its budget
    is far larger, and generating it would cost a forward per token.
    """
    if cfg.calibration != "self-generated":
        return 0
    method, rec = cfg.recovery.method, cfg.recovery
    tokens = (rec.block_recon_tokens if method.startswith("block-recon")
              else rec.reconstruct_tokens if method.startswith("reconstruct")
              else max(rec.block_recon_tokens, rec.reconstruct_tokens) if method == "auto" else 0)  # auto: either
    return math.ceil(tokens / cfg.seq_len)


def split_layout(cfg: CompressConfig, n_calib: int, n_recovery: int, available: int) -> dict:
    """Where every set of windows sits, for report.json: [start, stop) positions in one seeded
    permutation of the wikitext-2 valid windows (calibration, then held-out, then recovery, as
    `iterabre.data.split_windows` cuts them: the first two do not move when the budget changes).

    Position p is window w = `torch.randperm(windows_available, seed)[p]`, i.e. tokens
    [w * seq_len, (w + 1) * seq_len) of the tokenized valid text: disjoint ranges are disjoint text.
    """
    def span(start: int, stop: int) -> dict:
        return {"windows": [start, stop], "tokens": (stop - start) * cfg.seq_len}

    calib = span(0, n_calib)
    extra, n_recon = {}, recon_windows(cfg)
    if cfg.calibration == "self-generated":  # the wikitext windows stay reserved, but unused
        calib["source"] = "self-generated by the base model"
        if n_recon:
            method = cfg.recovery.method
            fit = "auto" if method == "auto" else "block_recon" if method.startswith("block-recon") else "reconstruct"
            extra[fit] = {"windows": n_recon, "tokens": n_recon * cfg.seq_len,
                          "source": "self-generated by the base model, after the calibration windows"}
    return {"source": "wikitext-2 valid", "seq_len": cfg.seq_len, "seed": cfg.seed,
            "windows_available": available, "calibration": calib,
            "heldout": span(n_calib, 2 * n_calib),
            "recovery": span(2 * n_calib, 2 * n_calib + n_recovery),
            "evaluation": "lm-eval tasks on wikitext-2 test, BLiMP and XCOPA (never wikitext-2 valid)", **extra}


def global_windows(layout: dict, window_range) -> list[int]:
    """A [start, stop) slice of the recovery windows, in `split_layout`'s permutation positions."""
    offset = layout["recovery"]["windows"][0]
    return [offset + int(window_range[0]), offset + int(window_range[1])]
