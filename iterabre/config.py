"""Configuration dataclasses: one field per knob, each with a comment saying why it exists.

`CompressConfig` is what `iterabre compress` and the Prefect flow take; it is plain data
(JSON-serialisable) so it can be hashed for caching and logged to MLflow as parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field


@dataclass
class RecoveryConfig:
    """How one recovery (healing) phase trains the pruned student."""

    method: str = "kd"  # none | kd | lora-kd | reconstruct | reconstruct+kd
    tokens: int = 4096  # budget of this phase; the loop sets it from the total budget
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5  # peak learning rate (AdamW)
    lr_schedule: str = "cosine"  # cosine | constant (after a short linear warmup)
    warmup_frac: float = 0.05  # fraction of steps spent warming up
    weight_decay: float = 0.0  # AdamW weight decay
    temperature: float = 1.0  # KD softmax temperature (loss is scaled by T^2)
    kd_weight: float = 1.0  # weight of forward KL(teacher || student)
    ce_weight: float = 0.0  # weight of next-token cross-entropy on the text
    hidden_weight: float = 0.0  # weight of MSE between final hidden states
    trainable: str = "all"  # all | lora | adjacent (blocks next to the removed one)
    lora_rank: int = 8  # LoRA rank when trainable == lora (or method == lora-kd)
    lora_alpha: int = 16  # LoRA alpha
    grad_checkpointing: bool = False  # trade compute for memory on big models
    bf16: bool = True  # bf16 autocast when on CUDA (ignored on CPU)
    max_loss_ratio: float = 4.0  # guard: abort + restore if loss > ratio * first loss
    early_stop_tokens: int = 0  # > 0: held-out KD loss every this many tokens, stop on a plateau
    early_stop_tol: float = 0.01  # plateau = relative held-out improvement below this
    ridge: float = 0.3  # reconstruct: ridge (relative to mean Gram diagonal), pulls towards current weights; 0.3 measured best on SmolLM2
    seed: int = 0  # data order and init of adapters


@dataclass
class CompressConfig:
    """One compression job: which model, how small, how to score, how to heal."""

    model: str = "smollm2-135m"  # embedded name, local dir, .gguf file or hub id
    revision: str | None = None  # hub revision (commit/tag) when model is a hub id
    target_layers: int | None = None  # blocks to keep at the end (or use target_ratio)
    target_ratio: float | None = None  # fraction of blocks to keep, e.g. 0.8
    scorer: str = "output"  # output | block-influence | angular | perplexity
    schedule: str = "iterative"  # iterative (IteRABRe) | one-shot (baseline)
    blocks_per_step: int = 1  # blocks removed per iteration (iterative schedule)
    teacher: str = "base"  # base | previous: whom the student distils from
    calibration: str = "wikitext"  # wikitext | self-generated
    calibration_tokens: int = 2048  # tokens used to score blocks
    recovery_tokens: int = 8192  # total recovery budget over all steps (paper: 2.5M)
    budget_schedule: str = "increasing"  # equal | increasing | final | adaptive; increasing won docs/BENCHMARKS.md §7
    final_share: float = 0.2  # budget_schedule=final: share of the total spent after the last removal
    adaptive_eval_tokens: int = 1024  # budget_schedule=adaptive: tokens between held-out KD checks
    adaptive_tol: float = 0.01  # budget_schedule=adaptive: stop when held-out KD improves < this (relative)
    seq_len: int = 128  # tokens per calibration / recovery sequence
    seed: int = 0  # seeds data sampling, training and generation
    device: str = "auto"  # auto | cpu | cuda
    allow_remote_code: bool = False  # trust_remote_code models need an explicit yes
    allow_pickle: bool = False  # .bin (pickle) weights need an explicit yes
    output: str = "outputs/run"  # where final/, step checkpoints and report.json go
    eval_tasks: str = "wikitext,blimp,xcopa"  # lm-eval tasks run on base and final model
    eval_limit: float | None = 0.02  # per-task limit: fraction (<1) or count; None = full (~2 min on CPU)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)  # recovery per step

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
