"""Memory per device of a layout: weights (this rank's share), the KV cache as stored (kv
dtype, sliding windows), and the live activations of one chunk. Bytes; pure, no torch."""
from __future__ import annotations

import math

from ..attention.kv_formats import bytes_per_token_head, cache_kind
from .hardware import DTYPE_BYTES
from .model_dims import ModelDims
from .rules import kv_heads_per_rank
from .spec import RunSpec

GIB = 1024 ** 3


def layer_bytes(dims: ModelDims, e: int, e_ffn: int, active: bool = False) -> float:
    """One layer's weights (MoE: every expert; active: the experts a token runs through)."""
    mlp = dims.active_mlp_params_per_layer if active else dims.mlp_params_per_layer
    return (dims.attention_params_per_layer + dims.norm_params_per_layer) * e + mlp * e_ffn


def replicated_kv_bytes(dims: ModelDims, tp: int, e: int) -> float:
    """What a TP rank holds beyond 1/tp of a layer when tp > G: its copy of one KV head's k and v
    projections instead of G/tp of one (tensor_parallel.kv_heads)."""
    if dims.num_kv_heads >= tp:
        return 0.0
    per_head = 2 * dims.head_dim * (dims.hidden_size + (1 if dims.attention_bias else 0))  # k and v, one head
    return per_head * (1 - dims.num_kv_heads / tp) * e


def expert_bytes(dims: ModelDims, tp: int, pp: int, e_ffn: int) -> float:
    """The fused experts on the fullest TP rank of the fullest stage: every MoE layer keeps the
    intermediate rows [a, b) of each expert's gate, up and down projections, ceil(I/tp) on the
    first ranks (tensor_parallel.experts.intermediate_share), cut before anything is allocated.
    With pp > 1 a stage's MoE layers are counted as the average layer's (like the other weights)."""
    if not dims.num_experts:
        return 0.0
    size = dims.moe_intermediate_size or dims.intermediate_size
    layers = math.ceil(dims.num_layers / pp) * dims.moe_layers / dims.num_layers
    return layers * dims.num_experts * 3 * dims.hidden_size * math.ceil(size / tp) * e_ffn


def weight_bytes(dims: ModelDims, tp: int, pp: int, e: int, e_ffn: int) -> float:
    """Weights on the fullest device: ceil(L/pp) layers split by TP, plus embeddings.

    AutoTP shards the linear layers and the untied LM head, not the embedding, so the
    embedding is counted whole; with pp > 1 a stage holds the embedding or the head. MoE
    experts are cut over TP along their intermediate dimension (`expert_bytes`, this rank's
    share exactly as the loader allocates it).
    """
    experts = dims.moe_layers * dims.num_experts * dims.expert_params * e_ffn / dims.num_layers  # per layer, all
    per_layer = (layer_bytes(dims, e, e_ffn) - experts) / tp + replicated_kv_bytes(dims, tp, e)
    layers = math.ceil(dims.num_layers / pp) * per_layer + expert_bytes(dims, tp, pp, e_ffn)
    embed = dims.embedding_params * e
    head = dims.lm_head_params * e / tp
    if pp == 1:
        extra = embed + head + dims.hidden_size * e
    else:
        extra = max(embed, head if dims.lm_head_params else embed)
    return layers + extra


def kv_token_bytes(dims: ModelDims, spec: RunSpec, e: int) -> int:
    """Bytes one token's K (or V) takes per KV head as the cache stores it (the kv dtype)."""
    return bytes_per_token_head(cache_kind(spec.kv_dtype, spec.dtype), dims.head_dim, e)


def kv_cache_bytes(dims: ModelDims, tp: int, ulysses: int, ring: int, pp: int,
                   tokens: int, e: int, chunk: int = 0, token_bytes: float | None = None) -> float:
    """2 * L * G * d * N * e / (tp * sp), with KV heads replicated when ulysses > G/tp; a sliding-
    window layer holds its window and the chunk being prefilled, not N. token_bytes: one token's
    K per KV head as stored (d * e unless the kv dtype is another)."""
    layers = math.ceil(dims.num_layers / pp)
    kv_heads = kv_heads_per_rank(dims, tp, ulysses)
    per_token = dims.head_dim * e if token_bytes is None else token_bytes
    return 2 * layers * kv_heads * math.ceil(dims.attended_positions(tokens, chunk) / ring) * per_token


def activation_bytes(dims: ModelDims, tp: int, ulysses: int, ring: int,
                     chunk: int, kv_tokens: int, e: int) -> float:
    """Live tensors of one layer while one chunk passes (no N x N scores: fused kernel)."""
    h, d = dims.hidden_size, dims.head_dim
    heads_tp, kv_tp = dims.num_heads / tp, max(dims.num_kv_heads / tp, 1.0)
    heads_rank = heads_tp / ulysses
    kv_rank = kv_heads_per_rank(dims, tp, ulysses)
    local = math.ceil(chunk / (ulysses * ring))        # tokens per rank, sequence layout
    after_a2a = math.ceil(chunk / ring)                # tokens per rank, head layout
    total = local * (2 * h                             # residual + normed input
                     + (2 * heads_tp + 2 * kv_tp) * d  # q, k, v and attention output
                     + 3 * dims.intermediate_size / tp)  # gate, up, gate*up
    total += after_a2a * (heads_rank + 2 * kv_rank) * d
    total *= e
    if ring > 1:  # the K/V shard in flight (double buffer) and fp32 (out, lse) merges
        total += 2 * 2 * kv_rank * d * math.ceil(kv_tokens / ring) * e
        total += after_a2a * heads_rank * (d + 1) * 4
    return total + dims.vocab_size * 4                 # last-token logits, fp32


def memory_gib(dims: ModelDims, tp: int, ulysses: int, ring: int, pp: int,
               spec: RunSpec) -> float:
    """Memory per device alone (cheap: used to search what would fit)."""
    e = DTYPE_BYTES[spec.dtype]
    e_ffn = DTYPE_BYTES[spec.ffn_dtype] if spec.ffn_dtype else e
    tokens = spec.context + spec.new_tokens
    chunk = spec.chunk_for(ulysses * ring)
    total = (weight_bytes(dims, tp, pp, e, e_ffn)
             + kv_cache_bytes(dims, tp, ulysses, ring, pp, tokens, e, chunk, kv_token_bytes(dims, spec, e))
             + activation_bytes(dims, tp, ulysses, ring, chunk, tokens, e))
    return total / GIB
