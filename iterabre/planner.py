"""Memory planner: the peak memory of each phase of a compression job, per process, from config.json alone.

A job loads the base model, scores its blocks, heals each pruned student by distillation
and evaluates the result. Each phase's peak is estimated from counts and shapes only: the
parameter counts come from building the model on the meta device (no weights, no download),
the rest from the job's sizes. So a 70B job can be planned on a laptop, and `iterabre
compress` can refuse a job that cannot fit before it computes anything.

The math is a set of small pure functions of counts and shapes; each term says which tensors
it stands for. The activation terms were counted with autograd's saved-tensor hooks on Llama
blocks (tests/test_planner.py checks the formula against such a count), the KD logits terms
follow what `iterabre.kd` materialises, and the whole recovery estimate is checked against
measured peak RSS by bench/planner.py (docs/BENCHMARKS.md, section 8).

Phases (`PHASES`):
- load:      prepare-base reads the model on the host CPU (float32) to save it as safetensors.
- generate:  only with calibration=self-generated: the whole base model samples its calibration
             text on one device, with a KV cache (steps.prepare_data -> iterabre.selfgen).
- score:     the current model plus the fast scorer's cached residual stream (steps.score).
- recovery:  teacher, student, gradients, AdamW state, activations (with or without gradient
             checkpointing) and KD logits; the first step is the biggest (largest student).
- evaluate:  lm-eval on the base model: wikitext's rolling windows hold two fp32 logits copies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from iterabre.config import CALIBRATIONS, CompressConfig, RecoveryConfig, one_of, select_rules
from iterabre.devices import available_ram
from iterabre.errors import IterabreError

GiB, MiB = 2**30, 2**20
PHASES = ("load", "generate", "score", "recovery", "evaluate")  # generate: self-generated calibration only
DTYPES = ("auto", "float32", "bfloat16")
BYTES = {"float32": 4, "bfloat16": 2}

# Fixed sizes of the code the planner models (kept next to the numbers they come from).
SCORE_BATCH = 4  # steps.score -> streamed_scores(batch_size=4)
GENERATE_BATCH = 8  # iterabre.selfgen.self_generated_calibration's batch_size default
HELDOUT_BATCH = 8  # recovery.kd_loss_on and reconstruct.relative_hidden_error batch size
KD_CHUNK = 512  # iterabre.kd.DEFAULT_CHUNK: rows per fp32 softmax chunk
EVAL_BATCH = 8  # steps.evaluate -> lm-eval batch size
ROLLING_LOGITS_BUDGET = 4 * GiB  # iterabre.evaluation.harness.ROLLING_LOGITS_BUDGET
EVAL_LONGEST_DOC = 17_358  # tokens of the longest wikitext-2 test article (SmolLM2 tokenizer, measured)
EVAL_CHOICE_TOKENS = 64  # BLiMP / XCOPA requests are one short sentence
# What a process holds besides the itemised tensors. CPU: the imports (torch, transformers,
# peft, iterabre) measured 240 MiB RSS in bench/planner.py; the rest is an allowance, not an
# itemised term, for what the measured peaks held beyond the terms below (allocator caching,
# lazily imported code, autograd bookkeeping): with it the SmolLM2 estimates still came out
# 2-9 % under the measured peak (docs/BENCHMARKS.md §8). CUDA: context, cuBLAS workspace and
# allocator slack (on an H200 the context took 619 MiB; with expandable segments the peak reservation
# was within 0.6 GiB of the allocated peak, 4.4 GiB for full-weight KD of an 8B model, whose total
# the estimate still matched within 3 %: docs/BENCHMARKS.md §8).
RUNTIME_BYTES = {"cpu": 600 * MiB, "cuda": 1 * GiB}
FSDP_TRIES = (2, 4, 8)


# ---------------------------------------------------------------- model counts (meta device)

@dataclass(frozen=True)
class ModelCounts:
    """What the planner needs to know about a model: counts and shapes, no weights."""

    name: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width: kv heads x head dim (GQA)
    vocab: int
    max_positions: int
    total_params: int
    block_params: int  # the largest decoder block
    root_params: int  # everything outside the blocks: embeddings, LM head (untied), final norm
    lora_width: int  # sum of in + out features over one block's linear layers (LoRA params per rank)
    linears: int  # linear layers per block (LoRA adapters per block)
    tied: bool
    ffn: int = 0  # widest per-token MLP intermediate (MoE: the experts a token visits), streaming.ffn_width
    file_bytes: int = 4  # bytes per parameter of the checkpoint on disk (config.json's dtype)

    def params_with(self, blocks: int) -> int:
        """Parameters of the model cut to `blocks` decoder blocks."""
        return self.root_params + blocks * self.block_params


def _config_int(config, *names: str, default: int | None = None) -> int | None:
    """The first attribute of `names` the config has (families name the same size differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return default


def _linear_width(module) -> int:
    """in + out features of a Linear or GPT-2 Conv1D layer (a LoRA adapter of rank r has r times this)."""
    weight = module.weight  # Linear: [out, in]; Conv1D: [in, out]; either way the sum of both sides
    return int(weight.shape[0] + weight.shape[1])


def counts_from_config(config, name: str = "") -> ModelCounts:
    """Counts of `config`'s model, built on the meta device (no memory, no weights, ~0.1 s for 70B)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from iterabre.streaming import ffn_width
    from iterabre.surgery import decoder_blocks

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise IterabreError(f"{name or 'the config'} does not describe a causal LM transformers can build "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).",
                            "pass the config.json of a decoder-only model (Llama, Qwen, Mistral, ...)") from None
    blocks = decoder_blocks(model)
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = sum(p.numel() for p in model.parameters())  # tied weights are one parameter: counted once
    linears = [m for m in blocks[0].modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _config_int(text, "hidden_size", "n_embd", "d_model")
    heads = _config_int(text, "num_attention_heads", "n_head")
    head_dim = _config_int(text, "head_dim", default=hidden // heads)
    out_emb = model.get_output_embeddings()
    return ModelCounts(
        name=name, num_layers=len(blocks), hidden=hidden,
        intermediate=_config_int(text, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        heads=heads, kv_dim=_config_int(text, "num_key_value_heads", default=heads) * head_dim,
        vocab=int(text.vocab_size), max_positions=_config_int(text, "max_position_embeddings", "n_positions",
                                                             default=2048),
        total_params=total, block_params=max(block_sizes), root_params=total - sum(block_sizes),
        lora_width=sum(_linear_width(m) for m in linears), linears=len(linears),
        tied=out_emb is not None and out_emb.weight is model.get_input_embeddings().weight,
        ffn=ffn_width(text), file_bytes=_file_bytes(text))


def _file_bytes(config) -> int:
    """Bytes per parameter of the saved weights, from config.json's dtype (float32 when it says none)."""
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return 2 if name.removeprefix("torch.") in ("bfloat16", "float16") else 4


# ---------------------------------------------------------------- finding config.json

def config_file(spec: str, revision: str | None = None) -> Path | None:
    """config.json of a model spec on this machine without reading weights or using the network.

    A folder or a config.json path: that file (IterabreError when a folder has none). An embedded
    name: its pulled folder's file (None before `iterabre models pull`). A hub id: the file in the
    local hub cache (None when it was never fetched). A .gguf file: None (it has no config.json).
    """
    from iterabre.embedded import EMBEDDED
    from iterabre.paths import models_dir

    path = Path(spec).expanduser()
    if spec in EMBEDDED:
        found = models_dir() / spec / "config.json"
        return found if found.is_file() else None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise IterabreError(f"{spec} has no config.json.", "pass a model folder made by save_pretrained "
                                                               "(or a config.json file) to plan from")
        return path / "config.json"
    if path.is_file():
        return path if path.suffix == ".json" else None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise IterabreError(f"{spec} does not exist.", "pass a model folder, a config.json file, an embedded "
                                                       "name or a hub id")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json", revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def read_config(path: Path):
    """A transformers config from a config.json file; one line when it is not one."""
    from transformers import AutoConfig

    try:
        raw = json.loads(path.read_text())
        model_type = raw.pop("model_type")
        return AutoConfig.for_model(model_type, **raw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IterabreError(f"{path} is not a readable model config ({type(e).__name__}: {e}).",
                            "pass the config.json of a Hugging Face causal LM") from None


def counts_for(spec: str, revision: str | None = None) -> ModelCounts | None:
    """ModelCounts of a model spec from its local config.json; None when there is none here."""
    path = config_file(spec, revision)
    return None if path is None else counts_from_config(read_config(path), spec)


# ---------------------------------------------------------------- sizes from strings and the machine

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '16GB', '512 MiB', '1e9' -> bytes (GB = 10^9, GiB = 2^30); one line when it does not parse."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise IterabreError(f"memory size {text!r} does not parse.",
                            "write a positive number with a unit, e.g. 80GiB, 16GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def machine_memory(device: str) -> int:
    """What this machine has for `device`: the first GPU's total memory, or the available RAM."""
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    return available_ram()


def human(n: int | None) -> str:
    """Bytes as GiB with one decimal (MiB under 1 GiB)."""
    if n is None:
        return "-"
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# ---------------------------------------------------------------- the job

@dataclass(frozen=True)
class Job:
    """The settings that decide memory: what is trained, in which precision, on how many processes."""

    target_layers: int
    # Every default but `device` is `iterabre compress`'s, read from the config (one place for each).
    schedule: str = CompressConfig.schedule
    blocks_per_step: int = CompressConfig.blocks_per_step
    method: str = RecoveryConfig.method
    trainable: str = RecoveryConfig.trainable
    lora_rank: int = RecoveryConfig.lora_rank
    dtype: str = CompressConfig.dtype  # auto: bfloat16 on CUDA, float32 on the CPU
    device: str = "cpu"
    num_processes: int = CompressConfig.num_processes
    fsdp: bool = CompressConfig.fsdp
    batch_size: int = RecoveryConfig.batch_size  # global micro-batch, split over the processes
    seq_len: int = CompressConfig.seq_len
    calibration_tokens: int = CompressConfig.calibration_tokens
    grad_checkpointing: bool = RecoveryConfig.grad_checkpointing  # asked for; the planner may switch it on by itself
    scorer: str = CompressConfig.scorer
    select_from: str = CompressConfig.select_from  # scorer=select: every rule's pass, then the sets' walk
    eval_tasks: str = CompressConfig.eval_tasks
    eval_parallelize: bool = CompressConfig.eval_parallelize  # weights split over the GPUs (num_processes)
    calibration: str = CompressConfig.calibration  # self-generated adds the generate phase
    bf16: bool = RecoveryConfig.bf16  # recovery's bf16 autocast on CUDA: bf16 compute for float32 weights too


def working_dtype(job: Job) -> str:
    """The dtype weights and activations live in: auto is bfloat16 on CUDA, float32 on the CPU."""
    if job.dtype == "auto":
        return "bfloat16" if job.device.startswith("cuda") else "float32"
    return job.dtype


def compute_dtype(job: Job) -> str:
    """The dtype recovery computes in: bfloat16 under CUDA autocast (float32 weights too), else the working dtype."""
    return "bfloat16" if _cuda(job) and job.bf16 else working_dtype(job)


def trains(job: Job) -> str | None:
    """What recovery trains: 'all', 'adjacent', 'lora', or None for the methods without backprop.

    block-recon trains the kept blocks next to each gap on their own (iterabre.blockrecon): planned
    as adjacent KD, an upper bound (its activations span one or two blocks, not the whole student).
    """
    if job.method in ("none", "reconstruct"):
        return None
    if job.method == "block-recon":
        return "adjacent"
    return "lora" if job.method == "lora-kd" else job.trainable


def removed_per_step(job: Job, layers: int) -> int:
    """Blocks the biggest recovery phase follows: one step's, or all of them in one shot."""
    return layers - job.target_layers if job.schedule == "one-shot" else min(job.blocks_per_step,
                                                                               layers - job.target_layers)


def per_process_batch(job: Job) -> int:
    """Sequences one process runs per micro-batch: the global micro-batch split over the processes."""
    return math.ceil(job.batch_size / job.num_processes)


def _cuda(job: Job) -> bool:
    return job.device.startswith("cuda")


# ---------------------------------------------------------------- pure terms (bytes)

# Bytes autograd saves per token per decoder block = h*hidden + k*kv_dim + i*intermediate
# + 4*heads (SDPA's fp32 log-sum-exp) + 8, by how the block takes part in backward and the
# dtype of its weights. Counted with saved-tensor hooks on Llama blocks (SwiGLU MLP, SDPA
# attention); the fits were exact over seven shapes, and tests/test_planner.py repeats the count.
# trained: norm inputs/outputs, q, rotated q/k, attention out, o_proj/gate/up/down inputs, ...
# frozen:  a block gradients pass through (linear inputs are not kept: no weight gradient).
# lora:    frozen base plus each adapter's input (in float32: peft keeps adapters in float32,
#          so a bf16 block keeps float32 copies of its linear inputs) and r-wide outputs.
ACTIVATION_COEFFS = {  # (mode, dtype) -> (h, k, i)
    ("trained", "float32"): (32, 8, 16), ("trained", "bfloat16"): (20, 4, 8),
    ("frozen", "float32"): (16, 8, 12), ("frozen", "bfloat16"): (12, 4, 6),
    ("lora", "float32"): (24, 8, 16), ("lora", "bfloat16"): (36, 4, 10),
}


def activation_bytes_per_token(m: ModelCounts, dtype: str, mode: str = "trained", lora_rank: int = 0) -> int:
    """Bytes one block saves for backward per token (ACTIVATION_COEFFS; LoRA adds 4 * r per linear)."""
    h, k, i = ACTIVATION_COEFFS[(mode, dtype)]
    lora = 4 * lora_rank * m.linears if mode == "lora" else 0
    return h * m.hidden + k * m.kv_dim + i * m.intermediate + 4 * m.heads + 8 + lora


def block_modes(job: Job, blocks: int, removed: int) -> dict[str, int]:
    """How many student blocks keep activations, by mode. Adjacent: the trained blocks and every
    block after the first of them; which ones depends on the scores, so plan the worst case
    (the first trained block is block 0: every block keeps its activations)."""
    mode = trains(job)
    if mode == "lora":
        return {"lora": blocks}
    if mode == "adjacent":
        trained = min(2 * removed, blocks)
        return {"trained": trained, "frozen": blocks - trained}
    return {"trained": blocks}


def saved_activations(m: ModelCounts, tokens: int, modes: dict[str, int], dtype: str, checkpointing: bool,
                      lora_rank: int = 0) -> int:
    """What the student's forward keeps for backward, for `tokens` tokens through the blocks in `modes`.

    Checkpointing keeps each block's input (hidden-wide) and recomputes one block at a time in
    backward, so one block's full set exists at once.
    """
    per = {mode: activation_bytes_per_token(m, dtype, mode, lora_rank) for mode in modes}
    outside = 13 * m.hidden if BYTES[dtype] == 4 else 9 * m.hidden  # embeddings, final norm, head input
    if checkpointing:
        return tokens * (sum(modes.values()) * m.hidden * BYTES[dtype] + max(per.values()) + outside)
    return tokens * (sum(n * per[mode] for mode, n in modes.items()) + outside)


def inference_transient(m: ModelCounts, tokens: int, dtype: str) -> int:
    """Peak inside one block's no-grad forward: hidden-wide and MLP-wide temporaries."""
    return tokens * BYTES[dtype] * (6 * m.hidden + 2 * m.kv_dim + 3 * m.intermediate)


def kd_logits(m: ModelCounts, tokens: int, dtype: str) -> int:
    """Logits a KD training step holds at its peak (iterabre.kd): student and teacher logits [N,V],
    the logits' gradient [N,V] (same dtype), and fp32 chunks of KD_CHUNK rows (softmaxes, plus the
    float32 copies of low-precision logits)."""
    b, chunk = BYTES[dtype], min(tokens, KD_CHUNK) * m.vocab * 4
    forward = 2 * tokens * m.vocab * b + (2 if b == 4 else 4) * chunk  # s, t + p, q (+ zs, zt copies)
    backward = 3 * tokens * m.vocab * b + (1 if b == 4 else 3) * chunk  # s, t, grad + q (+ copies)
    return max(forward, backward)


def heldout_windows(job: Job) -> int:
    """Windows in one held-out KD batch: the held-out set is as big as the calibration set
    (steps.prepare_data), evaluated HELDOUT_BATCH windows at a time."""
    return min(HELDOUT_BATCH, math.ceil(job.calibration_tokens / job.seq_len))


def heldout_logits(m: ModelCounts, tokens: int, dtype: str) -> int:
    """The no-grad held-out KD loss over `tokens` tokens: both models' logits plus fp32 chunks."""
    return 2 * tokens * m.vocab * BYTES[dtype] + (2 if BYTES[dtype] == 4 else 4) * min(tokens, KD_CHUNK) \
        * m.vocab * 4


def trainable_params(m: ModelCounts, job: Job, student_blocks: int, removed: int) -> int:
    """Parameters recovery optimises: the whole student, the blocks next to the removed ones
    (at most two per removed block), or LoRA adapters on every linear layer of every block."""
    mode = trains(job)
    if mode is None:
        return 0
    if mode == "lora":
        return job.lora_rank * m.lora_width * student_blocks
    if mode == "adjacent":
        return min(2 * removed, student_blocks) * m.block_params
    return m.params_with(student_blocks)


def reconstruct_stats(m: ModelCounts) -> int:
    """reconstruct's float64 Gram matrices for one down_proj: X^T X [I+1, I+1] and X^T Y [I+1, H]."""
    return 8 * (m.intermediate + 1) * (m.intermediate + 1 + m.hidden)


# ---------------------------------------------------------------- phases

@dataclass
class PhaseEstimate:
    """One phase's peak per process, by component (bytes), and whether it fits its limit."""

    phase: str
    where: str  # "device" (the GPU, or RAM on the CPU) or "host" (RAM of a GPU machine)
    parts: dict[str, int]
    processes: int = 1  # processes sharing this memory (RAM is shared on the CPU)
    limit: int | None = None  # None: not checked (a host phase planned for another machine)
    note: str = ""

    @property
    def per_process(self) -> int:
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        """What the limit is compared with: per process x the processes sharing the memory."""
        return self.per_process * self.processes

    @property
    def fits(self) -> bool | None:
        return None if self.limit is None else self.total <= self.limit

    def to_dict(self) -> dict:
        return {"phase": self.phase, "where": self.where, "bytes_per_process": self.per_process,
                "processes_sharing": self.processes, "bytes_total": self.total, "limit": self.limit,
                "fits": self.fits, "parts": dict(self.parts), "note": self.note}


def _runtime(job: Job) -> int:
    return RUNTIME_BYTES["cuda" if _cuda(job) else "cpu"]


def load_phase(m: ModelCounts, job: Job) -> PhaseEstimate:
    """prepare-base: the model read on the host in float32 (steps.prepare_base).

    A float32 checkpoint is memory-mapped and used in place (RSS grows as its pages are read);
    a bf16 one is converted, so its mapped pages and the float32 copy exist together.
    """
    parts = {"runtime": RUNTIME_BYTES["cpu"], "weights (float32)": 4 * m.total_params}
    if m.file_bytes != 4:
        parts["mapped checkpoint"] = m.file_bytes * m.total_params
    return PhaseEstimate("load", "host", parts, note="prepare-base loads on the CPU in float32")


def score_phase(m: ModelCounts, job: Job) -> PhaseEstimate:
    """score: the streamed scorer of steps.score, whose formula is streaming.memory_parts: two blocks,
    the embedding and head, one stream per candidate over the calibration tokens, one block call
    (a GPU run batches more candidates per call only into memory that is free)."""
    from iterabre.streaming import memory_parts

    size = BYTES[working_dtype(job)]
    rules = select_rules(job.select_from) if job.scorer == "select" else [job.scorer]
    passes = [(r, job.blocks_per_step if r == "angular" else 1) for r in rules]  # angular scores runs of k blocks
    if job.scorer == "select":  # then the sets' walk: the dense stream + one per set, like a pair scorer's n + 1
        passes.append(("block-influence", len(rules)))
    streamed = max((memory_parts(block=size * m.block_params, root=size * m.root_params, layers=m.num_layers,
                                 hidden=m.hidden, ffn=m.ffn, heads=m.heads, vocab=m.vocab,
                                 tokens=job.calibration_tokens, seq_len=job.seq_len, batch_size=SCORE_BATCH,
                                 itemsize=size, scorer=r, n=n) for r, n in passes),
                   key=lambda parts: parts["total"])  # the passes run one after another
    parts = {"runtime": _runtime(job), "two blocks": streamed["blocks"],
             "embedding, head": streamed["embedding_head"], "streams": streamed["streams"],
             "block call": streamed["activations"]}
    return PhaseEstimate("score", "device", parts)


def generate_phase(m: ModelCounts, job: Job) -> PhaseEstimate:
    """Self-generated calibration: the whole base model on one device (not streamed, not split), a KV
    cache of GENERATE_BATCH sequences of seq_len tokens, the last position's fp32 logits."""
    dtype = working_dtype(job)
    tokens = GENERATE_BATCH * job.seq_len
    parts = {"runtime": _runtime(job), "model": BYTES[dtype] * m.total_params,
             "KV cache": 2 * m.num_layers * tokens * m.kv_dim * BYTES[dtype],
             "logits (fp32)": GENERATE_BATCH * m.vocab * 4,
             "block forward": inference_transient(m, GENERATE_BATCH, dtype)}
    return PhaseEstimate("generate", "device", parts, note="whole model on one device")


def _sharded(n: int, job: Job) -> int:
    """Bytes per process of something FSDP shards over the processes."""
    return math.ceil(n / job.num_processes) if job.fsdp else n


def _moments(m: ModelCounts, job: Job, checkpointing: bool, n_train: int, modes: dict[str, int],
             root_trainable: int) -> dict[str, dict[str, int]]:
    """What recovery holds besides its static parts at each candidate peak moment.

    Gradients are set to None after every optimizer step, so they are allocated during backward
    while the saved activations are freed block by block: the sum of the two is largest at one of
    the ends. At the start of backward the activations, the KD logits and the gradient of the
    embeddings / LM head exist; at the optimizer step all gradients do. The held-out KD loss
    (no grad, batch HELDOUT_BATCH) runs before and after training.
    """
    # activations, logits and autocast's weight copies are in the compute dtype (a float32 model on CUDA
    # computes in bf16; measured on an H200, docs/BENCHMARKS.md §2)
    dtype, tokens = compute_dtype(job), per_process_batch(job) * job.seq_len
    held_tokens = heldout_windows(job) * job.seq_len
    held = {"held-out KD logits": heldout_logits(m, held_tokens, dtype),
            "block forward": inference_transient(m, held_tokens, dtype)}
    if not n_train:
        return {"held-out check": held}
    act = "activations (checkpointed)" if checkpointing else "activations"
    backward = {act: saved_activations(m, tokens, modes, dtype, checkpointing, job.lora_rank),
                "KD logits": kd_logits(m, tokens, dtype),
                "gradients (embeddings, head)": _sharded(4 * root_trainable, job)}
    if BYTES[dtype] == 2:  # bf16 autocast keeps a bf16 copy of each float32 trained weight until backward
        backward["autocast weight copies"] = _sharded(2 * n_train, job)
    return {"backward start": backward, "optimizer step": {"gradients": _sharded(4 * n_train, job)},
            "held-out check": held}


def recovery_parts(m: ModelCounts, job: Job, checkpointing: bool) -> tuple[dict[str, int], str]:
    """Components of the biggest recovery phase (the first step: the full teacher, the largest
    student) at its peak moment, and the name of that moment."""
    dtype, layers = working_dtype(job), m.num_layers
    removed = removed_per_step(job, layers)
    student_blocks = layers - removed
    wb, mode = BYTES[dtype], trains(job)
    n_train = trainable_params(m, job, student_blocks, removed)
    # Trained weights are upcast to float32 in place (recovery.float32_masters); the frozen rest
    # of the student stays in the working dtype. LoRA adapters are float32 (peft's default).
    dense = n_train if mode in ("all", "adjacent") else 0
    student = m.params_with(student_blocks)
    parts = {"runtime": _runtime(job), "teacher": _sharded(wb * m.total_params, job),
             "student": _sharded(wb * (student - dense) + 4 * n_train, job)}
    if n_train:
        parts["optimizer (AdamW, 2 fp32 states)"] = _sharded(8 * n_train, job)
        if dense and not _cuda(job):  # the loss guard's CPU copy of the trained weights (taken in the
            parts["restore copy"] = _sharded(wb * dense, job)  # working dtype); host RAM on a GPU
        if job.num_processes > 1 and not job.fsdp:  # DDP's gradient buckets: a second copy of the grads
            parts["gradient buckets (DDP)"] = 4 * n_train
    if job.fsdp and job.num_processes > 1:  # blocks all-gathered for compute (current + prefetched)
        gathered = 2 * m.block_params * wb + m.root_params * wb
        parts["all-gathered blocks (FSDP)"] = 2 * gathered if n_train else gathered  # teacher's and student's
    root_trainable = m.root_params if mode == "all" else 0
    modes = block_modes(job, student_blocks, removed)
    held = _moments(m, job, checkpointing, 0, modes, root_trainable)["held-out check"]  # a no-grad forward
    moments = {name: {**parts, **extra} for name, extra in
               _moments(m, job, checkpointing, n_train, modes, root_trainable).items()}
    if job.method.startswith("reconstruct") or job.method == "auto":  # auto may fit by least squares
        # The fit runs before any weight trains and frees its statistics before KD: both models in the
        # working dtype, a no-grad forward of a captured batch, the float64 Gram matrices of one down_proj.
        fit = {k: v for k, v in parts.items() if k in ("runtime", "teacher", "all-gathered blocks (FSDP)")}
        moments["least-squares fit"] = {**fit, "student": _sharded(wb * student, job), **held,
                                        "least-squares statistics (float64)": reconstruct_stats(m)}
    name = max(moments, key=lambda k: sum(moments[k].values()))
    return moments[name], name


def recovery_phase(m: ModelCounts, job: Job, checkpointing: bool) -> PhaseEstimate:
    """The recovery phase with or without gradient checkpointing."""
    parts, moment = recovery_parts(m, job, checkpointing)
    return PhaseEstimate("recovery", "device", parts,
                         note=f"peak at {moment}" + (", gradient checkpointing" if checkpointing else ""))


def evaluate_phase(m: ModelCounts, job: Job) -> PhaseEstimate:
    """lm-eval on the base model (the bigger of base and final). Rolling wikitext runs windows of
    up to the model's context (the longest article where that is longer) at a batch capped by
    the harness's logits budget, with two fp32 logits copies and a KV cache."""
    dtype = working_dtype(job)
    tasks = {t.strip() for t in job.eval_tasks.split(",") if t.strip()}
    split = job.num_processes if job.eval_parallelize and _cuda(job) else 1  # device_map="auto" over the GPUs
    parts = {"runtime": _runtime(job), "model": BYTES[dtype] * m.total_params // split}
    note = f"weights split over {split} GPUs" if split > 1 else ""
    if not tasks:
        return PhaseEstimate("evaluate", "device", parts, note="no tasks")
    if "wikitext" in tasks:
        window = min(m.max_positions, EVAL_LONGEST_DOC)
        batch = max(1, min(EVAL_BATCH, ROLLING_LOGITS_BUDGET // (2 * m.max_positions * m.vocab * 4)))
        tokens = batch * window
    else:
        tokens = EVAL_BATCH * EVAL_CHOICE_TOKENS
    parts["logits (2 fp32 copies)"] = 2 * tokens * m.vocab * 4
    parts["KV cache"] = 2 * m.num_layers * tokens * m.kv_dim * BYTES[dtype]
    parts["block forward"] = inference_transient(m, tokens, dtype)
    return PhaseEstimate("evaluate", "device", parts, note=note)


# ---------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Every phase's estimate for one job on one machine, the checkpointing decision and what would fit."""

    model: ModelCounts
    job: Job
    device_memory: int
    host_memory: int | None
    phases: list[PhaseEstimate]
    grad_checkpointing: bool  # what recovery should run with
    auto_checkpointing: bool  # True when the planner switched it on
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(p.fits is not False for p in self.phases)

    def phase(self, name: str) -> PhaseEstimate:
        return next(p for p in self.phases if p.phase == name)

    def failing(self) -> list[PhaseEstimate]:
        return [p for p in self.phases if p.fits is False]

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "job": dataclasses.asdict(self.job),
                "working_dtype": working_dtype(self.job), "device_memory": self.device_memory,
                "host_memory": self.host_memory, "fits": self.fits,
                "grad_checkpointing": {"on": self.grad_checkpointing, "auto": self.auto_checkpointing},
                "phases": [p.to_dict() for p in self.phases], "suggestions": list(self.suggestions)}


def _limits(phases: list[PhaseEstimate], job: Job, device_memory: int, host_memory: int | None) -> None:
    """Give each phase its limit; on the CPU every process shares the one RAM."""
    for p in phases:
        if p.where == "host":
            p.limit = device_memory if not _cuda(job) else host_memory
            p.processes = 1  # prepare-base runs once, before any worker starts
        else:
            p.limit = device_memory
            p.processes = job.num_processes if not _cuda(job) else 1


def estimate(m: ModelCounts, job: Job, device_memory: int, host_memory: int | None = None) -> Plan:
    """Every phase's peak; gradient checkpointing switches on when recovery fits only with it."""
    check_job(job, m)
    generate = [generate_phase(m, job)] if job.calibration == "self-generated" else []
    phases = [load_phase(m, job), *generate, score_phase(m, job), recovery_phase(m, job, job.grad_checkpointing),
              evaluate_phase(m, job)]
    _limits(phases, job, device_memory, host_memory)
    auto, rec = False, [p.phase for p in phases].index("recovery")
    if not job.grad_checkpointing and trains(job) and phases[rec].fits is False:
        with_ckpt = recovery_phase(m, job, True)
        _limits([with_ckpt], job, device_memory, host_memory)
        if with_ckpt.fits:
            phases[rec], auto = with_ckpt, True
            with_ckpt.note += " (switched on by the planner)"
    return Plan(m, job, device_memory, host_memory, phases, job.grad_checkpointing or auto, auto)


def _alternatives(m: ModelCounts, job: Job) -> list[tuple[str, Job]]:
    """Changes a user can make, one at a time, in the order they cost quality or speed least."""
    out = []
    if trains(job) == "all":
        out += [("--trainable lora", dataclasses.replace(job, trainable="lora")),
                ("--trainable adjacent", dataclasses.replace(job, trainable="adjacent"))]
    if trains(job) and not job.grad_checkpointing:
        out.append(("--grad-checkpointing", dataclasses.replace(job, grad_checkpointing=True)))
    if working_dtype(job) == "float32":
        out.append(("--dtype bfloat16", dataclasses.replace(job, dtype="bfloat16")))
    for n in FSDP_TRIES:
        if n > job.num_processes:
            out.append((f"--num-processes {n} --fsdp", dataclasses.replace(job, num_processes=n, fsdp=True)))
    if _cuda(job) and not job.eval_parallelize:  # evaluation split over the GPUs (helps with > 1 process)
        out.append(("--eval-parallelize", dataclasses.replace(job, eval_parallelize=True)))
    if job.calibration == "self-generated":  # generation holds the whole model on one device
        out.append(("--calibration wikitext", dataclasses.replace(job, calibration="wikitext")))
    for b in range(job.batch_size - 1, 0, -1):
        out.append((f"--batch-size {b}", dataclasses.replace(job, batch_size=b)))
    return out


def suggestions(m: ModelCounts, job: Job, device_memory: int, host_memory: int | None) -> list[str]:
    """The single changes that make every phase fit, with their recovery peak (first FSDP size and
    largest batch only); when none does alone, pairs of them."""
    singles = _alternatives(m, job)

    def fitting(cands):
        found, seen = [], set()
        for label, alt in cands:
            kind = label if label.startswith("--trainable") else label.split()[0]  # one FSDP size, one batch
            if kind in seen:
                continue
            plan = estimate(m, alt, device_memory, host_memory)
            if plan.fits:
                seen.add(kind)
                found.append(f"{label} ({human(plan.phase('recovery').total)})")
        return found

    found = fitting(singles)
    if found:
        return found
    pairs = [(f"{a} {b}", _merge(x, y, job)) for i, (a, x) in enumerate(singles) for b, y in singles[i + 1:]
             if a.split()[0] != b.split()[0]]
    return fitting([(label, alt) for label, alt in pairs if alt is not None])[:4]


def _merge(x: Job, y: Job, base: Job) -> Job | None:
    """Both changes of x and y relative to `base` (None when they touch the same field)."""
    dx = {f: getattr(x, f) for f in base.__dataclass_fields__ if getattr(x, f) != getattr(base, f)}
    dy = {f: getattr(y, f) for f in base.__dataclass_fields__ if getattr(y, f) != getattr(base, f)}
    return None if set(dx) & set(dy) else dataclasses.replace(base, **dx, **dy)


def plan(m: ModelCounts, job: Job, device_memory: int, host_memory: int | None = None) -> Plan:
    """`estimate` plus, when something does not fit, the changes that would."""
    result = estimate(m, job, device_memory, host_memory)
    if not result.fits:
        result.suggestions = suggestions(m, job, device_memory, host_memory)
    return result


def check_job(job: Job, m: ModelCounts) -> None:
    """Settings the planner can size: known dtype, positive sizes, a target below the model's depth."""
    if job.dtype not in DTYPES:
        raise IterabreError(f"unknown dtype {job.dtype!r}.", f"use one of {', '.join(DTYPES)}")
    one_of(job.calibration, CALIBRATIONS, "calibration")
    if job.num_processes < 1:
        raise IterabreError(f"num_processes={job.num_processes} must be >= 1.", "pass --num-processes 1 or more")
    if min(job.batch_size, job.seq_len, job.lora_rank, job.blocks_per_step) < 1:
        raise IterabreError("batch size, sequence length, LoRA rank and blocks per step must be >= 1.",
                            "fix the sizes")
    if not 1 <= job.target_layers < m.num_layers:
        raise IterabreError(f"target_layers={job.target_layers} must be between 1 and {m.num_layers - 1} "
                            f"for {m.name or 'this model'} ({m.num_layers} blocks).", "pass a smaller --target-layers")


# ---------------------------------------------------------------- reporting

def refusal(p: Plan) -> str:
    """One line: the first phase that does not fit, its numbers, and what would fit."""
    bad = p.failing()[0]
    big = sorted(bad.parts.items(), key=lambda kv: -kv[1])[:4]
    shared = f" x {bad.processes} processes" if bad.processes > 1 else ""
    fix = "; ".join(p.suggestions) if p.suggestions else "nothing tried fits: use a machine with more memory"
    return (f"the {bad.phase} phase needs {human(bad.per_process)} per process{shared} "
            f"({', '.join(f'{k} {human(v)}' for k, v in big)}) but {human(bad.limit)} is available. "
            f"Would fit: {fix}")


def table(p: Plan) -> str:
    """The plan as a text table: one row per phase, its biggest parts, the limit and whether it fits."""
    rows = [("phase", "per process", "x processes", "limit", "fits", "largest parts")]
    for ph in p.phases:
        big = ", ".join(f"{k} {human(v)}" for k, v in sorted(ph.parts.items(), key=lambda kv: -kv[1])[:4])
        fits = {True: "yes", False: "NO", None: "not checked"}[ph.fits]
        rows.append((f"{ph.phase} ({ph.where})", human(ph.per_process), str(ph.processes), human(ph.limit), fits,
                     big + (f" [{ph.note}]" if ph.note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)


def job_from_config(cfg, target_layers: int, device: str) -> Job:
    """The planner's Job from a CompressConfig whose target is resolved to a block count."""
    rec = cfg.recovery
    return Job(target_layers=target_layers, schedule=cfg.schedule, blocks_per_step=cfg.blocks_per_step,
               method=rec.method, trainable=rec.trainable, lora_rank=rec.lora_rank, dtype=cfg.dtype,
               device=device, num_processes=cfg.num_processes, fsdp=cfg.fsdp, batch_size=rec.batch_size,
               seq_len=cfg.seq_len, calibration_tokens=cfg.calibration_tokens,
               grad_checkpointing=rec.grad_checkpointing, scorer=cfg.scorer, select_from=cfg.select_from,
               eval_tasks=cfg.eval_tasks,
               eval_parallelize=cfg.eval_parallelize, calibration=cfg.calibration, bf16=rec.bf16)


def _target(cfg, layers: int) -> int:
    """The block count a config aims at (the ratio resolved as the flow does)."""
    from iterabre.planning import target_layers_for

    return target_layers_for(cfg, layers)


def plan_for_config(cfg, device_memory: int | None = None) -> Plan | None:
    """The plan of a compress job on this machine; None when its config.json is not here (hub id not
    cached, embedded model not pulled yet, .gguf file): nothing can be said without downloading."""
    from iterabre.devices import resolve_device

    m = counts_for(cfg.model, cfg.revision)
    if m is None:
        return None
    device = resolve_device(cfg.device)
    job = job_from_config(cfg, _target(cfg, m.num_layers), device)
    limit = device_memory if device_memory is not None else machine_memory(device)
    return plan(m, job, limit, available_ram())


def check_plan(cfg) -> Plan | None:
    """Refuse (IterabreError, one line) a job whose plan does not fit this machine; the plan otherwise.

    Reads config.json only (no weights, no network; ~0.1 s after transformers is imported).
    `plan.grad_checkpointing` says whether recovery must run with gradient checkpointing.
    """
    result = plan_for_config(cfg)
    if result is not None and not result.fits:
        raise IterabreError(refusal(result), "")
    return result


def decide_checkpointing(cfg) -> bool:
    """Whether recovery should run with gradient checkpointing: asked for, or needed to fit (planner)."""
    result = plan_for_config(cfg)
    return cfg.recovery.grad_checkpointing or bool(result and result.grad_checkpointing)
