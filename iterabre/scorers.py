"""Block importance scorers: how much does the model change without a block?

Every scorer returns one score per candidate, keyed by the ORIGINAL index of the first
block of the candidate run (n consecutive blocks, n=1 by default); higher = more
important, so the lowest-scoring blocks are the ones to remove.

- output:          IteRABRe. 1 - cos(final hidden states with, without the run).
- block-influence: ShortGPT. 1 - cos(input of block i, input of block i+n).
- angular:         Gromov et al. arccos(cos(input of block i, input of block i+n)) / pi.
- perplexity:      SLEB / Shortened-LLaMA. log-perplexity of the model without the run.

All means are over non-padding tokens of the whole calibration set (token-weighted).

Cost. `naive_scores` runs the whole model once per candidate: about L*L block-forwards
per batch for the `output` scorer (one full pass + L passes of L-1 blocks).
`score_blocks` runs the model once while caching the residual stream entering each block,
then resumes each candidate i from the cached input of block i, running only blocks
i+n..L-1: L + L(L-1)/2 block-forwards for n=1, about 0.5x the naive cost, and it skips
the LM head except for `perplexity`. block-influence and angular need one pass in total.
On the first batch the fast path also replays the whole stack once (one extra forward) to
check that the replay reproduces the model; if it does not, it logs why and runs naive.
Memory stays O(L * batch * T * d): one batch is processed for all candidates at a time.

`streamed_scores` gives the same scores without the whole model in memory: it walks the
blocks once, in order, with one block's weights on the device (read from the model folder,
or moved from CPU memory), advancing the dense stream and every candidate stream that has
already skipped its run, several candidates per block call. Same L + L(L-1)/2 block forwards,
but each block's weights are read once per pass. The inputs every block gets (masks per layer
type, rotary tables) are recorded from the model's own forward run with identity blocks, so
nothing of a model's mask or rotary code is re-implemented. The flow's score step uses it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iterabre.activations import (apply_tail, blocks_as_identity, call_block, capture_stack, lm_logits,
                                  run_blocks, tail_as_identity, tail_modules, tile_call)
from iterabre.devices import resolve_device
from iterabre.errors import IterabreError
from iterabre.streaming import open_source, plan_streams
from iterabre.surgery import blocks_skipped, decoder_blocks, original_indices

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # progress(done, total), called after each unit of work


# ---- pure math: each returns (sum of per-token terms, number of tokens) -------------------------

def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [M, ...] float32 rows of the non-padding tokens (NaN-safe, no multiply)."""
    return x[mask.bool()].float()


def cosine_distance_terms(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum over valid tokens of 1 - cos(a_t, b_t); a, b: [B, T, d], mask: [B, T]."""
    cos = F.cosine_similarity(_valid(a, mask), _valid(b, mask), dim=-1)  # [M]
    return float((1.0 - cos).sum(dtype=torch.float64)), cos.numel()


def angular_distance_terms(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum over valid tokens of arccos(cos(a_t, b_t)) / pi, in [0, 1]."""
    cos = F.cosine_similarity(_valid(a, mask), _valid(b, mask), dim=-1).clamp(-1.0, 1.0)
    return float((torch.arccos(cos) / math.pi).sum(dtype=torch.float64)), cos.numel()


def nll_terms(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over targets whose context and target are real tokens."""
    pred = logits[:, :-1].float()  # [B, T-1, V] predicts input_ids[:, 1:]
    keep = (mask[:, :-1].bool() & mask[:, 1:].bool())  # [B, T-1]
    nll = F.cross_entropy(pred[keep], input_ids[:, 1:][keep], reduction="sum")
    return float(nll.double()), int(keep.sum())


# ---- registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scorer:
    """A scoring rule: `pair` scorers compare two cached block inputs; `resume` ones rerun the stack."""

    name: str
    kind: str  # "pair" | "resume"
    target: str  # what the term compares: "stream" (block inputs), "hidden" or "logits"
    term: Callable
    summary: str


def _output_term(reference, candidate, input_ids, mask):
    """Final hidden states of the full model vs the model without the run."""
    return cosine_distance_terms(reference, candidate, mask)


def _perplexity_term(reference, candidate_logits, input_ids, mask):
    """Next-token NLL of the model without the run (the full model is not needed)."""
    return nll_terms(candidate_logits, input_ids, mask)


def _influence_term(x_in, x_out, input_ids, mask):
    """How much the run turns the residual stream (cosine distance)."""
    return cosine_distance_terms(x_in, x_out, mask)


def _angular_term(x_in, x_out, input_ids, mask):
    """How much the run turns the residual stream (angle / pi)."""
    return angular_distance_terms(x_in, x_out, mask)


SCORERS: dict[str, Scorer] = {
    # Compared after the final norm: that is what the LM head sees, and the norm removes the
    # residual stream's growing scale, so the score measures a change of direction that matters
    # for the predictions, not of magnitude.
    "output": Scorer("output", "resume", "hidden", _output_term,
                     "IteRABRe: 1 - cosine of final hidden states with vs without the block"),
    "block-influence": Scorer("block-influence", "pair", "stream", _influence_term,
                              "ShortGPT: 1 - cosine of the block's input and output"),
    "angular": Scorer("angular", "pair", "stream", _angular_term,
                      "angular distance between the inputs of block i and block i+n"),
    "perplexity": Scorer("perplexity", "resume", "logits", _perplexity_term,
                         "log-perplexity of the model without the block"),
}


# ---- shared plumbing ---------------------------------------------------------------------------

class BlockScores(dict):
    """{original index of the run's first block: score}; `.order` = all remaining original indices."""

    order: list[int]


def _scorer(name: str) -> Scorer:
    """Look up a scorer by name."""
    if name not in SCORERS:
        raise IterabreError(f"Unknown scorer {name!r}.", f"use one of: {', '.join(SCORERS)}.")
    return SCORERS[name]


def _batches(input_ids, attention_mask, batch_size, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validate inputs and split them into (ids [b, T], mask [b, T]) batches on `device`."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise IterabreError("input_ids must be a non-empty [N, T] tensor of token ids.",
                            "pass token windows, e.g. from iterabre.data.token_windows.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise IterabreError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                            f"{tuple(input_ids.shape)}.", "pass a mask of the same [N, T] shape.")
    if int(batch_size) < 1:
        raise IterabreError(f"batch_size must be >= 1, got {batch_size}.", "pass a positive batch size.")
    ids, mask = input_ids.long().to(device), attention_mask.long().to(device)
    return [(ids[s:s + batch_size], mask[s:s + batch_size]) for s in range(0, len(ids), batch_size)]


def _starts(model, n: int) -> list[int]:
    """Positions where a run of n consecutive blocks can start."""
    num = len(decoder_blocks(model))
    if not 1 <= int(n) < num:
        raise IterabreError(f"n={n} consecutive blocks cannot be scored in a model with {num} blocks.",
                            f"pass 1 <= n <= {num - 1}.")
    return list(range(num - n + 1))


def _finish(model, sums: dict[int, list], name: str) -> BlockScores:
    """Turn per-position (sum, count) accumulators into scores keyed by original index."""
    order = original_indices(model)
    if any(count == 0 for _, count in sums.values()):
        raise IterabreError(f"No scorable tokens for the {name!r} scorer (all padding or too short).",
                            "pass calibration windows with real tokens (>= 2 per row for perplexity).")
    scores = BlockScores({order[p]: total / count for p, (total, count) in sums.items()})
    scores.order = order
    return scores


def _add(sums: dict[int, list], pos: int, term: tuple[float, int]) -> None:
    """Accumulate one batch's (sum, count) for a position."""
    sums[pos][0] += term[0]
    sums[pos][1] += term[1]


@contextlib.contextmanager
def _eval_inference(model: nn.Module):
    """Eval mode and no autograd while scoring; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


class _Ticker:
    """Counts finished work units and reports them to an optional progress callback."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def tick(self) -> None:
        """One unit (a candidate on a batch, or a whole batch for pair scorers) is done."""
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


# ---- the reference: run the whole model without each candidate ---------------------------------

def _forward_final(model, ids, mask, logits: bool) -> torch.Tensor:
    """Whole-model forward: last_hidden_state [b, T, d], or logits [b, T, V] through the LM head."""
    if logits:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    base = getattr(model, "base_model", model)
    return base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def _stream_states(model, ids, mask) -> tuple[torch.Tensor, ...]:
    """Inputs of blocks 0..L-1 plus the last block's output, via transformers' own hidden_states."""
    base = getattr(model, "base_model", model)
    with tail_as_identity(model):  # so the last entry is the raw block output, not the normed one
        states = base(input_ids=ids, attention_mask=mask, use_cache=False,
                      output_hidden_states=True).hidden_states
    if len(states) != len(decoder_blocks(model)) + 1:
        raise IterabreError(f"{type(model).__name__} returned {len(states)} hidden states for "
                            f"{len(decoder_blocks(model))} blocks.", "use score_blocks (fast path).")
    return states


def _setup(model, input_ids, attention_mask, scorer: str, n: int, batch_size: int, progress):
    """What both scoring paths start from: rule, batches, candidate starts, running sums, ticker."""
    rule = _scorer(scorer)
    batches = _batches(input_ids, attention_mask, batch_size, next(model.parameters()).device)
    starts = _starts(model, n)
    sums = {p: [0.0, 0] for p in starts}
    ticker = _Ticker(progress, len(batches) * (1 if rule.kind == "pair" else len(starts)))
    return rule, batches, starts, sums, ticker


def naive_scores(model, input_ids, attention_mask, scorer: str = "output", n: int = 1,
                 batch_size: int = 4, progress: Progress | None = None) -> BlockScores:
    """Reference scores: literally rerun the whole model with each candidate run skipped."""
    rule, batches, starts, sums, ticker = _setup(model, input_ids, attention_mask, scorer, n, batch_size, progress)
    with _eval_inference(model):
        for ids, mask in batches:
            if rule.kind == "pair":
                xs = _stream_states(model, ids, mask)
                for p in starts:
                    _add(sums, p, rule.term(xs[p], xs[p + n], ids, mask))
                ticker.tick()
                continue
            reference = None if rule.target == "logits" else _forward_final(model, ids, mask, False)
            for p in starts:
                with blocks_skipped(model, list(range(p, p + n))):
                    candidate = _forward_final(model, ids, mask, rule.target == "logits")
                _add(sums, p, rule.term(reference, candidate, ids, mask))
                ticker.tick()
    return _finish(model, sums, scorer)


# ---- the fast path: one cached pass, then resume each candidate from its cached input ------------

def _close(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> bool:
    """Replays must match the recorded forward up to kernel noise (on real tokens only)."""
    a, b = _valid(a, mask), _valid(b, mask)
    scale = float(b.abs().max()) if b.numel() else 1.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0))


def _fast_path_problem(model, cap, tail, mask, rule: Scorer) -> str | None:
    """Why replaying the recorded block calls would not reproduce this model's forward, if it would not."""
    if any(x is None for x in cap.xs) or any(c is None for c in cap.calls) or cap.final is None:
        return "not every block was called exactly through its module during the forward"
    if rule.kind == "pair":
        return None
    if not _close(apply_tail(tail, cap.xs[-1]), cap.final, mask):
        return "the modules after the last block are not a recognised final norm/projection"
    replay = run_blocks(decoder_blocks(model), cap.calls, cap.xs[0], 0)
    if not _close(replay, cap.xs[-1], mask):
        return "blocks depend on more than their own recorded inputs"
    if rule.target == "logits" and not _close(lm_logits(model, cap.final), cap.logits, mask):
        return "the LM head applies something besides the output embeddings and softcapping"
    return None


def _resume_candidates(model, cap, tail, rule, ids, mask, starts, n, sums, ticker) -> None:
    """For each start p, rerun blocks p+n..L-1 from the cached input of block p."""
    blocks = decoder_blocks(model)
    for p in starts:
        hidden = run_blocks(blocks, cap.calls, cap.xs[p], p + n)  # [b, T, d]
        final = apply_tail(tail, hidden)
        candidate = lm_logits(model, final) if rule.target == "logits" else final
        _add(sums, p, rule.term(cap.final, candidate, ids, mask))
        ticker.tick()


def score_blocks(model, input_ids, attention_mask, scorer: str = "output", n: int = 1,
                 batch_size: int = 4, progress: Progress | None = None) -> BlockScores:
    """Scores per candidate run of n blocks, keyed by original index; same values as naive_scores."""
    rule, batches, starts, sums, ticker = _setup(model, input_ids, attention_mask, scorer, n, batch_size, progress)
    tail = tail_modules(model)
    with _eval_inference(model):
        for b, (ids, mask) in enumerate(batches):
            # The first batch also goes through the LM head once, to check lm_logits against it.
            cap = capture_stack(model, ids, mask, with_logits=(b == 0 and rule.target == "logits"))
            problem = _fast_path_problem(model, cap, tail, mask, rule) if b == 0 else None
            if problem:
                log.warning("Fast %s scoring unavailable for %s: %s; using naive scoring.",
                            scorer, type(model).__name__, problem)
                break
            if rule.kind == "pair":
                for p in starts:
                    _add(sums, p, rule.term(cap.xs[p], cap.xs[p + n], ids, mask))
                ticker.tick()
            else:
                _resume_candidates(model, cap, tail, rule, ids, mask, starts, n, sums, ticker)
            del cap  # free this batch's L cached activations before the next batch
    if problem:
        return naive_scores(model, input_ids, attention_mask, scorer, n, batch_size, progress)
    return _finish(model, sums, scorer)


# ---- the streamed path: walk the blocks once, one block's weights on the device at a time ---------

class _Unstreamable(Exception):
    """The identity-block pass showed that replaying recorded block calls would not reproduce the model."""


@dataclass
class _Walk:
    """One calibration batch during the walk; streams live on the plan's stream device."""

    ids: torch.Tensor  # [b, T] on the compute device
    mask: torch.Tensor  # [b, T]
    calls: list  # BlockCall per block, as the model's own forward built them for this batch
    dense: torch.Tensor  # [b, T, d] input of the next block of the full model
    candidates: dict  # start p -> [b, T, d] stream of the model without blocks p..p+n-1
    window: list  # pair scorers: the last n+1 dense block inputs
    memo: dict  # tiled call tensors shared by the batched candidate calls


def _identity_pass_problem(model, cap, tail, mask) -> str | None:
    """Why replaying this identity-block capture would not reproduce the model's forward, if it would not."""
    if any(x is None for x in cap.xs) or any(c is None for c in cap.calls) or cap.final is None:
        return "not every block was called exactly through its module during the forward"
    if any(not _close(x, cap.xs[0], mask) for x in cap.xs[1:]):
        return "the model changes the residual stream between blocks"
    if not _close(apply_tail(tail, cap.xs[-1]), cap.final, mask):
        return "the modules after the last block are not a recognised final norm/projection"
    if cap.logits is not None and not _close(lm_logits(model, cap.final), cap.logits, mask):
        return "the LM head applies something besides the output embeddings and softcapping"
    return None


def _prepare_walks(model, batches, rule: Scorer, stream_device) -> list[_Walk]:
    """Record every block call of every batch with identity blocks (no block weights needed)."""
    tail, walks = tail_modules(model), []
    for b, (ids, mask) in enumerate(batches):
        with blocks_as_identity(model):
            cap = capture_stack(model, ids, mask, with_logits=(b == 0 and rule.target == "logits"))
        problem = _identity_pass_problem(model, cap, tail, mask)
        if problem:
            raise _Unstreamable(problem)
        x0 = cap.xs[0].to(stream_device)
        walks.append(_Walk(ids, mask, cap.calls, x0, {}, [x0], {}))
    return walks


def _call_streams(block, walk: _Walk, j: int, keys: list, per_call: int, device, stream_device) -> None:
    """Block j on the candidate streams `keys` of this batch, `per_call` streams stacked per block call."""
    rows = walk.ids.shape[0]
    for c in range(0, len(keys), per_call):
        chunk = keys[c:c + per_call]
        x = torch.cat([walk.candidates[key].to(device) for key in chunk])  # [len(chunk) * b, T, d]
        y = call_block(block, tile_call(walk.calls[j], rows, len(chunk), walk.memo), x)
        for i, key in enumerate(chunk):
            walk.candidates[key] = y[i * rows:(i + 1) * rows].to(stream_device)


def _advance_candidates(block, walk: _Walk, j: int, n: int, per_call: int, device, stream_device) -> None:
    """Block j on every candidate stream that has already skipped its run."""
    _call_streams(block, walk, j, [p for p in walk.candidates if p + n <= j], per_call, device, stream_device)


def _block_step(block, walk: _Walk, j: int, rule: Scorer, n: int, plan, device, sums) -> None:
    """While block j is resident: advance this batch's dense stream and its candidates (or pair terms)."""
    if rule.kind == "resume":
        walk.candidates[j] = walk.dense  # the model without blocks j..j+n-1 continues from block j's input
        _advance_candidates(block, walk, j, n, plan.per_call, device, plan.stream_device)
    walk.dense = call_block(block, walk.calls[j], walk.dense.to(device)).to(plan.stream_device)
    if rule.kind == "pair":
        walk.window = (walk.window + [walk.dense])[-(n + 1):]
        if len(walk.window) == n + 1:  # inputs of blocks p and p+n, p = j + 1 - n
            a, b = (x.to(device) for x in (walk.window[0], walk.window[-1]))
            _add(sums, j + 1 - n, rule.term(a, b, walk.ids, walk.mask))


def _finish_walk(model, tail, walk: _Walk, rule: Scorer, starts, sums, device) -> None:
    """After the last block: final norm (and LM head) on every candidate, scored against the full model."""
    if rule.kind != "resume":
        return
    reference = apply_tail(tail, walk.dense.to(device)) if rule.target == "hidden" else None
    for p in starts:
        final = apply_tail(tail, walk.candidates.pop(p).to(device))
        candidate = lm_logits(model, final) if rule.target == "logits" else final
        _add(sums, p, rule.term(reference, candidate, walk.ids, walk.mask))


def _walk_blocks(source, rule: Scorer, input_ids, attention_mask, n, batch_size, device, progress,
                 call_budget) -> BlockScores:
    """Every group of batches: one pass over the blocks in order, each block loaded once per pass."""
    model = source.model
    blocks = decoder_blocks(model)
    starts = _starts(model, n)
    sums = {p: [0.0, 0] for p in starts}
    batches = _batches(input_ids, attention_mask, batch_size, device)
    per_row = len(blocks) + 1 if rule.kind == "resume" else n + 1  # streams per calibration row
    plan = plan_streams(model.config, device, [len(ids) for ids, _ in batches], input_ids.shape[1], per_row,
                        next(p for p in model.parameters() if p.is_floating_point()).dtype, call_budget)
    walks = _prepare_walks(model, batches, rule, plan.stream_device)
    ticker = _Ticker(progress, len(plan.groups) * len(blocks))
    tail = tail_modules(model)
    for group in plan.groups:
        for j in range(len(blocks)):
            block = source.load(j)
            for b in group:
                _block_step(block, walks[b], j, rule, n, plan, device, sums)
            source.unload(j)
            ticker.tick()
        for b in group:
            _finish_walk(model, tail, walks[b], rule, starts, sums, device)
            walks[b] = None  # this group's streams are no longer needed
    return _finish(model, sums, rule.name)


def streamed_scores(weights, input_ids, attention_mask, scorer: str = "output", n: int = 1,
                    batch_size: int = 4, device: str = "auto", dtype: torch.dtype | None = None,
                    progress: Progress | None = None, call_budget: int | None = None) -> BlockScores:
    """Same scores as score_blocks, with only one block's weights on `device` at a time.

    `weights` is a safetensors model folder (read lazily, block by block, in `dtype`, default
    float32) or an nn.Module (e.g. kept in CPU memory while `device` is a GPU). The blocks are
    walked once, in order; while block j is resident it advances the dense stream and every
    candidate stream that has already skipped its run, several candidates per call
    (`call_budget` bytes of activations, see iterabre.streaming.plan_streams). Progress counts
    blocks. If the model's forward cannot be replayed block by block, it logs why and scores
    the whole model with score_blocks instead.
    """
    rule = _scorer(scorer)
    source = open_source(weights, torch.device(resolve_device(device)), dtype)
    try:
        with _eval_inference(source.model):
            return _walk_blocks(source, rule, input_ids, attention_mask, n, batch_size, source.device, progress,
                                call_budget)
    except _Unstreamable as e:
        problem = str(e)
    finally:
        source.close()
    log.warning("Streamed %s scoring unavailable for %s: %s; scoring the whole model.",
                scorer, type(source.model).__name__, problem)
    model = weights if isinstance(weights, nn.Module) else _load_whole(weights, source.device, dtype)
    return score_blocks(model, input_ids, attention_mask, scorer, n, batch_size, progress)


def _load_whole(folder, device, dtype) -> nn.Module:
    """The whole model from a folder, for the fallback."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32).to(device).eval()


# ---- choosing what to remove -------------------------------------------------------------------

def lowest_blocks(scores: dict[int, float], k: int, contiguous: bool = False,
                  order: list[int] | None = None) -> list[int]:
    """The k least important blocks (original indices); ties broken by the lower index.

    contiguous=False: the k lowest-scoring keys, lowest first.
    contiguous=True: scores are keyed by the start of a run of k blocks (score_blocks(..., n=k));
    returns that run for the lowest-scoring start. `order` (the remaining original indices,
    default `scores.order`, else consecutive numbering) says which blocks follow the start.
    """
    if int(k) < 1 or not scores:
        raise IterabreError(f"Cannot pick {k} block(s) from {len(scores)} scores.", "pass k >= 1 and scores.")
    ranked = sorted(scores, key=lambda i: (scores[i], i))
    if not contiguous:
        if k > len(ranked):
            raise IterabreError(f"Asked for {k} blocks but only {len(ranked)} are scored.",
                                f"pass k <= {len(ranked)}.")
        return ranked[:k]
    order = list(order or getattr(scores, "order", None) or range(max(scores) + k))
    start = order.index(ranked[0])
    if start + k > len(order):
        raise IterabreError(f"A run of {k} blocks from block {ranked[0]} runs past the last block.",
                            "score with score_blocks(..., n=k) so every start leaves room for k blocks.")
    return order[start:start + k]


# ---- whole removal sets: the IteRABRe criterion on every block of a set at once ------------------
# Per-block scores add up badly: blocks interact, so the k lowest single scores are not the set
# of k whose joint removal moves the output least (BENCHMARKS §5, removal distances). `select`
# compares the sets other rules propose by the distance of removing each set whole.

def _set_positions(model, sets: dict[str, list[int]]) -> dict[str, frozenset[int]]:
    """Named sets of ORIGINAL block indices -> the positions they hold in `model` now."""
    order = original_indices(model)
    where = {o: p for p, o in enumerate(order)}
    positions = {}
    for name, blocks in sets.items():
        missing = sorted(set(blocks) - set(where))
        if missing or not blocks or len(set(blocks)) >= len(order):
            raise IterabreError(f"removal set {name!r} = {list(blocks)} is not a proper subset of the model's "
                                f"blocks {order}.", "pass sets of remaining original block indices")
        positions[name] = frozenset(where[b] for b in blocks)
    return positions


def _set_result(sums: dict[str, list]) -> dict[str, float]:
    """(sum, count) per set -> mean 1 - cos per token."""
    if any(count == 0 for _, count in sums.values()):
        raise IterabreError("No scorable tokens for the removal sets (all padding).",
                            "pass calibration windows with real tokens.")
    return {name: total / count for name, (total, count) in sums.items()}


def naive_set_distances(model, input_ids, attention_mask, sets: dict[str, list[int]],
                        batch_size: int = 4) -> dict[str, float]:
    """Reference: {name: mean over tokens of 1 - cos(final hidden states without every block of the set, with
    all blocks)}, by rerunning the whole model once per set; `sets` hold original block indices."""
    positions = _set_positions(model, sets)
    batches = _batches(input_ids, attention_mask, batch_size, next(model.parameters()).device)
    sums = {name: [0.0, 0] for name in sets}
    with _eval_inference(model):
        for ids, mask in batches:
            dense = _forward_final(model, ids, mask, False)  # [b, T, d]
            for name, skip in positions.items():
                with blocks_skipped(model, sorted(skip)):
                    _add(sums, name, cosine_distance_terms(_forward_final(model, ids, mask, False), dense, mask))
    return _set_result(sums)


def _walk_sets(source, positions: dict[str, frozenset[int]], input_ids, attention_mask, batch_size, device,
               call_budget) -> dict[str, float]:
    """One pass over the blocks (per group of batches): the dense stream and one stream per set, which
    follows the dense stream until the set's first block and then skips every block of the set."""
    model = source.model
    blocks = decoder_blocks(model)
    rule = SCORERS["output"]  # the same recorded block inputs and final-norm check as the output scorer
    batches = _batches(input_ids, attention_mask, batch_size, device)
    plan = plan_streams(model.config, device, [len(ids) for ids, _ in batches], input_ids.shape[1],
                        len(positions) + 1, next(p for p in model.parameters() if p.is_floating_point()).dtype,
                        call_budget)
    walks = _prepare_walks(model, batches, rule, plan.stream_device)
    tail, sums = tail_modules(model), {name: [0.0, 0] for name in positions}
    for group in plan.groups:
        for j in range(len(blocks)):
            block = source.load(j)
            for b in group:
                walk = walks[b]
                for name, skip in positions.items():  # a set's stream starts where its first block is skipped
                    if j in skip and name not in walk.candidates:
                        walk.candidates[name] = walk.dense
                running = [name for name in walk.candidates if j not in positions[name]]
                _call_streams(block, walk, j, running, plan.per_call, device, plan.stream_device)
                walk.dense = call_block(block, walk.calls[j], walk.dense.to(device)).to(plan.stream_device)
            source.unload(j)
        for b in group:
            walk, walks[b] = walks[b], None
            dense = apply_tail(tail, walk.dense.to(device))  # [b, T, d] final hidden states of the full model
            for name in positions:
                pruned = apply_tail(tail, walk.candidates[name].to(device))
                _add(sums, name, cosine_distance_terms(pruned, dense, walk.mask))
    return _set_result(sums)


def set_distances(weights, input_ids, attention_mask, sets: dict[str, list[int]], batch_size: int = 4,
                  device: str = "auto", dtype: torch.dtype | None = None,
                  call_budget: int | None = None) -> dict[str, float]:
    """{name: mean over tokens of 1 - cos(final hidden states without every block of the set, with all
    blocks)}, the output scorer's criterion on whole sets; same values as naive_set_distances.

    Streamed as `streamed_scores` is (one block's weights on `device` at a time, `weights` a model
    folder or an nn.Module): each set costs the blocks after its first removed one. A model whose
    forward cannot be replayed block by block is run whole instead, once per set.
    """
    source = open_source(weights, torch.device(resolve_device(device)), dtype)
    try:
        positions = _set_positions(source.model, sets)
        with _eval_inference(source.model):
            return _walk_sets(source, positions, input_ids, attention_mask, batch_size, source.device, call_budget)
    except _Unstreamable as e:
        problem = str(e)
    finally:
        source.close()
    log.warning("Streamed removal-set distances unavailable for %s: %s; running the whole model.",
                type(source.model).__name__, problem)
    model = weights if isinstance(weights, nn.Module) else _load_whole(weights, source.device, dtype)
    return naive_set_distances(model, input_ids, attention_mask, sets, batch_size)


REMOVAL_RULES = (*SCORERS, "select")  # what CompressConfig.scorer may name


def select_removal(distances: dict[str, float]) -> str:
    """The proposing rule whose set moves the output least (ties: the one named first)."""
    names = list(distances)
    return min(names, key=lambda name: (distances[name], names.index(name)))
