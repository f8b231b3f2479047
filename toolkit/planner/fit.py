"""What fits in memory, and what to suggest when nothing does."""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..options import check_positive_int, check_values
from .spec import RunSpec
from .memory import GIB, activation_bytes, kv_cache_bytes, kv_token_bytes, memory_gib, weight_bytes
from .hardware import DTYPE_BYTES, Hardware, list_hardware, load_hardware
from .model_dims import ModelDims
from .rules import DEGREE_NAMES, enumerate_layouts, structural_errors


class PlanError(ValueError):
    """No layout (or not the requested one) obeys the rules; says what would work."""

    def __init__(self, message: str, candidates: Optional[list] = None):
        super().__init__(message)
        self.candidates = candidates or []


def make_spec(hw: Hardware, context: int, new_tokens: int = 256,
              chunk_size: Optional[int] = None, dtype: Optional[str] = None,
              ffn_dtype: Optional[str] = None, ring_mode: str = RunSpec.ring_mode,
              sequence_layout: str = RunSpec.sequence_layout, kv_dtype: str = RunSpec.kv_dtype) -> RunSpec:
    """Check the run options and fill the hardware's default dtype."""
    dtype = hw.default_dtype if dtype in (None, "auto") else dtype
    check_values({"dtype": dtype, "ffn_dtype": ffn_dtype, "ring_mode": ring_mode, "sequence_layout": sequence_layout,
                  "kv_dtype": kv_dtype, "chunk_size": chunk_size}, decided=True, error=PlanError)
    check_positive_int("context", context, PlanError)
    if new_tokens < 0:
        raise PlanError(f"new_tokens must be >= 0, got {new_tokens!r}")
    if ffn_dtype:
        hw.matmul_flops(ffn_dtype)  # raises if the part has no such rate
    return RunSpec(context=context, new_tokens=new_tokens, chunk_size=chunk_size,
                   dtype=dtype, ffn_dtype=ffn_dtype, ring_mode=ring_mode,
                   sequence_layout=sequence_layout, kv_dtype=kv_dtype)


def fitting_layouts(dims: ModelDims, hw: Hardware, world: int,
                    gpus_per_node: Optional[int],
                    spec: RunSpec) -> list[tuple[tuple[int, int, int, int], float]]:
    """Layouts of this world that obey every rule, with their memory, pp=1 first."""
    found = []
    for layout in enumerate_layouts(world):
        if structural_errors(dims, *layout, world, gpus_per_node):
            continue
        mem = memory_gib(dims, *layout, spec)
        if mem <= hw.memory_gib:
            found.append((layout, mem))
    found.sort(key=lambda item: (item[0][3] > 1, item[1]))
    return found


def layout_label(layout: tuple[int, int, int, int]) -> str:
    """'tp=8 ring=2' style name of a layout."""
    parts = [f"{k}={v}" for k, v in zip(DEGREE_NAMES, layout) if v > 1]
    return " ".join(parts) or "one device"


def memory_reason(mem: float, hw: Hardware, fitting: list) -> str:
    """vLLM-style: how much is needed, how much there is, and what would fit."""
    text = f"needs {mem:.1f} GiB per GPU, {hw.name} has {hw.memory_gib:g} GiB"
    if fitting:
        layout, fit_mem = fitting[0]
        return f"{text}; fits with {layout_label(layout)} ({fit_mem:.1f} GiB)"
    return f"{text}; no layout of this world fits"


def what_would_fit(dims: ModelDims, hw: Hardware, world: int,
                   gpus_per_node: Optional[int], spec: RunSpec) -> str:
    """Suggest more GPUs, a shorter context or a bigger GPU, whichever makes a fit."""
    hints = []
    for more in (world * 2 ** k for k in range(1, 8)):
        fit = fitting_layouts(dims, hw, more, gpus_per_node, spec)
        if fit:
            hints.append(f"{more} GPUs ({layout_label(fit[0][0])}, "
                         f"{fit[0][1]:.1f} GiB each)")
            break
    low, high = 0, spec.context
    while low < high:  # longest prompt that fits on this world
        mid = (low + high + 1) // 2
        trial = RunSpec(**{**spec.__dict__, "context": mid})
        if fitting_layouts(dims, hw, world, gpus_per_node, trial):
            low = mid
        else:
            high = mid - 1
    if low >= 1:
        hints.append(f"a prompt of at most {low:,} tokens on {world} GPUs")
    bigger = sorted((load_hardware(name) for name in list_hardware()),
                    key=lambda other: other.memory_gib)
    for other in bigger:  # the smallest part that is enough
        if other.memory_gib > hw.memory_gib:
            fit = fitting_layouts(dims, other, world, gpus_per_node, spec)
            if fit:
                hints.append(f"{world} x {other.name} ({other.memory_gib:g} GiB) with "
                             f"{layout_label(fit[0][0])}")
                break
    if not hints:
        return "nothing tried fits; shard further or quantize the weights"
    return "would fit: " + "; or ".join(hints)


def _size(count: float) -> str:
    return f"{count / GIB:.2f} GiB" if count >= GIB / 10 else f"{count / 2**20:.1f} MiB"


def memory_shortfall(dims: ModelDims, hw: Hardware, layout: tuple[int, int, int, int], world: int,
                     gpus_per_node: Optional[int], spec: RunSpec, available_bytes: float) -> Optional[str]:
    """None when the layout's per-rank memory (weights + KV cache + one chunk's activations)
    fits in `available_bytes`; else one sentence: needed, available, the longest prompt that
    fits this layout, and a layout of these ranks that fits the whole prompt."""
    if memory_gib(dims, *layout, spec) * GIB <= available_bytes:
        return None
    tp, ulysses, ring, pp = layout
    e = DTYPE_BYTES[spec.dtype]
    tokens = spec.context + spec.new_tokens
    weights = weight_bytes(dims, tp, pp, e, e)
    kv = kv_cache_bytes(dims, tp, ulysses, ring, pp, tokens, e, spec.chunk_for(ulysses * ring),
                        kv_token_bytes(dims, spec, e))
    acts = activation_bytes(dims, tp, ulysses, ring, spec.chunk_for(ulysses * ring), tokens, e)
    low, high = 0, spec.context
    while low < high:  # the longest prompt this layout holds
        mid = (low + high + 1) // 2
        if memory_gib(dims, *layout, dataclasses.replace(spec, context=mid)) * GIB <= available_bytes:
            low = mid
        else:
            high = mid - 1
    label = layout_label(layout)
    text = (f"{label} needs {_size(weights + kv + acts)} per rank ({_size(weights)} weights, {_size(kv)} KV cache for "
            f"{tokens:,} tokens, {_size(acts)} activations) but {_size(available_bytes)} is available; ")
    text += (f"the longest prompt that fits {label} is {low:,} tokens" if low
             else f"the weights alone do not fit {label}")
    budget = dataclasses.replace(hw, memory_gib=available_bytes / GIB)
    fits = [(lay, mem) for lay, mem in fitting_layouts(dims, budget, world, gpus_per_node, spec) if lay != layout]
    if fits:
        text += f"; {layout_label(fits[0][0])} fits the whole prompt ({fits[0][1]:.2f} GiB per rank)"
    else:
        text += f"; no layout of {world} rank(s) fits the whole prompt: add ranks or shorten it"
    return text
