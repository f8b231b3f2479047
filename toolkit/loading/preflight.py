"""Before any weight is read: does this rank's share (weights + KV cache + one chunk's
activations, the planner's formulas) fit the memory it has? If not, one sentence says what is
needed, what is there, the longest prompt that fits and a layout that would.

The budget caps what may be planned for, like vLLM's gpu_memory_utilization: a fraction of
the device's memory (GPU: its total; CPU: the node's RAM shared by its ranks) or an absolute
size in bytes. Without one: what is free now.
"""
from __future__ import annotations

import re

import torch
from ..config import detect_hardware
from ..planner import load_hardware, load_model_dims, make_spec
from ..planner.fit import memory_shortfall
from ..planner.memory import kv_cache_bytes, kv_token_bytes

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*(?:([kmgt])i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class PreflightError(ValueError):
    """The run does not fit in memory; the message has the numbers and what would fit."""


def parse_budget(text) -> float | None:
    """'0.8' (a fraction of the device's memory), '6GiB', '512M' (binary units), '2e9' (bytes)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    match = SIZE.match(str(text))
    if not match:
        raise ValueError(f"memory budget {text!r} is neither a fraction (0.9) nor a size (8GiB, 512MiB)")
    value = float(match.group(1))
    return value * _UNITS[match.group(2).lower()] if match.group(2) else value


def available_bytes(device: torch.device, ranks_per_node: int, budget: float | None) -> float:
    """What this rank may plan for."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    else:
        import psutil

        memory = psutil.virtual_memory()
        free, total = memory.available / ranks_per_node, memory.total / ranks_per_node
    if budget is None:
        return float(free)
    if budget <= 0:
        raise ValueError(f"memory budget must be positive, got {budget}")
    return budget * total if budget <= 1 else budget


def check_memory(model_config, run, topo, context_tokens: int | None, budget: float | None = None) -> float:
    """Raise PreflightError when the layout does not fit on the rank with the least memory;
    -> the bytes available there. Collective: every rank calls it."""
    # on the topology's device: NCCL takes no host tensors (toolkit.distributed.comm)
    available = torch.tensor([available_bytes(topo.device, topo.ranks_per_node, budget)], dtype=torch.float64,
                             device=topo.device)
    if topo.world > 1:  # decide on the tightest rank, so every rank stops together
        available = topo.comm.all_reduce(available, topo.world_group(), op="min", tag="preflight")
    dims = load_model_dims(model_config.to_dict())
    context = min(context_tokens or dims.max_position_embeddings, dims.max_position_embeddings)
    spec = make_spec(load_hardware(detect_hardware()), context, 0, run.chunk_size, run.dtype,
                     ring_mode=run.ring_mode, sequence_layout=run.sequence_layout, kv_dtype=run.kv_dtype)
    d = run.dims
    problem = memory_shortfall(dims, load_hardware(detect_hardware()), (d.tp, d.ulysses, d.ring, d.pp), topo.world,
                               topo.ranks_per_node, spec, float(available.item()))
    if problem:
        raise PreflightError(f"not enough memory: {problem} (--memory-budget sets what may be used; "
                             "--no-preflight skips this check)")
    return float(available.item())


def kv_pool_blocks(model_config, run, topo, block_tokens: int, max_running: int, share: float = 0.8) -> int:
    """Blocks of `block_tokens` positions the engine's KV pool may hand out: `share` of the memory
    free now (weights loaded) on the tightest rank, over what one position of a request costs on
    a rank (its heads and its 1/ring of the positions, as the cache stores them); never more than
    max_running requests at the model's whole context can use. Collective."""
    free = torch.tensor([available_bytes(topo.device, topo.ranks_per_node, None)], dtype=torch.float64,
                        device=topo.device)
    if topo.world > 1:
        free = topo.comm.all_reduce(free, topo.world_group(), op="min", tag="kv_pool")
    dims = load_model_dims(model_config.to_dict())
    spec = make_spec(load_hardware(detect_hardware()), dims.max_position_embeddings, 0, run.chunk_size, run.dtype,
                     kv_dtype=run.kv_dtype)
    e = torch.empty((), dtype=getattr(torch, run.dtype)).element_size()
    d, sample = run.dims, 1 << 20
    per_position = kv_cache_bytes(dims, d.tp, d.ulysses, d.ring, d.pp, sample, e,
                                  token_bytes=kv_token_bytes(dims, spec, e)) / sample
    most = max_running * -(-dims.max_position_embeddings // block_tokens)
    return max(1, min(most, int(share * float(free.item()) / (per_position * block_tokens))))


def memory_peaks(topo) -> dict:
    """Peak host RSS and peak device memory so far, of the rank with the most (collective)."""
    import resource

    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    device = torch.cuda.max_memory_allocated(topo.device) if topo.device.type == "cuda" else 0
    peaks = torch.tensor([host, device], dtype=torch.float64, device=topo.device)  # NCCL: no host tensors
    peaks = topo.comm.all_reduce(peaks, topo.world_group(), op="max", tag="memory_peaks")
    return {"peak_host_rss_bytes": int(peaks[0]),
            "peak_device_bytes": int(peaks[1]) if topo.device.type == "cuda" else None}
