"""A quantised KV cache: int8, int4 (two per byte) or fp8 e4m3, one scale per token and KV head.

A key's (or value's) d numbers are stored as round(x / s) with s = max|x| / qmax (fp8: x / s in
e4m3, whose largest finite number is 448), s kept in fp32. The scale of a token depends on
that token's numbers alone, so the stored cache is the same whatever the layout (which rank
holds the token, which chunk brought it): quantisation never depends on the parallelism.
Attention reads a quantised cache a block of keys at a time, dequantised to the compute dtype
inside the read, so no full-precision copy of the cache ever exists; the chunk being prefilled
attends to itself as it will be stored (quantised and back), so where a prompt's chunks begin and
end (alone, or in the engine's budgeted pieces beside other requests) does not change its answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import merge_partials
from .kv_formats import CAST, KV_DTYPES, QUANTIZED, bytes_per_token_head, cache_kind, stored_width  # noqa: F401

CAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the torch dtype of each kv_formats.CAST kind
READ_BLOCK = 16384  # keys dequantised at a time: bounds the temporary copy at a million-token shard
_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B, g, S, d] -> (data [B, g, S, d'] in the storage dtype, scale [B, g, S] fp32 or None)."""
    if kind in CAST:
        return x.to(CAST_DTYPE[kind]), None
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / _QMAX[kind]).clamp_min(torch.finfo(torch.float32).tiny)  # [B, g, S]
    y = xf / scale[..., None]
    if kind == "fp8":
        return y.to(torch.float8_e4m3fn), scale
    q = torch.round(y).clamp_(-_QMAX[kind], _QMAX[kind])
    if kind == "int8":
        return q.to(torch.int8), scale
    u = (q + 8).to(torch.uint8)                      # [B, g, S, d] in 1..15
    return u[..., 0::2] | (u[..., 1::2] << 4), scale  # [B, g, S, d/2]: even numbers low, odd high


def dequantize(data: torch.Tensor, scale: torch.Tensor | None, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of quantize, in `dtype`: [B, g, S, d]."""
    if kind in CAST:
        return data.to(dtype)
    if kind == "int4":
        low, high = (data & 0xF).to(torch.int8) - 8, (data >> 4).to(torch.int8) - 8
        y = torch.stack([low, high], dim=-1).flatten(-2).float()  # [B, g, S, d]: interleaved back
    else:
        y = data.float()
    return (y * scale[..., None]).to(dtype)


@dataclass
class StoredKV:
    """A shard's keys and values as stored: plain ([B, g, L, d] in the model's dtype) or quantised
    (data and fp32 scales [B, g, L])."""

    k: torch.Tensor
    v: torch.Tensor
    kind: str | None = None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @property
    def scaled(self) -> bool:
        return self.kind is not None and self.kind not in CAST

    def tensors(self) -> list[torch.Tensor]:
        """What travels for it (a ring hop)."""
        return [self.k, self.v, self.k_scale, self.v_scale] if self.scaled else [self.k, self.v]

    def shapes(self, length: int) -> list[tuple[int, ...]]:
        """The shapes tensors() has for `length` keys (what a receiver allocates)."""
        return [(*t.shape[:2], length, *t.shape[3:]) for t in self.tensors()]

    def like(self, tensors: list[torch.Tensor]) -> "StoredKV":
        """The same kind of StoredKV over received tensors."""
        return StoredKV(tensors[0], tensors[1], self.kind, *tensors[2:])

    def slice(self, a: int, b: int) -> "StoredKV":
        pick = (slice(None), slice(None), slice(a, b))
        return self.like([t[pick] for t in self.tensors()])

    def segments(self):
        """(offset, StoredKV) of each stored run of keys: itself, whole."""
        yield 0, self

    def blocks(self, dtype: torch.dtype, size: int = READ_BLOCK):
        """(start, k, v) [B, g, n, d] in `dtype` per block of keys: a plain cache is one block,
        as it is (no copy); a quantised one is dequantised a block at a time. An empty cache (a
        shard its window evicted) is one empty block, as a plain one is: the kernels give it its
        empty partial (-inf lse)."""
        if self.kind is None:
            yield 0, self.k, self.v
            return
        for a in range(0, max(self.length, 1), size):
            part = self.slice(a, a + size)
            yield a, dequantize(part.k, part.k_scale, self.kind, dtype), dequantize(part.v, part.v_scale, self.kind,
                                                                                      dtype)


def round_trip(x: torch.Tensor, kind: str | None) -> torch.Tensor:
    """x as a cache of `kind` would give it back (itself when nothing is converted)."""
    return x if kind is None else dequantize(*quantize(x, kind), kind, x.dtype)


class ChainedKV:
    """Keys stored in runs one after another, read as one StoredKV: a document's keys shared by
    reference, then a request's own. Attention reads each run where it lies (a partial per run,
    merged by log-sum-exp); only what must travel as one message (a ring hop) is copied together."""

    def __init__(self, parts: list):
        flat = [run for part in parts for run in (part.parts if isinstance(part, ChainedKV) else [part])]
        self.parts = [p for p in flat if p.length] or flat[:1]
        self.kind = flat[0].kind

    @property
    def length(self) -> int:
        return sum(p.length for p in self.parts)

    @property
    def scaled(self) -> bool:
        return self.parts[0].scaled

    def segments(self):
        offset = 0
        for part in self.parts:
            yield offset, part
            offset += part.length

    def blocks(self, dtype: torch.dtype, size: int = READ_BLOCK):
        for offset, part in self.segments():
            for start, k, v in part.blocks(dtype, size):
                yield offset + start, k, v

    def tensors(self) -> list[torch.Tensor]:
        """The runs joined (a copy): what one ring hop carries."""
        planes = [p.tensors() for p in self.parts]
        return [torch.cat(ts, dim=2) for ts in zip(*planes)]

    def shapes(self, length: int) -> list[tuple[int, ...]]:
        return self.parts[0].shapes(length)

    def slice(self, a: int, b: int) -> "ChainedKV":
        """Keys a..b of the chain, each run cut where it lies (views)."""
        cut = [part.slice(max(a - at, 0), min(b - at, part.length)) for at, part in self.segments()
               if at < b and at + part.length > a]
        return ChainedKV(cut or [self.parts[0].slice(0, 0)])

    def like(self, tensors: list[torch.Tensor]) -> StoredKV:
        return self.parts[0].like(tensors)


def attend_stored(q, stored: StoredKV, kernel):
    """Merge of kernel(q, k, v, start) -> (out, lse) over the blocks of a stored cache."""
    out = lse = None
    for start, k, v in stored.blocks(q.dtype):
        o, l = kernel(q, k, v, start)
        out, lse = (o.float(), l) if out is None else merge_partials(out, lse, o, l)
    return out, lse
