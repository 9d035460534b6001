"""Tiny random decoder models and a byte-level tokenizer, built offline from config.

Used by tests (mechanics on many architectures in milliseconds) and by benchmarks
(a deeper tiny model for scorer timings). Nothing here touches the network.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# Special token ids match `byte_tokenizer()`: 256 byte tokens, then <unk> <s> </s> <pad>.
_SPECIALS = dict(bos_token_id=257, eos_token_id=258, pad_token_id=259)
# Small but structurally faithful: GQA where the family supports it, several blocks.
_COMMON = dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_hidden_layers=6, max_position_embeddings=256, **_SPECIALS)

FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **_COMMON),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **_COMMON),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=8, **_COMMON),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=64, **_COMMON),
    "gemma2": dict(model_type="gemma2", num_key_value_heads=2, head_dim=8, sliding_window=64, **_COMMON),
    "gemma3": dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=8, sliding_window=64, **_COMMON),
    "phi3": dict(model_type="phi3", num_key_value_heads=2, **_COMMON),
    "gpt2": dict(model_type="gpt2", vocab_size=264, n_embd=32, n_layer=6, n_head=4, n_positions=256,
                 **_SPECIALS),
    "gpt_neox": dict(model_type="gpt_neox", **_COMMON),
    "opt": dict(model_type="opt", vocab_size=264, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                num_hidden_layers=6, max_position_embeddings=256, word_embed_proj_dim=32, **_SPECIALS),
}


def tiny_config(family: str, num_layers: int = 6):
    """A transformers config for `family` with `num_layers` blocks."""
    kwargs = dict(FAMILY_CONFIGS[family])
    model_type = kwargs.pop("model_type")
    layer_key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    kwargs[layer_key] = num_layers
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(family: str = "llama", num_layers: int = 6, seed: int = 0):
    """A randomly initialised causal LM in float32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers), dtype=torch.float32)
    return model.eval()


def spread_weights(model, std: float = 0.1, seed: int = 0):
    """Redraw every weight matrix from N(0, std), in place; returns the model.

    The default init (std 0.02) gives near-uniform logits and blocks that barely change the residual
    stream: nothing to distil or reconstruct. With std 0.1 removing a block matters.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std, generator=gen)
    return model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + specials) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<unk>", "<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
