"""How many sequence-parallel ranks one request spans under elastic placement: the fewest whose
predicted time (prefill, then its answer's decode steps) is within a few percent of the
fastest degree's, by the same cost model that chooses layouts (toolkit.planner.cost) for this
machine's hardware entry. A short chat runs on one rank (the others serve other requests);
a long prompt spans what makes it fast. Whether its cache fits is the scheduler's part."""
from __future__ import annotations

import math
from typing import Callable

from ..distributed.placement import sub_layouts
from .cost import estimate
from .fit import make_spec
from .hardware import load_hardware
from .model_dims import load_model_dims

WITHIN = 1.05  # a degree this close to the fastest is as good: fewer ranks leave more for others
MIN_BUCKET = 64


def _bucket(tokens: int) -> int:
    """The power of two at or above `tokens` (at least MIN_BUCKET): the model is asked once per bucket."""
    return max(MIN_BUCKET, 1 << max(0, tokens - 1).bit_length())


class DegreeModel:
    def __init__(self, dims, hw, tp: int, ulysses: int, ring: int, chunk_size: int, dtype: str, kv_dtype: str):
        self.dims, self.hw, self.tp = dims, hw, tp
        self.layouts = sub_layouts(ulysses, ring)
        self.chunk_size, self.dtype, self.kv_dtype = chunk_size, dtype, kv_dtype
        self._memo: dict[tuple[int, int], int] = {}

    def seconds(self, ulysses: int, ring: int, prompt: int, new: int) -> float:
        spec = make_spec(self.hw, prompt + new, new, self.chunk_size, self.dtype, kv_dtype=self.kv_dtype)
        cost = estimate(self.dims, self.hw, self.tp, ulysses, ring, 1, spec)
        return cost.prefill_seconds + new * cost.decode_ms_per_token / 1000.0

    def __call__(self, prompt: int, new: int) -> int:
        key = (_bucket(prompt), _bucket(max(new, 1)))
        if key not in self._memo:
            times = [(self.seconds(u, r, *key), u * r) for u, r in self.layouts]
            best = min(t for t, _ in times)
            self._memo[key] = next(d for t, d in times if t <= WITHIN * best)
        return self._memo[key]


def request_degrees(model_config, run, settings, hardware: str) -> Callable[[int, int], int] | None:
    """The engine's degree_for(prompt, new) for this run on `hardware` (a configs/hardware entry:
    this machine's), or None: elastic placement is off, or there is one SP rank."""
    d = run.dims
    if not settings.elastic or d.sp == 1:
        return None
    if d.pp != 1:
        raise ValueError(f"elastic placement splits the sequence-parallel ranks of one stage; this layout has "
                         f"pp={d.pp}: run it with pp=1, or turn elastic placement off")
    if settings.min_sp_tokens is not None:
        threshold, every = settings.min_sp_tokens, d.sp
        return lambda prompt, new: 1 if prompt < threshold else every
    return DegreeModel(load_model_dims(model_config.to_dict()), load_hardware(hardware), d.tp, d.ulysses,
                       d.ring, run.chunk_size, run.dtype, run.kv_dtype)


def trace_lengths(median: int, longest: int, count: int = 200) -> list[int]:
    """A log-normal trace of prompt lengths (deterministic quantiles): half under `median`, the
    longest 1% reaching `longest`."""
    from statistics import NormalDist

    normal = NormalDist()
    spread = math.log(longest / median) / normal.inv_cdf(0.99)
    return [min(longest, max(1, round(median * math.exp(spread * normal.inv_cdf((i + 0.5) / count)))))
            for i in range(count)]


def trace_throughput(dims, hw, tp: int, ulysses: int, ring: int, lengths: list[int], new: int, chunk_size: int,
                     dtype: str, kv_dtype: str = "auto", rule: str = "latency") -> dict:
    """Predicted requests per second of a trace, elastic over a fixed degree, on paper. Assumptions:
    each request runs alone on its block (no batching beside it), blocks are packed perfectly (the
    ranks are busy while requests wait: a rank-second is a rank-second), a request's time at a
    degree is the cost model's (prefill, then `new` decode steps), and a degree is allowed only
    where the request's weights, cache and activations fit a device. rule: "latency" (the
    engine's: the fewest ranks within 5% of the fastest) or "rank-seconds" (the degree that
    costs the ranks least: what a loaded server would want)."""
    model = DegreeModel(dims, hw, tp, ulysses, ring, chunk_size, dtype, kv_dtype)
    sp = ulysses * ring
    fixed = elastic = 0.0
    degrees = []
    for n in lengths:
        times = {}
        for u, r in model.layouts:
            spec = make_spec(hw, n + new, new, chunk_size, dtype, kv_dtype=kv_dtype)
            cost = estimate(dims, hw, tp, u, r, 1, spec)
            if cost.memory_gib_per_device <= hw.memory_gib or u * r == sp:
                times[u * r] = cost.prefill_seconds + new * cost.decode_ms_per_token / 1000.0
        best = min(times.values())
        d = next(d for d, t in sorted(times.items()) if t <= WITHIN * best) if rule == "latency" else \
            min(times, key=lambda d: times[d] * d)
        degrees.append(d)
        fixed += times[sp]                 # every request on every rank, one after another
        elastic += times[d] * d / sp       # its rank-seconds, over the ranks there are
    return {"requests": len(lengths), "fixed_requests_per_s": len(lengths) / fixed,
            "elastic_requests_per_s": len(lengths) / elastic, "elastic_over_fixed": fixed / elastic,
            "degrees": {d: degrees.count(d) for d in sorted(set(degrees))},
            "median_tokens": sorted(lengths)[len(lengths) // 2], "longest_tokens": max(lengths)}
