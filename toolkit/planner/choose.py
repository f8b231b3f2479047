"""Evaluate every layout of a world, reject those that break a rule, pick the best.

Rules from the seed (REFERENCES.md): TP within a node, SP above about 32K tokens,
ring where heads don't divide, PP only when nothing else fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from .cost import RING_MODES, SEQUENCE_LAYOUTS, LayoutCost, RunSpec, estimate, memory_gib
from .hardware import DTYPE_BYTES, Hardware, list_hardware, load_hardware
from .model_dims import ModelDims, load_model_dims
from .rules import (DEGREE_NAMES, enumerate_layouts, node_size, pipeline_warnings,
                    structural_errors)

# Above this prompt length sequence parallelism pays off (seed: "SP above ~32K tokens").
LONG_CONTEXT_TOKENS = 32 * 1024
WORKLOADS = ("prefill", "decode", "auto")


class PlanError(ValueError):
    """No layout (or not the requested one) obeys the rules; says what would work."""

    def __init__(self, message: str, candidates: Optional[list["LayoutPlan"]] = None):
        super().__init__(message)
        self.candidates = candidates or []


@dataclass
class LayoutPlan:
    """One candidate layout with its verdict and predicted costs."""

    tp: int
    ulysses: int
    ring: int
    pp: int
    valid: bool
    reasons: list[str]
    warnings: list[str]
    cost: LayoutCost

    @property
    def degrees(self) -> dict[str, int]:
        return {"tp": self.tp, "ulysses": self.ulysses, "ring": self.ring, "pp": self.pp}

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.degrees.items() if v > 1]
        return " ".join(parts) or "single device"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.degrees)
        out.update(valid=self.valid, reasons=list(self.reasons), warnings=list(self.warnings))
        out.update(self.cost.to_dict())
        return out


@dataclass
class Plan:
    """The chosen layout, why, and every candidate considered."""

    chosen: LayoutPlan
    candidates: list[LayoutPlan]
    workload: str
    why: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen.to_dict()
        chosen["why"] = self.why
        return {"chosen": chosen, "candidates": [c.to_dict() for c in self.candidates],
                "workload": self.workload, "warnings": list(self.warnings)}


def make_spec(hw: Hardware, context: int, new_tokens: int = 256,
              chunk_size: Optional[int] = None, dtype: Optional[str] = None,
              ffn_dtype: Optional[str] = None, ring_mode: str = "auto",
              sequence_layout: str = "zigzag") -> RunSpec:
    """Check the run options and fill the hardware's default dtype."""
    dtype = hw.default_dtype if dtype in (None, "auto") else dtype
    checks = [("dtype", dtype, ("float32", "bfloat16", "float16")),
              ("ffn_dtype", ffn_dtype, (None, "fp8")),
              ("ring_mode", ring_mode, RING_MODES),
              ("sequence_layout", sequence_layout, SEQUENCE_LAYOUTS)]
    for key, value, allowed in checks:
        if value not in allowed:
            names = ", ".join(str(a) for a in allowed if a is not None)
            raise PlanError(f"{key} {value!r} is not one of: {names}")
    if not isinstance(context, int) or context < 1:
        raise PlanError(f"context must be a positive number of tokens, got {context!r}")
    if new_tokens < 0 or (chunk_size is not None and chunk_size < 1):
        raise PlanError("new_tokens must be >= 0 and chunk_size >= 1")
    if ffn_dtype:
        hw.matmul_flops(ffn_dtype)  # raises if the part has no such rate
    return RunSpec(context=context, new_tokens=new_tokens, chunk_size=chunk_size,
                   dtype=dtype, ffn_dtype=ffn_dtype, ring_mode=ring_mode,
                   sequence_layout=sequence_layout)


def _fits(dims: ModelDims, hw: Hardware, world: int, gpus_per_node: Optional[int],
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


def _label(layout: tuple[int, int, int, int]) -> str:
    parts = [f"{k}={v}" for k, v in zip(DEGREE_NAMES, layout) if v > 1]
    return " ".join(parts) or "one device"


def _memory_reason(mem: float, hw: Hardware, fitting: list) -> str:
    text = f"needs {mem:.1f} GiB per GPU, {hw.name} has {hw.memory_gib:g} GiB"
    if fitting:
        layout, fit_mem = fitting[0]
        return f"{text}; fits with {_label(layout)} ({fit_mem:.1f} GiB)"
    return f"{text}; no layout of this world fits"


def evaluate_layout(dims: ModelDims, hw: Hardware, world: int, tp: int, ulysses: int,
                    ring: int, pp: int, spec: RunSpec, gpus_per_node: Optional[int] = None,
                    fitting: Optional[list] = None) -> LayoutPlan:
    """Verdict and costs of one layout; ``fitting`` names alternatives in memory errors."""
    reasons = structural_errors(dims, tp, ulysses, ring, pp, world, gpus_per_node)
    ints = all(isinstance(v, int) and v >= 1 for v in (tp, ulysses, ring, pp))
    cost = estimate(dims, hw, tp, ulysses, ring, pp, spec, gpus_per_node) if ints else None
    if cost is not None and cost.memory_gib_per_device > hw.memory_gib:
        if fitting is None:
            fitting = _fits(dims, hw, world, gpus_per_node, spec)
        reasons.append(_memory_reason(cost.memory_gib_per_device, hw, fitting))
    warnings = pipeline_warnings(pp, spec.context, cost.chunk_size) if cost else []
    return LayoutPlan(tp, ulysses, ring, pp, not reasons, reasons, warnings, cost)


def _what_would_fit(dims: ModelDims, hw: Hardware, world: int,
                    gpus_per_node: Optional[int], spec: RunSpec) -> str:
    """Suggest more GPUs, a shorter context or a bigger GPU, whichever makes a fit."""
    hints = []
    node = gpus_per_node or hw.gpus_per_node
    for more in (world * 2 ** k for k in range(1, 8)):
        fit = _fits(dims, hw, more, gpus_per_node, spec)
        if fit:
            hints.append(f"{more} GPUs ({_label(fit[0][0])}, {fit[0][1]:.1f} GiB each)")
            break
    low, high = 0, spec.context
    while low < high:  # longest prompt that fits on this world
        mid = (low + high + 1) // 2
        trial = RunSpec(**{**spec.__dict__, "context": mid})
        if _fits(dims, hw, world, gpus_per_node, trial):
            low = mid
        else:
            high = mid - 1
    if low >= 1:
        hints.append(f"a prompt of at most {low:,} tokens on {world} GPUs")
    for name in list_hardware():
        other = load_hardware(name)
        if other.memory_gib > hw.memory_gib and other.name != hw.name:
            fit = _fits(dims, other, world, gpus_per_node, spec)
            if fit:
                hints.append(f"{world} x {other.name} ({other.memory_gib:g} GiB) with "
                             f"{_label(fit[0][0])}")
                break
    if not hints:
        return "nothing tried fits; shard further or quantize the weights"
    return "would fit: " + "; or ".join(hints)


def evaluate_all(dims: ModelDims, hw: Hardware, world: int, spec: RunSpec,
                 gpus_per_node: Optional[int] = None,
                 fixed: Optional[Mapping[str, Optional[int]]] = None) -> list[LayoutPlan]:
    """Every layout of the world (matching the fixed degrees), evaluated."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    fitting = _fits(dims, hw, world, gpus_per_node, spec)
    layouts = [lay for lay in enumerate_layouts(world)
               if all(dict(zip(DEGREE_NAMES, lay))[k] == v for k, v in fixed.items())]
    if not layouts and len(fixed) == 4:  # a forced layout whose product is off
        layouts = [tuple(fixed[k] for k in DEGREE_NAMES)]
    return [evaluate_layout(dims, hw, world, *lay, spec, gpus_per_node, fitting)
            for lay in layouts]


def _objective(workload: str):
    if workload == "decode":
        return lambda c: (c.cost.decode_ms_per_token, c.cost.prefill_seconds)
    return lambda c: (c.cost.prefill_seconds, c.cost.decode_ms_per_token)


def choose(candidates: list[LayoutPlan], workload: str, context: int) -> tuple[LayoutPlan, str]:
    """Best valid candidate for the workload and a sentence saying why.

    "auto": a prompt up to LONG_CONTEXT_TOKENS is served for latency with the
    largest TP; a longer one prefers sequence parallelism and the fastest prefill.
    """
    valid = [c for c in candidates if c.valid]
    if not valid:
        raise PlanError("no valid layout", candidates)
    pool = [c for c in valid if c.pp == 1]
    why_pp = "" if pool else "; pipeline parallel because no layout without it fits"
    pool = pool or valid
    if workload == "auto" and context > LONG_CONTEXT_TOKENS:
        pool = [c for c in pool if c.ulysses * c.ring > 1] or pool
        goal = "prefill"
        rule = (f"{context:,} tokens > {LONG_CONTEXT_TOKENS // 1024}K: sequence parallel "
                "with the fastest prefill")
    elif workload == "auto":
        top = max(c.tp for c in pool)
        pool = [c for c in pool if c.tp == top]
        goal = "decode"
        rule = (f"{context:,} tokens <= {LONG_CONTEXT_TOKENS // 1024}K: the largest valid "
                f"TP ({top}) for decode latency")
    else:
        goal = workload
        rule = "fastest prefill" if goal == "prefill" else "lowest decode latency"
    ranked = sorted(pool, key=_objective(goal))
    best = ranked[0]
    c = best.cost
    why = (f"{best.label}: {rule}{why_pp}; predicted prefill {c.prefill_seconds:.3g} s, "
           f"decode {c.decode_ms_per_token:.3g} ms/token, "
           f"{c.memory_gib_per_device:.1f} GiB per device")
    if len(ranked) > 1:
        nxt = ranked[1]
        metric = ("prefill_seconds", "s") if goal == "prefill" else ("decode_ms_per_token", "ms")
        why += (f"; next best {nxt.label} at {getattr(nxt.cost, metric[0]):.3g} "
                f"{metric[1]}")
    rejected = len(candidates) - len(valid)
    if rejected:
        why += f"; {rejected} of {len(candidates)} layouts rejected"
    return best, why


def plan(model: Union[str, Mapping, ModelDims], hardware: Union[str, Hardware], world: int,
         context: int, new_tokens: int = 256, workload: str = "auto",
         gpus_per_node: Optional[int] = None, chunk_size: Optional[int] = None,
         dtype: Optional[str] = None, ffn_dtype: Optional[str] = None,
         ring_mode: str = "auto", sequence_layout: str = "zigzag",
         fixed: Optional[Mapping[str, Optional[int]]] = None) -> Plan:
    """Evaluate the layouts of ``world`` devices and choose one; PlanError if none is valid."""
    dims = load_model_dims(model)
    hw = load_hardware(hardware)
    if not isinstance(world, int) or world < 1:
        raise PlanError(f"the number of GPUs must be a positive integer, got {world!r}")
    if workload not in WORKLOADS:
        raise PlanError(f"workload {workload!r} is not one of: {', '.join(WORKLOADS)}")
    gpn = gpus_per_node or hw.gpus_per_node
    spec = make_spec(hw, context, new_tokens, chunk_size, dtype, ffn_dtype, ring_mode,
                     sequence_layout)
    candidates = evaluate_all(dims, hw, world, spec, gpn, fixed)
    if not candidates:
        given = {k: v for k, v in (fixed or {}).items() if v is not None}
        text = ", ".join(f"{k}={v}" for k, v in given.items())
        raise PlanError(f"fixed degrees {text} do not divide the world of {world} ranks; "
                        "tp*ulysses*ring*pp must equal the world size")
    warnings = []
    if context + new_tokens > dims.max_position_embeddings:
        warnings.append(f"{context + new_tokens:,} tokens exceed {dims.name}'s "
                        f"{dims.max_position_embeddings:,} trained positions")
    if not any(c.valid for c in candidates):
        given = {k: v for k, v in (fixed or {}).items() if v is not None}
        if len(given) == len(DEGREE_NAMES):
            raise PlanError(f"layout {candidates[0].label} is not valid: "
                            + "; ".join(candidates[0].reasons), candidates)
        if given:
            text = ", ".join(f"{k}={v}" for k, v in given.items())
            raise PlanError(f"no layout with {text} is valid on {world} x {hw.name}; "
                            f"closest: {_closest(candidates)}", candidates)
        raise PlanError(
            f"{dims.name} at {context:,} tokens fits no layout of {world} x {hw.name} "
            f"({node_size(world, gpn)} per node): "
            + _what_would_fit(dims, hw, world, gpn, spec), candidates)
    best, why = choose(candidates, workload, context)
    blocked = structural_errors(dims, best.tp, best.ulysses * best.ring, 1, best.pp,
                                world, gpn) if best.ring > 1 else []
    if blocked:  # say why ring and not Ulysses carries this factor
        why += f"; ring, not Ulysses={best.ulysses * best.ring}, because: {blocked[0]}"
    return Plan(best, candidates, workload, why, warnings)


def _closest(candidates: list[LayoutPlan], count: int = 2) -> str:
    """The candidates that break the fewest rules, with their reasons."""
    ranked = sorted(candidates, key=lambda c: (len(c.reasons), c.cost.memory_gib_per_device
                                               if c.cost else 0.0))
    return " | ".join(f"{c.label}: {'; '.join(c.reasons)}" for c in ranked[:count])


def validate_layout(dims: Union[ModelDims, Mapping, str], tp: int, ulysses: int, ring: int,
                    pp: int, world: int, gpus_per_node: Optional[int] = None,
                    hardware: Union[str, Hardware, None] = None,
                    context: Optional[int] = None, new_tokens: int = 0,
                    chunk_size: Optional[int] = None,
                    dtype: Optional[str] = None) -> list[str]:
    """Reasons a layout is invalid (empty list = ok). Memory is checked when both
    ``hardware`` and ``context`` are given."""
    dims = load_model_dims(dims)
    reasons = structural_errors(dims, tp, ulysses, ring, pp, world, gpus_per_node)
    if reasons or hardware is None or context is None:
        return reasons
    hw = load_hardware(hardware)
    spec = make_spec(hw, context, new_tokens, chunk_size, dtype)
    return evaluate_layout(dims, hw, world, tp, ulysses, ring, pp, spec,
                           gpus_per_node).reasons


def auto_layout(dims: Union[ModelDims, Mapping, str], world: int,
                gpus_per_node: Optional[int], context_tokens: int,
                hardware: Union[str, Hardware] = "cpu", new_tokens: int = 256,
                chunk_size: Optional[int] = None, dtype: Optional[str] = None,
                fixed: Optional[Mapping[str, Optional[int]]] = None) -> dict[str, Any]:
    """The layout the ``auto`` preset runs: TP for a short prompt, SP for a long one,
    ring where heads don't divide. Returns dict(tp, ulysses, ring, pp, why)."""
    result = plan(dims, hardware, world, context_tokens, new_tokens, "auto",
                  gpus_per_node or world, chunk_size, dtype, fixed=fixed)
    return {**result.chosen.degrees, "why": result.why}
