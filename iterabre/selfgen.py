"""Self-generated calibration data: token windows sampled from the base model itself.

Calibrating on the model's own text (rather than wikitext) matches the distribution the
dense model actually produces, which is what block scoring and reconstruction try to
preserve. Each sequence starts from a neutral one-token prompt (the document separator
`<|endoftext|>` if the vocabulary has it, else BOS, else EOS); its first token is
*sampled* from the model's first-token distribution (so sequences differ), the next
`greedy_tokens` are greedy (a confident, fluent start), the rest is top-p sampling.
Special tokens are never emitted: wikitext windows contain none, and a chat marker mid-window
would push an instruct model into chat mode.

Sampling uses its own seeded `torch.Generator`, so the same (model, parameters, seed) gives
identical tensors. Results are cached as safetensors keyed by the model's content hash and
the parameters, written atomically, and versioned by the file's md5 (like `data_version`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from iterabre.errors import IterabreError
from iterabre.paths import REPO_ROOT

GENERATOR_VERSION = 1  # bump when the sampling procedure changes: old cache entries then miss
DOC_SEPARATOR = "<|endoftext|>"


@dataclass
class SelfGenData:
    """Generated calibration windows plus where they are cached and their content hash."""

    input_ids: torch.Tensor  # [num_sequences, seq_len] long
    md5: str  # md5 of the cached safetensors file: the data version of this calibration set
    path: Path | None  # cache file (None when caching is off)
    params: dict  # everything that determined the tokens, model hash included
    flops: int = 0  # what generating them cost (iterabre.flops), kept with the cache entry so a hit reports it too


# ---------------------------------------------------------------- hashing + cache

def cache_dir() -> Path:
    """Cache root for generated data (ITERABRE_CACHE_DIR, default <repo>/.cache) / selfgen."""
    return Path(os.environ.get("ITERABRE_CACHE_DIR", REPO_ROOT / ".cache")) / "selfgen"


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's tensors (names, dtypes, shapes, bytes): its content hash."""
    digest, seen = hashlib.sha256(), set()
    for name, tensor in sorted(model.state_dict().items()):
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if key in seen:  # tied weights: hash the bytes once, the name still counts
            continue
        seen.add(key)
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def selfgen_cache_path(model_hash: str, params: dict) -> Path:
    """Cache file for (model content hash, generation parameters)."""
    blob = json.dumps({"model": model_hash, **params}, sort_keys=True).encode()
    return cache_dir() / f"selfgen-{hashlib.sha256(blob).hexdigest()[:20]}.safetensors"


def file_md5(path: Path) -> str:
    """md5 of a file's bytes (the digest DVC uses for data versions)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), then rename into place, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_cached(path: Path, ids: torch.Tensor, params: dict, flops: int) -> str:
    """Write ids (safetensors: byte-for-byte deterministic) and a JSON sidecar; returns the md5."""
    from safetensors.torch import save_file

    _write_atomic(path, lambda tmp: save_file({"input_ids": ids.contiguous()}, str(tmp)))
    md5 = file_md5(path)
    meta = json.dumps({"md5": md5, "params": params, "flops": int(flops)}, indent=1, sort_keys=True)
    _write_atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(meta))
    return md5


def load_cached(path: Path) -> tuple[torch.Tensor, str, int] | None:
    """(ids, md5, generation FLOPs) if the cache file exists and still matches its recorded md5, else None."""
    from safetensors.torch import load_file

    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        return None
    md5, meta = file_md5(path), json.loads(sidecar.read_text())
    if meta.get("md5") != md5 or "flops" not in meta:  # edited, damaged, or its cost unknown: regenerate
        return None
    return load_file(str(path))["input_ids"], md5, int(meta["flops"])


# ---------------------------------------------------------------- sampling

def top_p_sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / T) restricted to the top-p nucleus; [B,V] -> [B]."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # Keep a token if the mass strictly before it is < top_p (so the top token is always kept).
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p, 1, generator=gen)  # [B,1] index into the sorted order
    return order.gather(-1, choice).squeeze(-1)


def _cache_kwarg(model: nn.Module) -> str:
    """Name of the KV-cache argument (transformers 5.24 renamed past_key_values -> cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _step(model: nn.Module, ids: torch.Tensor, cache, kwarg: str):
    """One incremental forward: (last-position logits [B,V] float32, updated KV cache)."""
    out = model(input_ids=ids, use_cache=True, **({kwarg: cache} if cache is not None else {}))
    new_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    return out.logits[:, -1].float(), new_cache


def sample_batch(model: nn.Module, prompt: torch.Tensor, seq_len: int, greedy_tokens: int,
                 temperature: float, top_p: float, banned: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Continue prompt[B,P] by seq_len tokens: sampled first, greedy next, then top-p -> [B, seq_len]."""
    kwarg, cache, out = _cache_kwarg(model), None, []
    logits, cache = _step(model, prompt, cache, kwarg)
    for i in range(seq_len):
        logits[:, banned] = float("-inf")
        if temperature <= 0 or 1 <= i <= greedy_tokens:
            token = logits.argmax(-1)
        else:  # i == 0 samples the whole first-token distribution: that is where diversity comes from
            token = top_p_sample(logits, temperature, 1.0 if i == 0 else top_p, gen)
        out.append(token)
        if i + 1 < seq_len:
            logits, cache = _step(model, token[:, None], cache, kwarg)
    return torch.stack(out, dim=1)


def _prompt_ids(tokenizer) -> list[int]:
    """A neutral one-token prompt: a document separator, else BOS, else EOS."""
    # `<|endoftext|>` separates pretraining documents in GPT-2/SmolLM/Qwen vocabularies; an instruct
    # model's BOS may be a chat marker (SmolLM2: <|im_start|>) that would make it write a chat turn.
    sep = tokenizer.convert_tokens_to_ids(DOC_SEPARATOR) if DOC_SEPARATOR in tokenizer.get_vocab() else None
    for tid in (sep, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return [int(tid)]
    raise IterabreError("the tokenizer has neither a BOS nor an EOS token to start generation from.",
                        "use --calibration wikitext for this model")


def _banned_ids(tokenizer, vocab_size: int) -> list[int]:
    """Special tokens plus model vocabulary rows the tokenizer cannot decode (padding rows)."""
    specials = {int(t) for t in tokenizer.all_special_ids if t is not None and t < vocab_size}
    return sorted(specials | set(range(len(tokenizer), vocab_size)))


def _check_args(num_sequences: int, seq_len: int, greedy_tokens: int, top_p: float, batch_size: int) -> None:
    """Reject settings generation cannot honour."""
    if num_sequences < 1 or seq_len < 1 or batch_size < 1 or greedy_tokens < 0:
        raise IterabreError(f"self-generation needs num_sequences, seq_len, batch_size >= 1 and greedy_tokens >= 0 "
                            f"(got {num_sequences}, {seq_len}, {batch_size}, {greedy_tokens}).",
                            "fix the calibration settings")
    if not 0 < top_p <= 1:
        raise IterabreError(f"top_p={top_p} is outside (0, 1].", "use e.g. top_p=0.95")


@torch.no_grad()
def _generate(model, prompt: list[int], banned: list[int], num_sequences: int, params: dict) -> torch.Tensor:
    """All sequences, batch by batch, from one generator seeded with params['seed'] -> CPU [N, seq_len]."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(params["seed"])
    banned_t = torch.tensor(banned, dtype=torch.long, device=device)
    was_training, chunks = model.training, []
    model.eval()
    try:
        for start in range(0, num_sequences, params["batch_size"]):
            rows = min(params["batch_size"], num_sequences - start)
            p = torch.tensor([prompt] * rows, dtype=torch.long, device=device)
            chunks.append(sample_batch(model, p, params["seq_len"], params["greedy_tokens"],
                                       params["temperature"], params["top_p"], banned_t, gen).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def self_generated_calibration(model: nn.Module, tokenizer, num_sequences: int, seq_len: int, seed: int,
                               greedy_tokens: int = 3, temperature: float = 1.0, top_p: float = 0.95,
                               batch_size: int = 8, cache: bool = True) -> SelfGenData:
    """Generate (or load from the cache) `num_sequences` windows of `seq_len` tokens; with md5 + path."""
    _check_args(num_sequences, seq_len, greedy_tokens, top_p, batch_size)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompt, banned = _prompt_ids(tokenizer), _banned_ids(tokenizer, vocab)
    params = dict(version=GENERATOR_VERSION, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                  greedy_tokens=greedy_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size,
                  prompt=prompt, banned=banned)
    if not cache:
        ids, flops = _generate_counted(model, prompt, banned, num_sequences, params)
        return SelfGenData(ids, hashlib.md5(ids.numpy().tobytes()).hexdigest(), None, params, flops)
    params["model"] = model_fingerprint(model)
    path = selfgen_cache_path(params["model"], params)
    hit = load_cached(path)
    if hit is None:
        ids, flops = _generate_counted(model, prompt, banned, num_sequences, params)
        hit = ids, save_cached(path, ids, params, flops), flops
    return SelfGenData(hit[0], hit[1], path, params, hit[2])


def _generate_counted(model: nn.Module, prompt: list[int], banned: list[int], num_sequences: int,
                      params: dict) -> tuple[torch.Tensor, int]:
    """`_generate` and its FLOPs. With a KV cache each step's attention sees one query, so iterabre.flops
    counts it at T=1: cached attention is under-counted (~2 % of a SmolLM2 generation step at T=128)."""
    from iterabre.flops import count_flops

    with count_flops() as counted:
        ids = _generate(model, prompt, banned, num_sequences, params)
    return ids, counted.total


def generate_calibration(model: nn.Module, tokenizer, num_sequences: int, seq_len: int, seed: int,
                         greedy_tokens: int = 3, temperature: float = 1.0, top_p: float = 0.95,
                         batch_size: int = 8) -> torch.Tensor:
    """LongTensor[num_sequences, seq_len] of text sampled from `model` itself (cached on disk)."""
    return self_generated_calibration(model, tokenizer, num_sequences, seq_len, seed, greedy_tokens,
                                      temperature, top_p, batch_size).input_ids
