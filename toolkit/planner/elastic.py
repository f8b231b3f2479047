"""How many sequence-parallel ranks one request spans under elastic placement, by the same cost
model that chooses layouts (toolkit.planner.cost) for this machine's hardware entry: its
predicted time (prefill, then its answer's decode steps) at each degree, and a degree only
where its weights, cache and activations fit a device.

- Nothing waits behind it: the fewest ranks within 5% of the fastest. A short chat runs on
  one rank (the others serve other chats); a long prompt spans what makes it fast.
- Requests wait behind it (the server is the bottleneck): the degree that costs the ranks
  least (time x ranks), among those within 2x of its fastest time. Sequence parallelism is
  never free (collectives, every rank reading the weights for a decode step), so under load
  fewer ranks per request serve more requests; the cap keeps any one request from becoming
  much slower than it must.
On paper (trace_throughput, `lctk plan --elastic-trace`): 200 prompts with a 64K median and a
1M tail, Llama-3.1-8B on 8 H100s, the first rule alone serves 1.01x the requests of every
request on all ranks, the second 1.20x."""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable

from ..distributed.placement import sub_layouts
from .cost import estimate
from .fit import make_spec
from .hardware import load_hardware
from .model_dims import load_model_dims

WITHIN = 1.05        # idle: a degree this close to the fastest is as good, and leaves ranks free
LOADED_SLACK = 2.0   # loaded: the cheapest degree whose time is within this of the fastest
MIN_BUCKET = 64


def _bucket(tokens: int) -> int:
    """The power of two at or above `tokens` (at least MIN_BUCKET): the model is asked once per bucket."""
    return max(MIN_BUCKET, 1 << max(0, tokens - 1).bit_length())


def choose_degree(times: dict[int, float], loaded: bool) -> int:
    """degree -> predicted seconds (the degrees that fit) -> the degree a request gets."""
    best = min(times.values())
    if not loaded:
        return min(d for d, t in times.items() if t <= WITHIN * best)
    return min((d for d, t in times.items() if t <= LOADED_SLACK * best), key=lambda d: (times[d] * d, d))


class DegreeModel:
    def __init__(self, dims, hw, tp: int, ulysses: int, ring: int, chunk_size: int | None, dtype: str, kv_dtype: str):
        self.dims, self.hw, self.tp = dims, hw, tp
        self.layouts = sub_layouts(ulysses, ring)
        self.chunk_size, self.dtype, self.kv_dtype = chunk_size, dtype, kv_dtype
        self._memo: dict[tuple, int] = {}

    def times(self, prompt: int, new: int) -> dict[int, float]:
        """degree -> predicted seconds of a request of that size, where it fits a device (the
        launched degree always: the scheduler checks the pool)."""
        spec = make_spec(self.hw, prompt + new, new, self.chunk_size, self.dtype, kv_dtype=self.kv_dtype)
        sp, out = self.layouts[-1][0] * self.layouts[-1][1], {}
        for u, r in self.layouts:
            cost = estimate(self.dims, self.hw, self.tp, u, r, 1, spec)
            if cost.memory_gib_per_device <= self.hw.memory_gib or u * r == sp:
                out[u * r] = cost.prefill_seconds + new * cost.decode_ms_per_token / 1000.0
        return out

    def __call__(self, prompt: int, new: int, loaded: bool = False) -> int:
        key = (_bucket(prompt), _bucket(max(new, 1)), loaded)
        if key not in self._memo:
            self._memo[key] = choose_degree(self.times(*key[:2]), loaded)
        return self._memo[key]


def request_degrees(model_config, run, settings, hardware: str) -> Callable[[int, int, bool], int] | None:
    """The engine's degree_for(prompt, new, loaded) for this run on `hardware` (a configs/hardware
    entry: this machine's), or None: elastic placement is off, or there is one SP rank."""
    d = run.dims
    if not settings.elastic or d.sp == 1:
        return None
    if d.pp != 1:
        raise ValueError(f"elastic placement splits the sequence-parallel ranks of one stage; this layout has "
                         f"pp={d.pp}: run it with pp=1, or turn elastic placement off")
    if settings.min_sp_tokens is not None:
        threshold, every = settings.min_sp_tokens, d.sp
        return lambda prompt, new, loaded=False: 1 if prompt < threshold else every
    return DegreeModel(load_model_dims(model_config.to_dict()), load_hardware(hardware), d.tp, d.ulysses,
                       d.ring, run.chunk_size, run.dtype, run.kv_dtype)


def trace_lengths(median: int, longest: int, count: int = 200) -> list[int]:
    """A log-normal trace of prompt lengths (deterministic quantiles): half under `median`, the
    longest 1% reaching `longest`."""
    normal = NormalDist()
    spread = math.log(longest / median) / normal.inv_cdf(0.99)
    return [min(longest, max(1, round(median * math.exp(spread * normal.inv_cdf((i + 0.5) / count)))))
            for i in range(count)]


def trace_throughput(dims, hw, tp: int, ulysses: int, ring: int, lengths: list[int], new: int, chunk_size: int | None,
                     dtype: str, kv_dtype: str = "auto", loaded: bool = False) -> dict:
    """Predicted requests per second of a trace, elastic over every request on all SP ranks, on
    paper, with the rule for an idle server or a loaded one (choose_degree). Assumptions: each
    request runs alone on its block (no batching beside it), blocks are packed perfectly (a
    rank-second is a rank-second), a request's time at a degree is the cost model's."""
    model = DegreeModel(dims, hw, tp, ulysses, ring, chunk_size, dtype, kv_dtype)
    sp = ulysses * ring
    fixed = elastic = 0.0
    degrees = []
    for n in lengths:
        times = model.times(n, new)
        d = choose_degree(times, loaded)
        degrees.append(d)
        fixed += times[sp]                 # every request on every rank, one after another
        elastic += times[d] * d / sp       # its rank-seconds, over the ranks there are
    return {"requests": len(lengths), "fixed_requests_per_s": len(lengths) / fixed,
            "elastic_requests_per_s": len(lengths) / elastic, "elastic_over_fixed": fixed / elastic,
            "degrees": {d: degrees.count(d) for d in sorted(set(degrees))},
            "median_tokens": sorted(lengths)[len(lengths) // 2], "longest_tokens": max(lengths)}
