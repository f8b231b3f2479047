"""Our Ulysses attention layer against DeepSpeed's `DistributedAttention`, world 2.

Both get the tensors HF's attention interface hands over (q [B, H, S/P, d], k/v
[B, G, S/P, d], after RoPE), the same local kernel (toolkit.attention.kernels, causal),
and must return what HF's o_proj reads ([B, S/P, H*d]). Ours is the engine's real path
(SequenceParallelAttention.attend, which also fills its KV cache); DeepSpeed's is
DistributedAttention(local, group, scatter_idx=2, gather_idx=1) on [B, S, H, d] views.
Calls alternate, each starting from a barrier; a call's time is the slower rank's. Our
per-request setup (a state with an empty cache, the chunk's layout) is made before the
clock starts: it happens once per chunk for all layers, and DeepSpeed's layer has none.
"""
from __future__ import annotations

import time

from .measure import median, paired_ratio


def _kernel_bshd(q, k, v, scale):
    """The shared local kernel on DeepSpeed's [B, S, h, d] layout."""
    from toolkit.attention.kernels import attention_with_lse

    out, _ = attention_with_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, scale=scale)
    return out.transpose(1, 2)  # [B, S, h, d]


def compare_on_rank(seq: int, heads: int, kv_heads: int, head_dim: int, repeats: int, seed: int = 0) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.sequence.layer import DistributedAttention

    from toolkit.distributed.topology import ParallelDims, Topology
    from toolkit.engine.sequence_parallel import SequenceParallelAttention

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm wraps the existing group
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = Topology.build(ParallelDims(ulysses=world))
    s_loc, scale = seq // world, head_dim ** -0.5
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    q = torch.randn(1, heads, s_loc, head_dim, generator=g)     # [B, H, S/P, d]
    k = torch.randn(1, kv_heads, s_loc, head_dim, generator=g)  # [B, G, S/P, d]
    v = torch.randn(1, kv_heads, s_loc, head_dim, generator=g)

    class Local(torch.nn.Module):
        def forward(self, q_, k_, v_):
            return _kernel_bshd(q_, k_, v_, scale)

    peer = DistributedAttention(Local(), topo.group("ulysses"), scatter_idx=2, gather_idx=1)

    def request():
        """Per request and chunk, not per layer: a fresh state (empty cache) and the chunk's layout."""
        state = SequenceParallelAttention(topo, "zigzag", "auto", heads, kv_heads)
        state.begin_chunk(0, seq)
        return state

    def ours(state):
        # one layer: all-to-all in, attention, K/V into the cache, all-to-all back
        return state.attend(0, q, k, v, scale).reshape(1, s_loc, heads * head_dim)  # [B, S/P, H*d]

    def theirs(_):
        out = peer(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0)  # [B, S/P, H, d]
        return out.reshape(1, s_loc, heads * head_dim)

    def timed(fn):
        state = request() if fn is ours else None  # untimed: DeepSpeed's layer has no such step
        dist.barrier()
        t0 = time.perf_counter()
        fn(state)
        return time.perf_counter() - t0

    with torch.no_grad():
        diff = float((ours(request()) - theirs(None)).abs().max())  # also the warm-up
        seconds = {"ours": [], "deepspeed": []}
        for rep in range(repeats):
            order = ("ours", "deepspeed") if rep % 2 == 0 else ("deepspeed", "ours")
            for name in order:
                seconds[name].append(timed(ours if name == "ours" else theirs))
    return {"seconds": seconds, "max_abs_diff": diff}


def ulysses_vs_deepspeed(ranks, seq: int, heads: int, kv_heads: int, head_dim: int, repeats: int) -> tuple[dict, list]:
    per_rank = ranks.run(compare_on_rank, seq, heads, kv_heads, head_dim, repeats)
    job = {name: [max(r["seconds"][name][i] for r in per_rank) for i in range(repeats)]
           for name in ("ours", "deepspeed")}
    ratio = paired_ratio(job["ours"], job["deepspeed"])
    run = {"bench": "ulysses_vs_deepspeed", "world": ranks.world, "threads_per_rank": ranks.threads,
           "tokens": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "seconds": job,
           "median_s": {k: median(v) for k, v in job.items()}, "ratio": ratio,
           "max_abs_diff": max(r["max_abs_diff"] for r in per_rank),
           "peer": "deepspeed.sequence.layer.DistributedAttention(scatter_idx=2, gather_idx=1)"}
    return {"ulysses_vs_deepspeed": ratio}, [run]
