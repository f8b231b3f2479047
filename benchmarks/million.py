"""The million-token run: a 1,048,576-token prompt through ring attention on 4 CPU ranks
with a micro model, prefill plus a few decode steps, memory per rank against the planner.

Memory per rank: peak RSS during prefill and decode above the RSS just before them (model
built, a short warm-up run so first-use buffers already exist), plus the weights: the KV
cache shard, the ring's in-flight K/V, one chunk's activations, the weights. The planner
predicts exactly those (toolkit.planner.cost.estimate); the Python/torch/gloo runtime
under them (the RSS before the model) is reported apart. benchmarks/million_tokens.py starts
the ranks with glibc's mmap threshold fixed (measure.MEASURE_ENV), as the other memory
benchmarks do.
"""
from __future__ import annotations

import math
import time

from .measure import MIB, PeakRSS
from .models import dims_of, load
from .prefill import _ids

GIB = 1024 ** 3
CASE = dict(ring_mode="pass-kv", sequence_layout="zigzag")  # Meta's million-token recipe


def chunk_for(world: int) -> int:
    from toolkit.options import DEFAULT_CHUNK_TOKENS_PER_RANK

    return DEFAULT_CHUNK_TOKENS_PER_RANK * world  # the planner's default: 8K tokens per SP rank


def planner_prediction(config, n: int, world: int, chunk: int, new_tokens: int) -> dict:
    from toolkit.planner.cost import RunSpec, estimate
    from toolkit.planner.hardware import load_hardware

    spec = RunSpec(context=n, new_tokens=new_tokens, chunk_size=chunk, dtype="float32", **CASE)
    cost = estimate(dims_of(config), load_hardware("cpu"), tp=1, ulysses=1, ring=world, pp=1, spec=spec)
    return {"memory_mib": cost.memory_gib_per_device * GIB / MIB, "weights_mib": cost.weights_gib * GIB / MIB,
            "kv_cache_mib": cost.kv_cache_gib * GIB / MIB, "activations_mib": cost.activations_gib * GIB / MIB,
            "prefill_s_one_core_per_rank": cost.prefill_seconds}


def million_on_rank(model_dir: str, n: int, chunk: int, new_tokens: int) -> dict:
    import torch
    import torch.distributed as dist

    from toolkit.api import parallelize

    world = dist.get_world_size()
    lcm = parallelize(load(model_dir, "sdpa"), ring=world, chunk_size=chunk, **CASE)
    weights = sum(p.numel() * p.element_size() for p in lcm.model.parameters())
    ids = _ids(lcm.config.vocab_size, n)
    with torch.no_grad():
        lcm.generate(ids[:, : min(n, 4 * world * 64)], max_new_tokens=2)  # warm-up: first-use buffers
        lcm.last_state = None
        dist.barrier()
        with PeakRSS() as peak:
            result = lcm.generate(ids, max_new_tokens=new_tokens)
    state = lcm.last_state
    return dict(peak.to_dict(), rank=dist.get_rank(), prefill_s=result.timings["prefill_s"],
                decode_s=result.timings["decode_s"], new_tokens=len(result.token_ids), tokens=result.token_ids,
                weights_mib=weights / MIB, run_mib=(peak.delta + weights) / MIB,
                kv_cache_mib=state.cache.nbytes() / MIB, shard_lengths=list(state.cache.shard_lengths),
                comm_sent_mib=lcm.topo.comm.counter.sent / MIB)


def run_million(ranks, model_dir: str, n: int, new_tokens: int = 4, chunk: int | None = None) -> dict:
    """One run on the ranks of `ranks` (ring = their number) -> a JSON-able row."""
    from transformers import AutoConfig

    world = ranks.world
    chunk = chunk or chunk_for(world)
    config = AutoConfig.from_pretrained(model_dir)
    t0 = time.perf_counter()
    per_rank = ranks.run(million_on_rank, model_dir, n, chunk, new_tokens, timeout=6 * 3600)
    wall = time.perf_counter() - t0
    plan = planner_prediction(config, n, world, chunk, new_tokens)
    measured = max(r["run_mib"] for r in per_rank)
    return {"bench": "million_tokens", "tokens": n, "world": world, "layout": dict(ring=world, **CASE),
            "chunk_size": chunk, "threads_per_rank": ranks.threads, "model": dims_of(config).to_dict(),
            "prefill_s": max(r["prefill_s"] for r in per_rank), "decode_s": max(r["decode_s"] for r in per_rank),
            "decode_steps": per_rank[0]["new_tokens"], "wall_s": wall,
            "same_tokens_on_every_rank": all(r["tokens"] == per_rank[0]["tokens"] for r in per_rank),
            "peak_rss_mib_per_rank": [r["peak_mib"] for r in per_rank],
            "run_memory_mib_per_rank": [r["run_mib"] for r in per_rank],
            "rss_before_run_mib_per_rank": [r["base_mib"] for r in per_rank],
            "kv_cache_mib_per_rank": [r["kv_cache_mib"] for r in per_rank],
            "comm_sent_mib_per_rank": [r["comm_sent_mib"] for r in per_rank],
            "planner": plan, "planner_vs_measured": plan["memory_mib"] / measured,
            "memory_method": per_rank[0]["method"]}


def extrapolate(rows: list[dict], n: int) -> float:
    """Prefill seconds at n from the measured rows: t = a*N^2 + b*N fitted by least squares
    (attention is quadratic, the rest linear); with one row, pure N^2 scaling (an upper bound)."""
    if len(rows) == 1:
        r = rows[0]
        return r["prefill_s"] * (n / r["tokens"]) ** 2
    sxx = sum(r["tokens"] ** 4 for r in rows)
    sxy = sum(r["tokens"] ** 3 for r in rows)
    syy = sum(r["tokens"] ** 2 for r in rows)
    bx = sum(r["prefill_s"] * r["tokens"] ** 2 for r in rows)
    by = sum(r["prefill_s"] * r["tokens"] for r in rows)
    det = sxx * syy - sxy * sxy
    a = (bx * syy - by * sxy) / det
    b = (sxx * by - sxy * bx) / det
    return max(a * n * n + b * n, 0.0) if math.isfinite(a) and math.isfinite(b) else float("nan")
