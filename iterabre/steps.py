"""Path-in, path-out steps of a compression job: the units the Prefect flow caches.

Each function does one library call on models and data that live on disk and returns
paths or small JSON-able values, so an orchestrator can key a cache on content hashes
instead of in-memory objects. Nothing here knows about Prefect or MLflow; the loop
itself lives once, in `flows/compress.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from iterabre.atomic import atomic_dir
from iterabre.config import CompressConfig, RecoveryConfig
from iterabre.errors import IterabreError

SCHEDULES = ("iterative", "one-shot")
TEACHERS = ("base", "previous")
CALIBRATIONS = ("wikitext", "self-generated")
BUDGET_SCHEDULES = ("equal", "increasing", "final", "adaptive")
BUDGET_ALIASES = {"linear": "increasing"}  # the first name of 'increasing'; old configs keep working
SOURCE_FILE = "iterabre-source.json"  # provenance of a prepared base model
_CHUNK = 1 << 20
_HASH_MEMO: dict[tuple, str] = {}


# ---------------------------------------------------------------- content hashes

def _file_stats(path: Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of every file under `path` (or of `path` itself), sorted."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    base = path.parent if path.is_file() else path
    return [(p.relative_to(base).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def hash_path(path: str | os.PathLike) -> str:
    """sha256 over the sorted relative file names and contents of a file or directory."""
    path = Path(path)
    if not path.exists():
        raise IterabreError(f"{path} does not exist, so it cannot be hashed.", "re-run the step that writes it")
    stats = _file_stats(path)
    memo_key = (str(path.resolve()), tuple(stats))  # unchanged names, sizes and mtimes -> same content
    if memo_key not in _HASH_MEMO:
        digest = hashlib.sha256()
        base = path.parent if path.is_file() else path
        for name, _, _ in stats:
            digest.update(name.encode() + b"\0")
            with open(base / name, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        _HASH_MEMO[memo_key] = digest.hexdigest()
    return _HASH_MEMO[memo_key]


# ---------------------------------------------------------------- config checks and plans

def _one_of(value: str, allowed, what: str) -> None:
    """Raise unless `value` is one of `allowed`."""
    if value not in allowed:
        raise IterabreError(f"unknown {what} {value!r}.", f"use one of {', '.join(allowed)}")


def _check_target(cfg: CompressConfig) -> None:
    """Exactly one of target_layers / target_ratio, each in range."""
    if (cfg.target_layers is None) == (cfg.target_ratio is None):
        raise IterabreError("give exactly one of target_layers and target_ratio.",
                            "pass --target-layers N (blocks to keep) or --target-ratio R (e.g. 0.8)")
    if cfg.target_layers is not None and (not isinstance(cfg.target_layers, int) or cfg.target_layers < 1):
        raise IterabreError(f"target_layers={cfg.target_layers} must be an integer >= 1.",
                            "pass the number of blocks to keep")
    if cfg.target_ratio is not None and not 0 < cfg.target_ratio < 1:
        raise IterabreError(f"target_ratio={cfg.target_ratio} must be between 0 and 1.",
                            "pass the fraction of blocks to keep, e.g. 0.8")


def _check_sizes(cfg: CompressConfig) -> None:
    """Token counts, sequence length, step size and eval limit are positive where they must be."""
    if cfg.seq_len < 2 or cfg.calibration_tokens < cfg.seq_len or cfg.recovery_tokens < 0:
        raise IterabreError(
            f"need seq_len >= 2, calibration_tokens >= seq_len and recovery_tokens >= 0 (got {cfg.seq_len}, "
            f"{cfg.calibration_tokens}, {cfg.recovery_tokens}).", "fix the token counts")
    if cfg.blocks_per_step < 1:
        raise IterabreError(f"blocks_per_step={cfg.blocks_per_step} must be >= 1.", "pass --blocks-per-step 1")
    if cfg.eval_limit is not None and not cfg.eval_limit > 0:
        raise IterabreError(f"eval_limit={cfg.eval_limit} must be positive or None.", "pass e.g. 0.05 or none")


def _check_budget(cfg: CompressConfig) -> None:
    """Budget schedule name and its knobs are usable."""
    budget_schedule_name(cfg.budget_schedule)
    if not 0 <= cfg.final_share < 1:
        raise IterabreError(f"final_share={cfg.final_share} must be in [0, 1).", "pass e.g. --final-share 0.2")
    if cfg.adaptive_eval_tokens < 1 or not cfg.adaptive_tol >= 0:
        raise IterabreError(f"need adaptive_eval_tokens >= 1 and adaptive_tol >= 0 (got {cfg.adaptive_eval_tokens}, "
                            f"{cfg.adaptive_tol}).", "pass e.g. --adaptive-eval-tokens 1024 --adaptive-tol 0.01")


def _check_recovery(rec: RecoveryConfig) -> None:
    """Recovery method and its options name things that exist."""
    from iterabre.recovery import LR_SCHEDULES, RECOVERY_METHODS, TRAINABLE

    _one_of(rec.method, tuple(RECOVERY_METHODS), "recovery method")
    _one_of(rec.trainable, TRAINABLE, "recovery trainable")
    _one_of(rec.lr_schedule, LR_SCHEDULES, "recovery lr_schedule")
    if not rec.lr > 0 or rec.batch_size < 1 or rec.grad_accum < 1:
        raise IterabreError(f"recovery needs lr > 0, batch_size >= 1, grad_accum >= 1 (got {rec.lr}, "
                            f"{rec.batch_size}, {rec.grad_accum}).", "fix the recovery settings")


def _as_declared(value, annotation: str):
    """An int given for a float field becomes a float (JSON and Prefect turn 2 into 2.0 or back)."""
    if isinstance(value, int) and not isinstance(value, bool) and annotation.startswith("float"):
        return float(value)
    return value


def normalise_config(cfg: CompressConfig) -> CompressConfig:
    """Same config with numbers in their declared types, so equal jobs get equal fingerprints."""
    def fix(obj):
        return {f.name: _as_declared(getattr(obj, f.name), str(f.type)) for f in dataclasses.fields(obj)
                if f.name != "recovery"}
    return CompressConfig(**fix(cfg), recovery=RecoveryConfig(**fix(cfg.recovery)))


def validate_config(cfg: CompressConfig) -> None:
    """Refuse a bad job before any compute: names, ranges, device, target."""
    from iterabre.models import resolve_device
    from iterabre.scorers import SCORERS

    if not cfg.model:
        raise IterabreError("no model was given.", "pass --model (embedded name, folder, .gguf or hub id)")
    _check_target(cfg)
    _one_of(cfg.scorer, tuple(SCORERS), "scorer")
    _one_of(cfg.schedule, SCHEDULES, "schedule")
    _one_of(cfg.teacher, TEACHERS, "teacher")
    _one_of(cfg.calibration, CALIBRATIONS, "calibration")
    _check_budget(cfg)
    _check_sizes(cfg)
    _check_recovery(cfg.recovery)
    resolve_device(cfg.device)
    if cfg.eval_tasks.strip():
        from iterabre.evaluation import parse_tasks

        parse_tasks(cfg.eval_tasks)


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


def budget_schedule_name(name: str) -> str:
    """The canonical budget schedule for `name` ('linear' -> 'increasing'); IterabreError if unknown."""
    name = BUDGET_ALIASES.get(name, name)
    _one_of(name, BUDGET_SCHEDULES, "budget_schedule")
    return name


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


# ---------------------------------------------------------------- model and data steps

def _load(model_dir: str | os.PathLike, device: str = "cpu"):
    """(model, tokenizer) from a prepared local safetensors folder."""
    from iterabre.models import load_model

    return load_model(str(model_dir), device=device)


def prepare_base(cfg: CompressConfig, work_dir: str | os.PathLike, source_hash: str | None = None) -> Path:
    """Load cfg.model (embedded / folder / gguf / hub) and save it as `work_dir/base` (safetensors).

    `source_hash` (content hash of a local model) makes an edited source count as a new model.
    """
    from iterabre.models import load_model, save_model

    out = Path(work_dir) / "base"
    source = {"model": cfg.model, "revision": cfg.revision, "source_hash": source_hash}
    if (out / SOURCE_FILE).exists() and json.loads((out / SOURCE_FILE).read_text()) == source:
        return out  # written atomically, so present means complete
    model, tokenizer = load_model(cfg.model, cfg.revision, device="cpu",
                                  allow_remote_code=cfg.allow_remote_code, allow_pickle=cfg.allow_pickle)
    return save_model(model, tokenizer, out, extra={SOURCE_FILE: source})


def num_layers(model_dir: str | os.PathLike) -> int:
    """Decoder block count of a saved model, read from its config."""
    from transformers import AutoConfig

    # `num_hidden_layers` is aliased by every family's attribute_map (GPT-2: n_layer).
    count = getattr(AutoConfig.from_pretrained(str(model_dir)), "num_hidden_layers", None)
    if count is None:
        raise IterabreError(f"{model_dir} has no layer count in its config.", "use a decoder-only HF model")
    return int(count)


def _calibration_windows(cfg: CompressConfig, model_dir: Path, n: int) -> torch.Tensor:
    """Self-generated calibration text: LongTensor[n, seq_len] sampled from the base model."""
    try:
        from iterabre.selfgen import generate_calibration
    except ImportError as e:
        raise IterabreError("calibration 'self-generated' needs iterabre/selfgen.py, which is missing.",
                            "use --calibration wikitext") from e
    from iterabre.models import resolve_device

    model, tokenizer = _load(model_dir, resolve_device(cfg.device))
    return generate_calibration(model, tokenizer, n, cfg.seq_len, cfg.seed).cpu()


def prepare_data(cfg: CompressConfig, model_dir: str | os.PathLike, work_dir: str | os.PathLike,
                 budgets: list[int]) -> Path:
    """Disjoint calibration / recovery / held-out token windows, saved as one .pt file.

    All three come from wikitext-2 *valid*; evaluation (lm-eval `wikitext`) reads wikitext-2 *test*,
    so no text used to score or heal a model is ever scored as held-out evaluation text.
    """
    from transformers import AutoTokenizer

    from iterabre.data import load_documents, split_windows, token_windows

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = token_windows(tokenizer, load_documents("wikitext", "valid"), cfg.seq_len)  # [W, T]
    n_calib = math.ceil(cfg.calibration_tokens / cfg.seq_len)
    ranges = recovery_ranges(budgets, cfg.seq_len)
    n_recovery = ranges[-1][1] if ranges else 0
    split = split_windows(windows, n_calib, n_recovery, n_calib, cfg.seed)  # held-out as big as calib
    if cfg.calibration == "self-generated":
        split["calib"] = _calibration_windows(cfg, Path(model_dir), n_calib)
    layout = split_layout(cfg, n_calib, n_recovery, int(windows.shape[0]))
    payload = {**split, "recovery_ranges": [list(r) for r in ranges],
               "meta": {"seq_len": cfg.seq_len, "seed": cfg.seed, "calibration": cfg.calibration,
                        "windows_available": int(windows.shape[0]), "split": layout}}
    return _save_atomic(payload, Path(work_dir) / "data.pt")


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
    if cfg.calibration == "self-generated":  # the wikitext windows stay reserved, but unused
        calib["source"] = "self-generated by the base model"
    return {"source": "wikitext-2 valid", "seq_len": cfg.seq_len, "seed": cfg.seed,
            "windows_available": available, "calibration": calib,
            "heldout": span(n_calib, 2 * n_calib),
            "recovery": span(2 * n_calib, 2 * n_calib + n_recovery),
            "evaluation": "lm-eval tasks on wikitext-2 test, BLiMP and XCOPA (never wikitext-2 valid)"}


def global_windows(layout: dict, window_range) -> list[int]:
    """A [start, stop) slice of the recovery windows, in `split_layout`'s permutation positions."""
    offset = layout["recovery"]["windows"][0]
    return [offset + int(window_range[0]), offset + int(window_range[1])]


def _save_atomic(obj, path: Path) -> Path:
    """torch.save to a temp file next to `path`, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_data(data_path: str | os.PathLike) -> dict:
    """The windows file written by `prepare_data` (tensors + plain lists only)."""
    return torch.load(data_path, weights_only=True)


def data_layout(data_path: str | os.PathLike) -> dict:
    """The `split_layout` stored in a windows file by `prepare_data`."""
    return load_data(data_path)["meta"]["split"]


def _mask(ids: torch.Tensor) -> torch.Tensor:
    """Windows are full slices of one token stream, so every position is real: all ones."""
    return torch.ones_like(ids)


def score(model_dir: str | os.PathLike, data_path: str | os.PathLike, scorer: str, n: int,
          device: str) -> dict:
    """{"scores": {orig: importance}, "order": remaining original indices}; higher = more important.

    `n` > 1 scores runs of n consecutive blocks, keyed by the run's first block.
    """
    from iterabre.scorers import score_blocks
    from iterabre.surgery import original_indices

    model, _ = _load(model_dir, device)
    ids = load_data(data_path)["calib"]  # [N, T]
    scores = score_blocks(model, ids, _mask(ids), scorer=scorer, n=n)
    return {"scores": {int(i): float(s) for i, s in scores.items()}, "order": original_indices(model)}


def prune(model_dir: str | os.PathLike, remove: list[int], out_dir: str | os.PathLike) -> Path:
    """Copy of the model at `model_dir` without the blocks `remove` (original indices)."""
    from iterabre.models import save_model
    from iterabre.surgery import remove_blocks

    model, tokenizer = _load(model_dir)
    return save_model(remove_blocks(model, list(remove)), tokenizer, out_dir)


def recover(student_dir: str | os.PathLike, teacher_dir: str | os.PathLike, data_path: str | os.PathLike,
            recovery_cfg: dict, removed: list[int], window_range: tuple[int, int],
            out_dir: str | os.PathLike, device: str, progress=None,
            extra_range: tuple[int, int] | None = None) -> dict:
    """Heal the pruned student towards the teacher on its slice of the recovery windows; save it.

    `extra_range` adds more recovery windows (from the carry pool, for tokens an earlier step left).
    """
    from iterabre.models import save_model
    from iterabre.reconstruct import relative_hidden_error
    from iterabre.recovery import recover as run_recovery

    student, tokenizer = _load(student_dir, device)
    teacher, _ = _load(teacher_dir, device)
    data = load_data(data_path)
    ids = data["recovery"][window_range[0]:window_range[1]]  # [n, T] this step's share
    if extra_range is not None:
        ids = torch.cat([ids, data["recovery"][extra_range[0]:extra_range[1]]])  # [n + m, T]
    held = data["heldout"]
    error_before = relative_hidden_error(student, teacher, held, _mask(held))
    result = run_recovery(student, teacher, ids, _mask(ids), RecoveryConfig(**recovery_cfg), list(removed),
                          progress=progress, device=device, heldout_ids=held, heldout_mask=_mask(held))
    # Every method reports the same quality yardstick: how far the final hidden states are
    # from the teacher's on held-out text (issue: compare none / reconstruct / kd by it).
    record = result.to_dict()
    record["heldout_rel_error_before"] = error_before
    record["heldout_rel_error_after"] = relative_hidden_error(student, teacher, held, _mask(held))
    save_model(student, tokenizer, out_dir)
    return json.loads(json.dumps(record))  # tuples -> lists: what a JSON round trip gives


def evaluate(model_dir: str | os.PathLike, tasks: str, limit: float | None, device: str,
             seed: int = 0) -> dict:
    """lm-eval metrics {task: {metric: value}} of a saved model; {} when no task is asked for."""
    if not tasks.strip():
        return {}
    from iterabre.evaluation import evaluate as run_eval

    model, tokenizer = _load(model_dir, device)
    return run_eval(model, tokenizer, tasks, limit=limit, device=device, seed=seed)


def publish(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a finished checkpoint to `out_dir` (e.g. DIR/final) atomically."""
    import shutil

    with atomic_dir(out_dir) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
    return Path(out_dir)


def write_json(obj, path: str | os.PathLike) -> Path:
    """JSON to a temp file next to `path`, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
