"""Evaluate every layout of a world, reject those that break a rule, pick the best.

Rules from the seed (REFERENCES.md): TP within a node, SP above about 32K tokens,
ring where heads don't divide, PP only when nothing else fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from ..options import check_positive_int, check_values
from .cost import LayoutCost, RunSpec, estimate
from .fit import PlanError, fitting_layouts, make_spec, memory_reason, what_would_fit
from .hardware import Hardware, load_hardware
from .model_dims import ModelDims, load_model_dims
from .rules import DEGREE_NAMES, enumerate_layouts, node_size, pipeline_warnings, structural_errors

# Above this prompt length sequence parallelism pays off (seed: "SP above ~32K tokens").
LONG_CONTEXT_TOKENS = 32 * 1024


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


def evaluate_layout(dims: ModelDims, hw: Hardware, world: int, tp: int, ulysses: int,
                    ring: int, pp: int, spec: RunSpec, gpus_per_node: Optional[int] = None,
                    fitting: Optional[list] = None) -> LayoutPlan:
    """Verdict and costs of one layout; ``fitting`` names alternatives in memory errors."""
    reasons = structural_errors(dims, tp, ulysses, ring, pp, world, gpus_per_node)
    ints = all(isinstance(v, int) and v >= 1 for v in (tp, ulysses, ring, pp))
    cost = estimate(dims, hw, tp, ulysses, ring, pp, spec, gpus_per_node) if ints else None
    if cost is not None and cost.memory_gib_per_device > hw.memory_gib:
        if fitting is None:
            fitting = fitting_layouts(dims, hw, world, gpus_per_node, spec)
        reasons.append(memory_reason(cost.memory_gib_per_device, hw, fitting))
    warnings = pipeline_warnings(pp, spec.context, cost.chunk_size, cost.pipeline_bubble) if cost else []
    return LayoutPlan(tp, ulysses, ring, pp, not reasons, reasons, warnings, cost)


def evaluate_all(dims: ModelDims, hw: Hardware, world: int, spec: RunSpec,
                 gpus_per_node: Optional[int] = None,
                 fixed: Optional[Mapping[str, Optional[int]]] = None) -> list[LayoutPlan]:
    """Every layout of the world (matching the fixed degrees), evaluated."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    fitting = fitting_layouts(dims, hw, world, gpus_per_node, spec)
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
        sequence_parallel = [c for c in pool if c.ulysses * c.ring > 1]
        pool = sequence_parallel or pool
        goal = "prefill"
        rule = (f"{context:,} tokens > {LONG_CONTEXT_TOKENS // 1024}K: "
                + ("sequence parallel with the fastest prefill" if sequence_parallel
                   else "no sequence-parallel layout is valid here; fastest prefill"))
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
         ring_mode: str = RunSpec.ring_mode, sequence_layout: str = RunSpec.sequence_layout,
         fixed: Optional[Mapping[str, Optional[int]]] = None, kv_dtype: str = RunSpec.kv_dtype) -> Plan:
    """Evaluate the layouts of ``world`` devices and choose one; PlanError if none is valid."""
    dims = load_model_dims(model)
    hw = load_hardware(hardware)
    check_positive_int("the number of GPUs", world, PlanError)
    check_values({"workload": workload}, error=PlanError)
    gpn = gpus_per_node or hw.gpus_per_node
    spec = make_spec(hw, context, new_tokens, chunk_size, dtype, ffn_dtype, ring_mode,
                     sequence_layout, kv_dtype)
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
            + what_would_fit(dims, hw, world, gpn, spec), candidates)
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
                    dtype: Optional[str] = None, kv_dtype: str = "auto") -> list[str]:
    """Reasons a layout is invalid (empty list = ok). Memory is checked when both
    ``hardware`` and ``context`` are given."""
    dims = load_model_dims(dims)
    reasons = structural_errors(dims, tp, ulysses, ring, pp, world, gpus_per_node)
    if reasons or hardware is None or context is None:
        return reasons
    hw = load_hardware(hardware)
    spec = make_spec(hw, context, new_tokens, chunk_size, dtype, kv_dtype=kv_dtype)
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
