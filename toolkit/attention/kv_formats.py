"""The KV cache's storage formats by name, and what one token takes in each: shared by the cache
(attention.kv_quant) and the planner, which imports no torch."""
from __future__ import annotations

QUANTIZED = ("int8", "int4", "fp8")
CAST = ("bf16", "fp16")  # another float dtype, no scale
KV_DTYPES = ("auto",) + CAST + QUANTIZED
_MODEL_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}
SCALE_BYTES = 4  # one fp32 scale per token and KV head, for K and for V each


def cache_kind(kv_dtype: str, model_dtype: str) -> str | None:
    """What a cache stores for `--kv-dtype` (None: the model's own dtype, nothing converted)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    return None if kv_dtype == "auto" or _MODEL_DTYPE.get(kv_dtype) == model_dtype else kv_dtype


def stored_width(kind: str, head_dim: int) -> int:
    """Stored elements per token and head: int4 packs two numbers a byte."""
    if kind == "int4" and head_dim % 2:
        raise ValueError(f"--kv-dtype int4 packs two numbers a byte, so the head dim must be even, and this model's "
                         f"is {head_dim}: choose int8 or fp8")
    return head_dim // 2 if kind == "int4" else head_dim


def bytes_per_token_head(kind: str | None, head_dim: int, element_bytes: int) -> int:
    """Bytes one token's K (or V) takes for one KV head: d x the model's element bytes; bf16/fp16
    2d; int8 and fp8 d + a scale; int4 d/2 + a scale."""
    if kind is None:
        return head_dim * element_bytes
    if kind in CAST:
        return head_dim * 2
    return stored_width(kind, head_dim) + SCALE_BYTES
