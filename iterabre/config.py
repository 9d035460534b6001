"""The job's knobs, declared once: type, default, one-line help and allowed values per field.

`CompressConfig` is what `iterabre compress` and the Prefect flow take; it is plain data
(JSON-serialisable) so it can be hashed for caching and logged to MLflow as parameters.
`FlowOptions` steer a run without changing its model. The CLI options, the flow parameters
and the checks (`normalise`, `validate`) are all read from these fields, so a knob is added
or changed here only. Nothing heavy is imported at module level: `iterabre --help` reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass, field

from iterabre.errors import IterabreError

SCHEDULES = ("iterative", "one-shot")
TEACHERS = ("base", "previous")
CALIBRATIONS = ("wikitext", "self-generated")
BUDGET_SCHEDULES = ("equal", "increasing", "final", "adaptive")
DTYPES = ("auto", "float32", "bfloat16")


def knob(default, help: str, choices: tuple | str | None = None):
    """A dataclass field with its help and, optionally, its allowed values (a tuple or a lazy 'module:NAME')."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class RecoveryConfig:
    """How one recovery (healing) phase trains the pruned student."""

    method: str = knob("auto", "Recovery method: none | kd | lora-kd | reconstruct | reconstruct+kd | "
                               "block-recon | block-recon+kd (block-wise reconstruction at each gap, then KD) | "
                               "auto (reconstruct+kd when the removal leaves one gap, block-recon+kd when it "
                               "leaves several: each the best measured for its kind of removal at equal compute, "
                               "docs/BENCHMARKS.md §5).",
                       "iterabre.recovery:RECOVERY_METHODS")
    tokens: int = knob(4096, "Token budget of this phase; the loop sets it from the total budget.")
    batch_size: int = knob(4, "Recovery sequences per micro-batch.")
    grad_accum: int = knob(1, "Micro-batches per optimizer step.")
    lr: float = knob(2e-4, "Peak recovery learning rate (AdamW; 2e-4 beat 5e-5 for KD at equal compute on every "
                                "seed measured, docs/BENCHMARKS.md §5).")
    lr_schedule: str = knob("cosine", "Learning-rate schedule after a short linear warmup: cosine | constant.",
                            "iterabre.recovery:LR_SCHEDULES")
    warmup_frac: float = knob(0.05, "Fraction of recovery steps spent warming up.")
    weight_decay: float = knob(0.0, "AdamW weight decay.")
    temperature: float = knob(1.0, "KD softmax temperature (the loss is scaled by T^2).")
    kd_weight: float = knob(1.0, "Weight of forward KL(teacher || student).")
    ce_weight: float = knob(0.0, "Weight of next-token cross-entropy on the text.")
    hidden_weight: float = knob(0.0, "Weight of the MSE between final hidden states.")
    trainable: str = knob("all", "What recovery trains: all | lora | adjacent (blocks next to the removed ones).",
                          "iterabre.recovery:TRAINABLE")
    lora_rank: int = knob(8, "LoRA rank when trainable is lora (or method is lora-kd).")
    lora_alpha: int = knob(16, "LoRA alpha.")
    grad_checkpointing: bool = knob(False, "Trade compute for memory on big models.")
    bf16: bool = knob(True, "bf16 autocast on CUDA (ignored on CPU).")
    max_loss_ratio: float = knob(4.0, "Guard: abort and restore if the loss exceeds this ratio of the first loss.")
    early_stop_tokens: int = knob(0, "> 0: held-out KD loss every this many tokens, stop on a plateau.")
    early_stop_tol: float = knob(0.01, "Plateau = relative held-out improvement below this.")
    ridge: float = knob(0.3, "reconstruct: ridge relative to the mean Gram diagonal, pulls towards the current "
                             "weights (0.3 measured best on SmolLM2).")
    reconstruct_tokens: int = knob(16384, "reconstruct: non-padding tokens the least-squares fit reads, the first "
                                          "recovery windows that reach it (0: all of them; reconstruct+kd gives KD "
                                          "the whole budget while the fit reads only these; 16384 beat 4096 at "
                                          "equal compute, docs/BENCHMARKS.md §5).")
    block_recon_blocks: str = knob("before", "block-recon: which kept blocks train at each gap: before (the one "
                                             "before it) | both (before and after, together).",
                                   "iterabre.blockrecon:TRAINED_BLOCKS")
    block_recon_tokens: int = knob(4096, "block-recon: tokens captured per gap as (pruned input, dense target) "
                                         "pairs, from this phase's recovery windows (capped by them) or, with "
                                         "calibration=self-generated, from that many generated tokens.")
    block_recon_steps: int = knob(100, "block-recon: Adam steps per gap.")
    block_recon_lr: float = knob(3e-3, "block-recon: peak Adam learning rate (warmup_frac, lr_schedule as KD; "
                                       "3e-3 beat 1e-4..1e-3 in a short SmolLM2 sweep).")
    block_recon_batch_size: int = knob(8, "block-recon: windows per Adam step.")
    block_recon_buffer: int = knob(4096, "block-recon: memory cap, tokens of (input, target) pairs held at once; "
                                         "more tokens are captured and trained in chunks.")
    seed: int = knob(0, "Recovery data order and adapter init.")


@dataclass
class CompressConfig:
    """One compression job: which model, how small, how to score, how to heal."""

    model: str = knob("smollm2-135m", "Embedded name, local folder, .gguf file or hub id.")
    revision: str | None = knob(None, "Hub revision (commit or tag) when the model is a hub id.")
    target_layers: int | None = knob(None, "Blocks to keep at the end (or give a target ratio).")
    target_ratio: float | None = knob(None, "Fraction of blocks to keep, e.g. 0.8.")
    scorer: str = knob("select", "How blocks are chosen: output (IteRABRe: how little the final hidden states "
                                 "change without the block) | angular (the contiguous run whose input and output "
                                 "are closest) | block-influence (ShortGPT) | perplexity (SLEB) | select (each "
                                 "scorer of select_from proposes its blocks; the set whose removal as a whole "
                                 "changes the final hidden states least goes: best measured at equal compute with "
                                 "recovery auto, docs/BENCHMARKS.md §5).",
                       "iterabre.scorers:REMOVAL_RULES")
    select_from: str = knob("output,angular", "select: comma list of the scorers whose removals are compared "
                                              "(ties go to the one named first).")
    schedule: str = knob("one-shot", "one-shot (score once, remove all, recover once: best at equal compute, "
                                     "docs/BENCHMARKS.md §5) | iterative (IteRABRe).", SCHEDULES)
    blocks_per_step: int = knob(1, "Blocks removed per iteration (iterative schedule).")
    teacher: str = knob("base", "Whom the student distils from: base | previous.", TEACHERS)
    calibration: str = knob("wikitext", "Text that scores blocks and that block-recon / reconstruct fit on: wikitext | "
                                        "self-generated (sampled from the base model; KD trains on wikitext).",
                           CALIBRATIONS)
    calibration_tokens: int = knob(2048, "Tokens used to score blocks.")
    recovery_tokens: int = knob(8192, "Total recovery budget over all steps (paper: 2.5M).")
    budget_schedule: str = knob("increasing", "Split of the recovery budget: equal | increasing | final | adaptive "
                                              "(increasing won docs/BENCHMARKS.md §7).",
                                BUDGET_SCHEDULES)
    final_share: float = knob(0.2, "final: share of the budget spent after the last removal.")
    adaptive_eval_tokens: int = knob(1024, "adaptive: tokens between held-out KD checks.")
    adaptive_tol: float = knob(0.01, "adaptive: stop a step when held-out KD improves by less (relative).")
    seq_len: int = knob(128, "Tokens per calibration / recovery sequence.")
    seed: int = knob(0, "Seed for data sampling, training and generation.")
    device: str = knob("auto", "auto | cpu | cuda.")
    dtype: str = knob("auto", "Dtype of the loaded weights: auto (bfloat16 on CUDA, float32 on CPU) | float32 | "
                              "bfloat16; trained weights keep float32 master copies.", DTYPES)
    num_processes: int = knob(1, "Processes sharing each recovery, started by torchrun (configs/torchrun.yaml); "
                                 "one per GPU.")
    fsdp: bool = knob(False, "Shard student and teacher over the processes with FSDP2 (default: DDP, a whole "
                             "copy per process).")
    allow_remote_code: bool = knob(False, "Allow models that ship their own Python code (trust_remote_code).")
    allow_pickle: bool = knob(False, "Allow .bin/.pt (pickle) weights.")
    output: str = knob("outputs/run", "Folder for final/, step checkpoints and report.json.")
    eval_tasks: str = knob("wikitext,blimp,xcopa", "Comma-separated lm-eval tasks run on base and final model "
                                                   "('' = none).")
    eval_limit: float | None = knob(0.02, "Per-task limit: fraction (<1), count or none (the full suite: "
                                          "~3 core-hours for SmolLM2 on CPU, docs/EVALUATION.md).")
    eval_parallelize: bool = knob(False, "Evaluate with the model split over every visible GPU (lm-eval's "
                                         "parallelize=True: accelerate's device_map='auto'), for models larger "
                                         "than one device.")
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig, metadata={"help": "Recovery per step."})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressConfig":
        data = dict(data)
        recovery = RecoveryConfig(**data.pop("recovery", {}) or {})
        return cls(**data, recovery=recovery)

    def fingerprint(self) -> str:
        """Stable hash of everything that changes the result (not the output path)."""
        data = self.to_dict()
        data.pop("output")
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class FlowOptions:
    """Options of the flow that are not part of the job: they never change the model or its fingerprint."""

    eval_every_step: bool = knob(False, "Evaluate after every step too (slower; per-step metrics in the report).")
    min_blimp_retained: float = knob(0.9, "Champion gate: final BLiMP accuracy / base accuracy at least this.")
    max_ppl_ratio: float = knob(1.5, "Champion gate: final wikitext perplexity / base perplexity at most this.")
    log_checkpoints: bool = knob(True, "Log every step's checkpoint to MLflow as an artifact.")
    keep_pruned: bool = knob(False, "Keep each step's pruned, not yet healed copy (debugging; costs disk).")


def help_of(cls: type, name: str) -> str:
    """The one-line help of field `name` of dataclass `cls`."""
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """Allowed values of a field (None: any); a 'module:NAME' reference is imported only now."""
    choices = f.metadata.get("choices")
    if isinstance(choices, str):  # the registry lives with its code (torch), so it is read lazily
        module, name = choices.split(":")
        choices = getattr(importlib.import_module(module), name)
    return None if choices is None else tuple(choices)


# ---------------------------------------------------------------- checks

def one_of(value: str, allowed, what: str) -> None:
    """Raise unless `value` is one of `allowed`."""
    if value not in allowed:
        raise IterabreError(f"unknown {what} {value!r}.", f"use one of {', '.join(allowed)}")


def budget_schedule_name(name: str) -> str:
    """`name` if it is a budget schedule; IterabreError otherwise."""
    one_of(name, BUDGET_SCHEDULES, "budget_schedule")
    return name


def _check_choices(obj, prefix: str = "") -> None:
    """Every field that declares its allowed values holds one of them."""
    for f in dataclasses.fields(obj):
        allowed = choices_of(f)
        if allowed is not None:
            value = getattr(obj, f.name)
            one_of(value, allowed, prefix + f.name)


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
    """The budget schedule's knobs are usable."""
    if not 0 <= cfg.final_share < 1:
        raise IterabreError(f"final_share={cfg.final_share} must be in [0, 1).", "pass e.g. --final-share 0.2")
    if cfg.adaptive_eval_tokens < 1 or not cfg.adaptive_tol >= 0:
        raise IterabreError(f"need adaptive_eval_tokens >= 1 and adaptive_tol >= 0 (got {cfg.adaptive_eval_tokens}, "
                            f"{cfg.adaptive_tol}).", "pass e.g. --adaptive-eval-tokens 1024 --adaptive-tol 0.01")


def check_recovery(rec: RecoveryConfig) -> None:
    """Recovery settings the loop can run with: names that exist, sizes and rates in range."""
    _check_choices(rec, "recovery ")
    if rec.tokens < 0 or rec.batch_size < 1 or rec.grad_accum < 1:
        raise IterabreError(f"recovery needs tokens >= 0, batch_size >= 1, grad_accum >= 1 (got {rec.tokens}, "
                            f"{rec.batch_size}, {rec.grad_accum}).", "fix the recovery settings")
    if rec.early_stop_tokens < 0 or not rec.early_stop_tol >= 0:
        raise IterabreError(f"recovery needs early_stop_tokens >= 0 and early_stop_tol >= 0 (got "
                            f"{rec.early_stop_tokens}, {rec.early_stop_tol}).", "fix the recovery settings")
    if rec.reconstruct_tokens < 0:
        raise IterabreError(f"reconstruct_tokens={rec.reconstruct_tokens} must be >= 0 (0: every recovery token).",
                            "pass e.g. --reconstruct-tokens 4096")
    if not rec.lr > 0 or not 0 <= rec.warmup_frac < 1:
        raise IterabreError(f"recovery needs lr > 0 and 0 <= warmup_frac < 1 (got {rec.lr}, {rec.warmup_frac}).",
                            "fix the recovery settings")


def _check_processes(cfg: CompressConfig, device: str) -> None:
    """A process count the recovery can use: >= 1, FSDP only with several, one GPU and one sequence each."""
    n = cfg.num_processes
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise IterabreError(f"num_processes={n!r} must be an integer >= 1.",
                            "pass --num-processes 1 (one process) or the number of GPUs to use")
    if cfg.fsdp and n < 2:
        raise IterabreError("--fsdp shards the models over several processes, but num_processes is 1.",
                            "pass --num-processes 2 or more with --fsdp, or drop --fsdp")
    if cfg.recovery.batch_size < n:  # each process trains on its rows of every micro-batch
        raise IterabreError(f"recovery batch_size={cfg.recovery.batch_size} is smaller than num_processes={n}, "
                            "so some process would get no sequence.", f"pass --batch-size {n} or more")
    if device.startswith("cuda") and n > 1:
        import torch

        if n > torch.cuda.device_count():
            raise IterabreError(f"num_processes={n} but only {torch.cuda.device_count()} CUDA GPUs are visible.",
                                "pass --num-processes at most the number of GPUs (one process per GPU)")


def select_rules(select_from: str) -> list[str]:
    """The scorer names of a select_from value, in order."""
    return [n.strip() for n in select_from.split(",") if n.strip()]


def _check_select(cfg: CompressConfig) -> None:
    """select_from names two or more distinct scorers (not `select` itself)."""
    from iterabre.scorers import SCORERS

    names = select_rules(cfg.select_from)
    bad = [n for n in names if n not in SCORERS]
    if bad or len(set(names)) != len(names) or (cfg.scorer == "select" and len(names) < 2):
        raise IterabreError(f"select_from={cfg.select_from!r} must name two or more distinct scorers"
                            + (f" ({', '.join(bad)} is not one)." if bad else "."),
                            f"pass e.g. --select-from output,angular (scorers: {', '.join(SCORERS)})")


def _as_declared(value, annotation: str):
    """An int given for a float field becomes a float (JSON and Prefect turn 2 into 2.0 or back)."""
    if isinstance(value, int) and not isinstance(value, bool) and annotation.startswith("float"):
        return float(value)
    return value


def normalise(cfg: CompressConfig) -> CompressConfig:
    """Same config with numbers in their declared types, so equal jobs get equal fingerprints."""
    def fix(obj):
        return {f.name: _as_declared(getattr(obj, f.name), str(f.type)) for f in dataclasses.fields(obj)
                if f.name != "recovery"}
    return CompressConfig(**fix(cfg), recovery=RecoveryConfig(**fix(cfg.recovery)))


def validate(cfg: CompressConfig) -> None:
    """Refuse a bad job before any compute: names, ranges, device, target, model files, output path."""
    from iterabre.devices import resolve_device
    from iterabre.files import check_unlocked
    from iterabre.models import check_local_model
    from iterabre.paths import require_dir_or_absent

    if not cfg.model:
        raise IterabreError("no model was given.", "pass --model (embedded name, folder, .gguf or hub id)")
    _check_target(cfg)
    _check_choices(cfg)
    _check_budget(cfg)
    _check_sizes(cfg)
    check_recovery(cfg.recovery)
    if cfg.calibration == "self-generated" and (cfg.recovery.method.startswith("reconstruct")
                                                or cfg.recovery.method == "auto") \
            and not cfg.recovery.reconstruct_tokens:
        raise IterabreError("calibration=self-generated with recovery reconstruct needs reconstruct_tokens > 0: "
                            "how many tokens to generate for the fit.", "pass e.g. --reconstruct-tokens 4096")
    _check_select(cfg)
    _check_processes(cfg, resolve_device(cfg.device))
    check_local_model(cfg.model, cfg.allow_pickle)  # a broken model folder fails now, not minutes later
    require_dir_or_absent(cfg.output, "--output", "pass a folder path (a new one, or an earlier job's output)")
    check_unlocked(cfg.output)
    if cfg.eval_tasks.strip():
        from iterabre.evaluation import parse_tasks

        parse_tasks(cfg.eval_tasks)
