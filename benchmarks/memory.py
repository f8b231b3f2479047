"""Chunked prefill keeps activations bounded by the chunk, not the prompt.

For each length, in a fresh process: peak RSS during our world-1 prefill above the RSS
before it, minus the KV cache the engine holds at the end (its
filled part: pages of the reserved tail are never touched, so never resident). What is
left is activation memory: it must not grow with N.
"""
from __future__ import annotations

from .measure import MEASURE_ENV, MIB, PeakRSS, in_fresh_process
from .models import load
from .prefill import WARMUP_TOKENS, _ids


def activation_child(model_dir: str, n: int, chunk: int) -> dict:
    import torch

    from toolkit.api import parallelize

    lcm = parallelize(load(model_dir, "sdpa"), ulysses=1, ring=1, chunk_size=chunk)
    ids = _ids(lcm.config.vocab_size, n)
    with torch.no_grad():
        lcm.prefill(ids[:, :WARMUP_TOKENS])
        lcm.last_state = None  # drop the warm-up cache before the baseline is taken
        with PeakRSS() as peak:
            lcm.prefill(ids)
    cache = kv_filled_bytes(lcm.last_state.cache)
    return dict(peak.to_dict(), tokens=n, kv_cache_mib=cache / MIB,
                kv_reserved_mib=lcm.last_state.cache.nbytes() / MIB, activation_mib=(peak.delta - cache) / MIB)


def kv_filled_bytes(cache) -> int:
    """Bytes of K and V actually written (the reserved capacity beyond them stays untouched)."""
    return sum(2 * kv.k[:, :, : kv.length].numel() * kv.k.element_size()
               for kv in cache.layers.values() if kv.k is not None)


def chunked_growth(model_dir: str, lengths: list[int], chunk: int, threads: int,
                   label: str = "") -> tuple[dict, list]:
    """-> ({chunked_mem_growth: activations at max(lengths) over min(lengths)}, runs).

    Measured with glibc's mmap threshold fixed (measure.MEASURE_ENV: what is allocated);
    the shortest and longest lengths are measured again under glibc's defaults (what
    RSS shows when the allocator keeps freed blocks), reported next to it."""
    rows = [in_fresh_process(activation_child, model_dir, n, chunk, threads=threads, env=MEASURE_ENV)
            for n in lengths]
    default = [in_fresh_process(activation_child, model_dir, n, chunk, threads=threads)
               for n in (lengths[0], lengths[-1])]
    growth = rows[-1]["activation_mib"] / rows[0]["activation_mib"]
    run = {"bench": "chunked_memory", "model": label or model_dir, "chunk_size": chunk, "rows": rows,
           "growth": growth, "tokens_ratio": rows[-1]["tokens"] / rows[0]["tokens"], "allocator": MEASURE_ENV,
           "rows_glibc_default": default,
           "growth_glibc_default": default[-1]["activation_mib"] / default[0]["activation_mib"]}
    return {"chunked_mem_growth": growth}, [run]
