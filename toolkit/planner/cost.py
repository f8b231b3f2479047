"""Communication and time of one layout, with its memory (planner.memory): FLOPs and bytes
over rates.

Notation (ARCHITECTURE.md, Facts): N prompt tokens, H query heads, G KV heads, d head
dim, L layers, h hidden size, C chunk size, e bytes per element. Everything is per
device. The only fitted number is the hardware entry's ``efficiency``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .hardware import DTYPE_BYTES, Hardware
from .memory import (GIB, layer_bytes, activation_bytes, kv_cache_bytes, kv_token_bytes, replicated_kv_bytes,
                     weight_bytes)
from .model_dims import ModelDims
from .rules import kv_heads_per_rank, node_size
from .spec import RunSpec


@dataclass(frozen=True)
class LayoutCost:
    """Predicted cost of one layout; bytes are per rank, summed over the prompt."""

    weights_gib: float
    kv_cache_gib: float
    activations_gib: float
    memory_gib_per_device: float
    tp_bytes_per_layer: float
    ulysses_bytes_per_layer: float
    ring_bytes_per_layer: float
    comm_bytes_per_layer: float
    compute_seconds: float
    comm_seconds_exposed: float
    ring_comm_hidden: bool
    chunk_size: int
    num_chunks: int
    pipeline_bubble: float
    prefill_seconds: float
    decode_ms_per_token: float
    prefill_flops_total: float
    attention_flops_total: float

    def to_dict(self) -> dict:
        return asdict(self)


def pipeline_bubble(stages: int, microbatches: int, interleave: int = 1, chunk_costs=None) -> float:
    """Idle share of a pipeline over its compute.

    Equal chunks: GPipe (P-1)/M, interleaved (P-1)/(k*M) (Megatron-LM). Causal prefill
    chunks are not equal: chunk i also attends over every token before it, so later chunks
    cost more. For identical stages and chunk costs t_i the schedule (a flow shop) ends at
    sum(t) + (P-1) * max(t), so the bubble is (P-1) * max(t) / (k * sum(t)): up to 2(P-1)/M
    when attention dominates. benchmarks/pipeline_bubble.py measures it against both.
    """
    if stages <= 1:
        return 0.0
    if chunk_costs is None or len(chunk_costs) == 0 or float(np.sum(chunk_costs)) <= 0:
        return (stages - 1) / (interleave * microbatches)
    costs = np.asarray(chunk_costs, dtype=float)
    return (stages - 1) * float(costs.max()) / (interleave * float(costs.sum()))


def _chunks(context: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Sizes of the prefill chunks and the cached tokens before each."""
    count = math.ceil(context / chunk)
    sizes = np.full(count, float(chunk))
    sizes[-1] = context - chunk * (count - 1)
    cached = np.concatenate(([0.0], np.cumsum(sizes)[:-1]))
    return sizes, cached


def estimate(dims: ModelDims, hw: Hardware, tp: int, ulysses: int, ring: int, pp: int,
             spec: RunSpec, gpus_per_node: Optional[int] = None) -> LayoutCost:
    """Predict memory, communication, prefill seconds and decode ms/token of a layout."""
    world = tp * ulysses * ring * pp
    node = node_size(world, gpus_per_node)
    sp = ulysses * ring
    e = DTYPE_BYTES[spec.dtype]
    e_ffn = DTYPE_BYTES[spec.ffn_dtype] if spec.ffn_dtype else e
    eff = hw.efficiency
    rate = hw.matmul_flops(spec.dtype) * eff
    ffn_rate = hw.matmul_flops(spec.ffn_dtype) * eff if spec.ffn_dtype else rate
    L, h, d, H, G = (dims.num_layers, dims.hidden_size, dims.head_dim,
                     dims.num_heads, dims.num_kv_heads)
    N, T = spec.context, spec.new_tokens
    stage_layers = math.ceil(L / pp)
    heads_tp = H / tp
    heads_rank = heads_tp / ulysses
    kv_tp = G / tp
    kv_rank = kv_heads_per_rank(dims, tp, ulysses)
    chunk = spec.chunk_for(sp)

    # Memory per device.
    weights = weight_bytes(dims, tp, pp, e, e_ffn)
    e_kv = kv_token_bytes(dims, spec, e)  # one cached token, one KV head: K (or V) as stored
    kv = kv_cache_bytes(dims, tp, ulysses, ring, pp, N + T, e, chunk, e_kv)
    acts = activation_bytes(dims, tp, ulysses, ring, chunk, N + T, e)

    # Prefill compute: linear layers 2 FLOPs per parameter per token, each rank owning
    # N/sp tokens and 1/tp of the weights; causal attention 4*c*(P + c/2)*H*d per chunk.
    sizes, cached = _chunks(N, chunk)
    linear_s = 2 * N / sp * L / tp * (dims.attention_params_per_layer / rate
                                       + dims.active_mlp_params_per_layer / ffn_rate)  # MoE: a token's experts
    linear_s += 2 * dims.vocab_size * h / tp / rate          # LM head, last token only
    imbalance = 1.0 if (spec.sequence_layout == "zigzag" or ring == 1) else 2 - 1 / ring
    attn_flops = 4 * d * heads_rank * (sizes * cached + imbalance * sizes ** 2 / 2) / ring
    if dims.sliding_layers:  # a window layer: each query sees at most W keys (blocks of W/32 queries, ~3% more)
        local = 4 * d * heads_rank * sizes * np.minimum(dims.sliding_window, cached + sizes / 2) / ring
        attn_flops = (dims.global_layers * attn_flops + dims.sliding_layers * local) / L
    attention_s = L * float(attn_flops.sum()) / rate
    compute_s = linear_s + attention_s

    # Tensor parallel: two all-reduces of [c/sp, h] per layer, ring all-reduce sends
    # 2*(tp-1)/tp of the message (Megatron-LM).
    tp_bw, tp_lat = hw.link(tp > node)
    tp_bytes = 2 * 2 * (tp - 1) / tp * N / sp * h * e if tp > 1 else 0.0
    tp_s = L * (tp_bytes / tp_bw + 2 * len(sizes) * tp_lat) if tp > 1 else 0.0

    # Ulysses: q, k, v in and the output back; each rank sends (u-1)/u of its shard.
    # K/V count max(G/tp, u) heads: replicated before the all-to-all when u > G/tp.
    u_bw, u_lat = hw.link(tp * ulysses > node)
    if ulysses > 1:
        elems = N / sp * (2 * heads_tp + 2 * max(kv_tp, ulysses)) * d
        u_bytes = elems * (ulysses - 1) / ulysses * e
        u_s = L * (u_bytes / u_bw + 2 * len(sizes) * u_lat)
    else:
        u_bytes, u_s = 0.0, 0.0

    # Ring: pass-KV sends the K/V shard (cache + chunk) ring-1 times; pass-Q sends the
    # queries and gets back (out, lse). A step is hidden when its attention block takes
    # at least as long as its transfer (Ring Attention, arXiv:2310.01889).
    r_bw, r_lat = hw.link(tp * ulysses * ring > node)
    if ring > 1:
        kv_step = 2 * kv_rank * (sizes * d * e + cached * e_kv) / ring  # the piece at full precision
        q_step = sizes / ring * heads_rank * (2 * d * e + 4)
        if spec.ring_mode == "pass-kv":
            use_kv = np.ones_like(sizes, dtype=bool)
        elif spec.ring_mode == "pass-q":
            use_kv = np.zeros_like(sizes, dtype=bool)
        else:  # Meta's rule (arXiv:2411.01783, Alg. 1)
            use_kv = sizes / (sizes + cached) >= 2 * G / H
        step_bytes = np.where(use_kv, kv_step, q_step)
        transfer = step_bytes / r_bw + r_lat
        block = attn_flops / ring / rate
        exposed = (ring - 1) * np.maximum(0.0, transfer - block)
        r_bytes = float((ring - 1) * step_bytes.sum())
        r_s = L * float(exposed.sum())
        ring_hidden = bool(np.all(transfer <= block))
    else:
        r_bytes, r_s, ring_hidden = 0.0, 0.0, True

    stage_share = stage_layers / L
    # per-chunk stage time: its linear work plus its attention over everything before it
    chunk_s = 2 * sizes / sp * L / tp * (dims.attention_params_per_layer / rate
                                         + dims.mlp_params_per_layer / ffn_rate) + L * attn_flops / rate
    bubble = pipeline_bubble(pp, len(sizes), spec.pp_interleave, chunk_s)
    p_bw, p_lat = hw.link(world > node)
    fill = (pp - 1) * (chunk / sp * h * e / p_bw + p_lat)
    comm_s = tp_s + u_s + r_s
    prefill_s = (compute_s + comm_s) * stage_share * (1 + bubble) + fill

    # Decode: every weight and the KV shard are read once per token from HBM, at the share of
    # its bandwidth a decode step reaches; stages run one after another. Cache length averaged
    # over the generated tokens.
    stream = hw.hbm_gbps * 1e9 * hw.decode_efficiency
    cache = N + T / 2
    # one token runs through its experts only: a decode step reads those (and a window's keys)
    layer_read = stage_layers * (layer_bytes(dims, e, e_ffn, active=True) / tp + replicated_kv_bytes(dims, tp, e))
    head_read = dims.lm_head_params * e / tp if dims.lm_head_params else dims.embedding_params * e
    seen = dims.attended_positions(cache)
    kv_read = 2 * stage_layers * kv_rank * math.ceil(seen / ring) * e_kv
    stage_flops = (2 * stage_layers * dims.active_layer_params / tp
                   + 4 * stage_layers * heads_rank * d * seen / ring)
    stage_s = max((layer_read + kv_read) / stream, stage_flops / rate)
    per_layer = 0.0
    if tp > 1:
        per_layer += 2 * (tp_lat + 2 * (tp - 1) / tp * h * e / tp_bw)
    if ulysses > 1:  # all-gather of the head outputs
        per_layer += u_lat + (ulysses - 1) * heads_rank * d * e / u_bw
    if ring > 1:     # all-gather of partial (out, lse), then merge
        per_layer += r_lat + (ring - 1) * heads_rank * (d * e + 4) / r_bw
    decode_s = pp * (stage_s + stage_layers * per_layer) + head_read / stream
    decode_s += (pp - 1) * (p_lat + h * e / p_bw)

    memory = weights + kv + acts
    return LayoutCost(
        weights_gib=weights / GIB, kv_cache_gib=kv / GIB, activations_gib=acts / GIB,
        memory_gib_per_device=memory / GIB,
        tp_bytes_per_layer=tp_bytes, ulysses_bytes_per_layer=u_bytes,
        ring_bytes_per_layer=r_bytes, comm_bytes_per_layer=tp_bytes + u_bytes + r_bytes,
        compute_seconds=compute_s * stage_share * (1 + bubble),
        comm_seconds_exposed=comm_s * stage_share * (1 + bubble) + fill,
        ring_comm_hidden=ring_hidden, chunk_size=chunk, num_chunks=len(sizes),
        pipeline_bubble=bubble, prefill_seconds=prefill_s,
        decode_ms_per_token=decode_s * 1e3,
        prefill_flops_total=2 * N * L * (dims.attention_params_per_layer
                                         + dims.active_mlp_params_per_layer)
        + 4 * N * dims.attended_positions(N / 2) * H * d * L,
        attention_flops_total=4 * N * dims.attended_positions(N / 2) * H * d * L,
    )
