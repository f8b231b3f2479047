"""How many sequence-parallel ranks one request spans under elastic placement: the fewest whose
predicted time (prefill, then its answer's decode steps) is within a few percent of the
fastest degree's, by the same cost model that chooses layouts (toolkit.planner.cost) for this
machine's hardware entry. A short chat runs on one rank (the others serve other requests);
a long prompt spans what makes it fast. Whether its cache fits is the scheduler's part."""
from __future__ import annotations

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


def request_degrees(model_config, run, settings) -> Callable[[int, int], int] | None:
    """The engine's degree_for(prompt, new) for this run (None: elastic placement is off, or
    there is one SP rank: every request spans every rank)."""
    d = run.dims
    if not settings.elastic or d.sp == 1:
        return None
    if d.pp != 1:
        raise ValueError(f"elastic placement splits the sequence-parallel ranks of one stage; this layout has "
                         f"pp={d.pp}: run it with pp=1, or turn elastic placement off")
    if settings.min_sp_tokens is not None:
        threshold, every = settings.min_sp_tokens, d.sp
        return lambda prompt, new: 1 if prompt < threshold else every
    from ..config import detect_hardware

    return DegreeModel(load_model_dims(model_config.to_dict()), load_hardware(detect_hardware()), d.tp, d.ulysses,
                       d.ring, run.chunk_size, run.dtype, run.kv_dtype)
