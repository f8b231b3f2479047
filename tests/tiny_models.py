"""Tiny random HF models of the families we support, saved to disk so every rank loads
the same weights, plus the single-process references every parallel run is held to."""
from __future__ import annotations

import functools

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig,
                          Phi3Config, Qwen2Config, Qwen3Config, Qwen3MoeConfig)

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=4096,
              eos_token_id=None, bos_token_id=None, pad_token_id=None, rope_theta=10000.0)

CONFIGS = {
    # GQA with fewer KV heads (2) than ranks (4): Ulysses replicates them
    "llama": lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **COMMON),
    # attention bias on q/k/v
    "qwen2": lambda: Qwen2Config(num_attention_heads=8, num_key_value_heads=2, **COMMON),
    "mistral": lambda: MistralConfig(num_attention_heads=8, num_key_value_heads=4, sliding_window=None, **COMMON),
    # per-head q/k norms, explicit head_dim
    "qwen3": lambda: Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **COMMON),
    # heads that don't divide 2 or 4: only ring (or Ulysses 3) fits
    "llama9": lambda: LlamaConfig(num_attention_heads=6, num_key_value_heads=3, **{**COMMON, "hidden_size": 48}),
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    attn = "eager" if name == "gemma2" else "sdpa"  # transformers' sdpa has no soft-capping
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation=attn, dtype=torch.float32)
    # random init gives near-uniform logits; scale the head so greedy choices are well separated
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def save(name: str, folder, seed: int = 0, max_shard_size=None) -> str:
    """Save as safetensors; a small max_shard_size ("20KB") writes several files and an index."""
    model = build(name, seed)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return str(folder)


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, logits_to_keep=1).logits[0, -1].float()


@torch.no_grad()
def reference_generate(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@functools.lru_cache(maxsize=None)
def decode_truth(name: str, prompt: tuple[int, ...], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """(greedy tokens, logits after the prompt and after each of them but the last) of the
    single-process HF model: what every layout's decode is held to (cached per test session)."""
    model = build(name)
    ids = torch.tensor([list(prompt)])
    tokens = reference_generate(model, ids, new_tokens)
    return tokens, reference_decode_logits(model, ids, tokens)[:new_tokens]


@torch.no_grad()
def reference_decode_logits(model, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits after each forced token: [len(tokens), V], the single-process truth for decode."""
    full = torch.cat([ids, torch.tensor([tokens])], dim=1)
    logits = model(full).logits[0].float()  # [N + T, V]
    return logits[ids.shape[1] - 1 : ids.shape[1] - 1 + len(tokens) + 1]

# four layers, so that 2 and 3 pipeline stages have something to split
CONFIGS["llama4l"] = lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **{**COMMON, "num_hidden_layers": 4})
# a long advertised context, for the planner's SP-above-32K rule
CONFIGS["llama_long"] = lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                            **{**COMMON, "max_position_embeddings": 262144})
# the head tied to the embeddings (SmolLM2, small Qwen2): the checkpoint stores the matrix once
CONFIGS["llama_tied"] = lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=2,
                                            **{**COMMON, "tie_word_embeddings": True, "num_hidden_layers": 4})

# Phi-3 with LongRoPE: an original length of 32 tokens, so a 37-token prompt prefilled in chunks
# of 16 must use the long factors everywhere; fused qkv_proj and gate_up_proj; GQA
CONFIGS["phi3"] = lambda: Phi3Config(num_attention_heads=4, num_key_value_heads=2, original_max_position_embeddings=32,
                                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                      "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                                                      "long_factor": [1.0, 2.0, 4.0, 6.0, 9.0, 12.0, 16.0, 20.0]},
                                     **{**COMMON, "max_position_embeddings": 256})
# mixture of experts: 4 experts, 2 per token (fused 3-D experts, router)
CONFIGS["mixtral"] = lambda: MixtralConfig(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, **COMMON)
# Qwen3-MoE: QK-norm, experts of their own width, layer 1 a dense MLP
CONFIGS["qwen3_moe"] = lambda: Qwen3MoeConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=40, mlp_only_layers=[1],
                                              **COMMON)
# 2 KV heads for 8 query heads: tp=4 gives each KV head to two ranks (Qwen2.5-1.5B's shape)
CONFIGS["qwen2_kv2"] = lambda: Qwen2Config(num_attention_heads=8, num_key_value_heads=2, **COMMON)
# Gemma 2: sliding-window layers (8 positions) between global ones, attention logit soft-capping,
# final logit soft-capping, query_pre_attn_scalar for the scale
CONFIGS["gemma2"] = lambda: Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                         query_pre_attn_scalar=24, **COMMON)
# Gemma 3 (text): local and global layers with their own rotary bases, QK-norm, no soft-capping
CONFIGS["gemma3"] = lambda: Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                             query_pre_attn_scalar=24,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                             **{**COMMON, "num_hidden_layers": 3})
# Mistral with its sliding window on every layer
CONFIGS["mistral_swa"] = lambda: MistralConfig(num_attention_heads=8, num_key_value_heads=4, sliding_window=8, **COMMON)
# Qwen2 with use_sliding_window: its window from layer max_window_layers on (the second of two)
CONFIGS["qwen2_swa"] = lambda: Qwen2Config(num_attention_heads=8, num_key_value_heads=2, use_sliding_window=True,
                                           sliding_window=8, max_window_layers=1, **COMMON)
