"""Memory and prefill time against context length, one line per strategy."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

from .choose import evaluate_all, evaluate_layout
from .cost import RunSpec
from .hardware import Hardware
from .model_dims import ModelDims
from .rules import DEGREE_NAMES, structural_errors


def strategy_name(degrees: dict[str, int]) -> str:
    """'TP', 'Ulysses x ring', ... from the degrees above one; any PP is one strategy."""
    if degrees["pp"] > 1:
        return "with PP"
    names = {"tp": "TP", "ulysses": "Ulysses", "ring": "ring"}
    used = [names[k] for k in ("tp", "ulysses", "ring") if degrees[k] > 1]
    return " x ".join(used) or "single device"


def context_grid(context: int, points: int = 10) -> list[int]:
    """Log-spaced prompt lengths from 1K tokens to four times the asked context."""
    top = max(4 * context, 8192)
    low = 1024
    return sorted({int(round(low * (top / low) ** (i / (points - 1)))) for i in range(points)})


def representative_layouts(dims: ModelDims, hw: Hardware, world: int, gpus_per_node: int,
                           spec: RunSpec) -> dict[str, tuple[int, int, int, int]]:
    """One layout per strategy: its fastest valid one at the asked context (or, if
    none fits, the one needing least memory), held fixed along the curve."""
    best: dict[str, tuple] = {}
    for cand in evaluate_all(dims, hw, world, spec, gpus_per_node):
        if structural_errors(dims, cand.tp, cand.ulysses, cand.ring, cand.pp, world,
                             gpus_per_node):
            continue
        cost = cand.cost
        key = (not cand.valid, cost.prefill_seconds if cand.valid else cost.memory_gib_per_device)
        name = strategy_name(cand.degrees)
        if name not in best or key < best[name][0]:
            best[name] = (key, (cand.tp, cand.ulysses, cand.ring, cand.pp))
    return {name: layout for name, (_, layout) in best.items()}


def strategy_curves(dims: ModelDims, hw: Hardware, world: int, gpus_per_node: int,
                    spec: RunSpec, contexts: list[int]) -> dict[str, dict[str, list[float]]]:
    """Per strategy: memory at every context (even past the device, so the crossing
    shows) and prefill seconds where the layout fits."""
    curves: dict[str, dict[str, list[float]]] = {}
    for name, layout in representative_layouts(dims, hw, world, gpus_per_node, spec).items():
        degrees = " ".join(f"{k}={v}" for k, v in zip(DEGREE_NAMES, layout) if v > 1)
        label = f"{name} ({degrees or 'one device'})"
        line = curves[label] = {"memory_gib": [], "prefill_seconds": []}
        for context in contexts:
            trial = RunSpec(**{**spec.__dict__, "context": context})
            cand = evaluate_layout(dims, hw, world, *layout, trial, gpus_per_node, fitting=[])
            line["memory_gib"].append(cand.cost.memory_gib_per_device)
            line["prefill_seconds"].append(cand.cost.prefill_seconds if cand.valid
                                           else math.nan)
    return curves


def plot_strategies(dims: ModelDims, hw: Hardware, world: int, gpus_per_node: int,
                    spec: RunSpec, path: Union[str, Path],
                    contexts: Optional[list[int]] = None) -> Path:
    """Write a two-panel PNG: memory per device and prefill seconds vs context."""
    import matplotlib  # lazy: only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = contexts or context_grid(spec.context)
    curves = strategy_curves(dims, hw, world, gpus_per_node, spec, contexts)
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = "osD^v<>px*"
    for index, (name, line) in enumerate(sorted(curves.items())):
        style = {"marker": markers[index % len(markers)], "label": name,
                 "linestyle": "-" if index < 10 else "--"}
        mem_ax.plot(contexts, line["memory_gib"], **style)
        time_ax.plot(contexts, line["prefill_seconds"], **style)
    mem_ax.axhline(hw.memory_gib, color="black", linestyle="--",
                   label=f"{hw.name} memory ({hw.memory_gib:g} GiB)")
    time_ax.set_yscale("log")
    mem_ax.set_ylim(bottom=0)
    for ax in (mem_ax, time_ax):
        ax.set_xscale("log")
        ax.set_xlabel("prompt tokens")
        ax.axvline(spec.context, color="grey", linestyle=":")
        ax.grid(True, which="both", alpha=0.3)
    mem_ax.set_ylabel("GiB per device")
    mem_ax.set_title("memory per device")
    time_ax.set_ylabel("predicted prefill seconds")
    time_ax.set_title("prefill time (only where the layout fits)")
    mem_ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{dims.name} on {world} x {hw.name} ({spec.dtype})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
