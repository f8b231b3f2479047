"""Sequence parallelism on 2 ranks: efficiency against one process with the same cores,
communication against the closed forms, causal-work balance, and our Ulysses layer
against DeepSpeed's DistributedAttention.
"""
from __future__ import annotations

import time

from .measure import interleave, median, paired_ratio
from .models import load
from .prefill import _ids
from .rank_group import STATE, forget

SP_CASES = {
    "ulysses": dict(ulysses=2),
    # pass-KV named explicitly: auto switches to pass-Q once the cache outgrows a chunk
    # (2G/H rule), and the closed form is checked per mode
    "ring": dict(ring=2, ring_mode="pass-kv", sequence_layout="zigzag"),
}
LAYER_TAGS = {"ulysses": ("ulysses",), "ring": ("ring_kv", "ring_q", "ring_q_out")}


# ---- bodies that run on every rank -----------------------------------------------------------
def build_on_rank(key: str, model_dir: str, case: dict) -> bool:
    from toolkit.api import parallelize

    STATE[key] = parallelize(load(model_dir, "sdpa"), **case)
    return True


def prefill_on_rank(key: str, n: int) -> dict:
    """One timed prefill (from a barrier); bytes this rank sent, by (tag, layer)."""
    import torch.distributed as dist

    lcm = STATE[key]
    ids = _ids(lcm.config.vocab_size, n)
    lcm.topo.comm.counter.reset()
    dist.barrier()
    t0 = time.perf_counter()
    lcm.prefill(ids)
    seconds = time.perf_counter() - t0
    sent = [[tag, layer, s] for (tag, layer), (s, _r) in lcm.topo.comm.counter.by_key.items()]
    return {"seconds": seconds, "sent": sent}


def _job_seconds(per_rank: list[dict]) -> float:
    return max(r["seconds"] for r in per_rank)


# ---- closed forms ------------------------------------------------------------------------------
def comm_ratio(kind: str, per_rank: list[dict], config, n: int, chunk: int) -> dict:
    """Measured bytes sent per rank per layer over the closed form (benchmarks.traffic)."""
    from benchmarks.traffic import ring_bytes_per_layer, ulysses_bytes_per_layer
    from .models import dims_of

    d = dims_of(config)
    measured = theory = 0
    per_layer_equal = True
    for me, result in enumerate(per_rank):
        if kind == "ulysses":
            want = ulysses_bytes_per_layer(n, chunk, 2, d.num_heads, d.num_kv_heads, d.head_dim, 4)
        else:
            case = SP_CASES["ring"]
            want = ring_bytes_per_layer(n, chunk, 2, d.num_heads, d.num_kv_heads, d.head_dim, 4,
                                        case["ring_mode"], me, layout=case["sequence_layout"])
        got: dict = {}
        for tag, layer, sent in result["sent"]:
            if tag in LAYER_TAGS[kind] and layer is not None:
                got[layer] = got.get(layer, 0) + sent
        per_layer_equal &= sorted(got) == list(range(d.num_layers)) and all(v == want for v in got.values())
        measured += sum(got.values())
        theory += want * d.num_layers
    return {"measured_bytes": measured, "theory_bytes": theory, "ratio": measured / theory,
            "every_layer_every_rank_equal": bool(per_layer_equal)}


# ---- the benchmark --------------------------------------------------------------------------------
def sp2_efficiency(ranks, model_dir: str, n: int, chunk: int, repeats: int, threads: int,
                   label: str = "") -> tuple[dict, list]:
    """World 1 with `threads` threads against world 2 with threads/2 per rank, same prompt
    and chunk size; interleaved; efficiency = T(world 1) / T(world 2) (1.0 = perfect)."""
    import torch

    from toolkit.api import parallelize

    torch.set_num_threads(threads)
    single = parallelize(load(model_dir, "sdpa"), ulysses=1, ring=1, chunk_size=chunk)
    ids = _ids(single.config.vocab_size, n)
    for key, case in SP_CASES.items():
        ranks.run(build_on_rank, key, model_dir, dict(case, chunk_size=chunk))
    last: dict = {}

    def world1() -> float:
        t0 = time.perf_counter()
        single.prefill(ids)
        return time.perf_counter() - t0

    def world2(key):
        def run() -> float:
            last[key] = ranks.run(prefill_on_rank, key, n)
            return _job_seconds(last[key])
        return run

    single.prefill(ids[:, :256])
    for key in SP_CASES:
        ranks.run(prefill_on_rank, key, 256)
    seconds = interleave({"world1": world1, **{k: world2(k) for k in SP_CASES}}, repeats, warmup=0)
    metrics, runs = {}, []
    for key in SP_CASES:
        eff = paired_ratio(seconds["world1"], seconds[key])
        comm = comm_ratio(key, last[key], single.config, n, chunk)
        metrics[f"sp2_efficiency_{key}"] = eff
        metrics[f"comm_bytes_vs_theory_{key}"] = comm["ratio"]
        runs.append({"bench": f"sp2_{key}", "model": label or model_dir, "tokens": n, "chunk_size": chunk,
                     "layout": SP_CASES[key], "threads_world1": threads, "threads_per_rank": ranks.threads,
                     "seconds_world1": seconds["world1"], "seconds_world2": seconds[key],
                     "median_s": {"world1": median(seconds["world1"]), "world2": median(seconds[key])},
                     "efficiency": eff, "comm": comm})
    ranks.run(forget)
    return metrics, runs


def imbalance(n: int = 131072, rings=(2, 4, 8), headline_ring: int = 4) -> tuple[dict, list]:
    """max/mean causal attention work per ring rank, from the engine's own block plan."""
    from toolkit.attention.ring import causal_work_per_rank

    runs, metrics = [], {}
    for ring in rings:
        row = {"bench": "causal_balance", "tokens": n, "ring": ring}
        for kind, zigzag in (("zigzag", True), ("contiguous", False)):
            work = causal_work_per_rank(n, ring, zigzag)
            row[kind] = {"work_per_rank": work, "imbalance": max(work) / (sum(work) / ring)}
            if ring == headline_ring:
                metrics[f"{kind}_imbalance"] = row[kind]["imbalance"]
        runs.append(row)
    return metrics, runs
