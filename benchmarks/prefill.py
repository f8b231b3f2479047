"""World-1 prefill against plain transformers: speed, MFU and peak memory.

Baseline: the same HF model with attn_implementation="sdpa", called as
`model(ids, logits_to_keep=1)` (use_cache on: it keeps the KV cache, as our prefill does).
Speed: both in one process, same threads, interleaved repeats, median of paired ratios.
Memory: each in a fresh process (so peaks do not mix), peak RSS above the RSS just before
the prefill (weights loaded, a short warm-up done): activations plus KV cache; glibc's
mmap threshold fixed in both (measure.MEASURE_ENV) so RSS follows what is allocated.
"""
from __future__ import annotations

import time

from .measure import MEASURE_ENV, MIB, PeakRSS, in_fresh_process, interleave, matmul_rate, median, paired_ratio
from .models import kv_bytes, load, prefill_flops

WARMUP_TOKENS = 128


def _ids(vocab: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def speed_vs_hf(model_dir: str, n: int, chunk: int, repeats: int, threads: int, label: str = "") -> tuple[dict, list]:
    """-> ({world1_prefill_speed_vs_hf, prefill_mfu}, runs)."""
    import torch

    from toolkit.api import parallelize

    torch.set_num_threads(threads)
    hf_model = load(model_dir, "sdpa")
    ours = parallelize(load(model_dir, "sdpa"), ulysses=1, ring=1, chunk_size=chunk)
    ids = _ids(hf_model.config.vocab_size, n)
    flops = prefill_flops(hf_model.config, n)
    logits, rates = {}, []

    @torch.no_grad()
    def run_hf() -> float:
        t0 = time.perf_counter()
        logits["hf"] = hf_model(ids, logits_to_keep=1).logits[0, -1].float()
        return time.perf_counter() - t0

    def run_ours() -> float:
        rates.append(matmul_rate(torch.float32))  # the ceiling, measured next to each run
        t0 = time.perf_counter()
        logits["ours"] = ours.prefill(ids)
        return time.perf_counter() - t0

    with torch.no_grad():  # warm-up: kernels, rotary tables, first-touch allocations
        hf_model(ids[:, :WARMUP_TOKENS], logits_to_keep=1)
        ours.prefill(ids[:, :WARMUP_TOKENS])
    seconds = interleave({"hf": run_hf, "ours": run_ours}, repeats, warmup=0)
    speed = paired_ratio(seconds["hf"], seconds["ours"])
    mfu = median([flops / t / r for t, r in zip(seconds["ours"], rates)])
    hf_mfu = median([flops / t / r for t, r in zip(seconds["hf"], rates)])
    run = {"bench": "world1_prefill", "model": label or model_dir, "tokens": n, "chunk_size": chunk,
           "threads": threads, "repeats": repeats, "seconds": seconds,
           "tokens_per_s": {k: n / median(v) for k, v in seconds.items()},
           "flops": flops, "matmul_fp32_flops_per_s": rates, "mfu_ours": mfu, "mfu_hf": hf_mfu,
           "max_abs_logit_diff": float((logits["hf"] - logits["ours"]).abs().max()),
           "baseline": "transformers forward, sdpa, logits_to_keep=1, same process, interleaved"}
    return {"world1_prefill_speed_vs_hf": speed, "prefill_mfu": mfu}, [run]


def peak_child(which: str, model_dir: str, n: int, chunk: int) -> dict:
    """In a fresh process: peak RSS of one prefill (which = 'hf' or 'ours') above its start."""
    import torch

    from toolkit.api import parallelize

    model = load(model_dir, "sdpa")
    config = model.config
    ids = _ids(config.vocab_size, n)
    if which == "ours":
        lcm = parallelize(model, ulysses=1, ring=1, chunk_size=chunk)
        run = lambda x: lcm.prefill(x)  # noqa: E731
    else:
        run = lambda x: model(x, logits_to_keep=1)  # noqa: E731
    with torch.no_grad():
        run(ids[:, :WARMUP_TOKENS])
        with PeakRSS() as peak:
            out = run(ids)
    cache = lcm.last_state.cache.nbytes() if which == "ours" else kv_bytes(config, n)
    del out
    return dict(peak.to_dict(), which=which, kv_cache_mib=cache / MIB,
                weights_mib=sum(p.numel() * p.element_size() for p in model.parameters()) / MIB)


def memory_vs_hf(model_dir: str, n: int, chunk: int, threads: int, label: str = "") -> tuple[dict, list]:
    """-> ({world1_peak_mem_vs_hf}, runs): ours over HF, peak above baseline, fresh process each."""
    hf = in_fresh_process(peak_child, "hf", model_dir, n, chunk, threads=threads, env=MEASURE_ENV)
    ours = in_fresh_process(peak_child, "ours", model_dir, n, chunk, threads=threads, env=MEASURE_ENV)
    ratio = ours["delta_mib"] / hf["delta_mib"]
    run = {"bench": "world1_peak_memory", "model": label or model_dir, "tokens": n, "chunk_size": chunk,
           "hf": hf, "ours": ours, "ratio": ratio,
           "allocator": MEASURE_ENV,
           "note": "peak RSS above the RSS before the prefill, each in a fresh process with glibc's mmap "
                   "threshold fixed; both hold the whole KV cache at the end"}
    return {"world1_peak_mem_vs_hf": ratio}, [run]
