"""Memory and prefill time against context length, one line per strategy."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

from .choose import evaluate_all
from .cost import RunSpec
from .hardware import Hardware
from .model_dims import ModelDims
from .rules import DEGREE_NAMES, structural_errors


def strategy_name(degrees: dict[str, int]) -> str:
    """'TP', 'Ulysses x ring', ... from the degrees above one ('single device' if none)."""
    names = {"tp": "TP", "ulysses": "Ulysses", "ring": "ring", "pp": "PP"}
    used = [names[k] for k in DEGREE_NAMES if degrees[k] > 1]
    return " x ".join(used) or "single device"


def context_grid(context: int, points: int = 10) -> list[int]:
    """Log-spaced prompt lengths from 1K tokens to four times the asked context."""
    top = max(4 * context, 8192)
    low = 1024
    return sorted({int(round(low * (top / low) ** (i / (points - 1)))) for i in range(points)})


def strategy_curves(dims: ModelDims, hw: Hardware, world: int, gpus_per_node: int,
                    spec: RunSpec, contexts: list[int]) -> dict[str, dict[str, list[float]]]:
    """Per strategy and context: memory and prefill time of its fastest layout.

    Memory is drawn for layouts that obey the head and node rules even when they
    overflow the device (so the crossing shows); time only where the layout fits.
    """
    curves: dict[str, dict[str, list[float]]] = {}
    for index, context in enumerate(contexts):
        trial = RunSpec(**{**spec.__dict__, "context": context})
        best: dict[str, object] = {}
        for cand in evaluate_all(dims, hw, world, trial, gpus_per_node):
            if structural_errors(dims, cand.tp, cand.ulysses, cand.ring, cand.pp, world,
                                 gpus_per_node):
                continue
            name = strategy_name(cand.degrees)
            key = (not cand.valid, cand.cost.prefill_seconds)
            if name not in best or key < best[name][0]:
                best[name] = (key, cand)
        for name, (_, cand) in best.items():
            line = curves.setdefault(name, {"memory_gib": [math.nan] * len(contexts),
                                            "prefill_seconds": [math.nan] * len(contexts)})
            line["memory_gib"][index] = cand.cost.memory_gib_per_device
            if cand.valid:
                line["prefill_seconds"][index] = cand.cost.prefill_seconds
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
    for name, line in sorted(curves.items()):
        mem_ax.plot(contexts, line["memory_gib"], marker="o", label=name)
        time_ax.plot(contexts, line["prefill_seconds"], marker="o", label=name)
    mem_ax.axhline(hw.memory_gib, color="black", linestyle="--",
                   label=f"{hw.name} memory ({hw.memory_gib:g} GiB)")
    for ax in (mem_ax, time_ax):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.axvline(spec.context, color="grey", linestyle=":")
        ax.grid(True, which="both", alpha=0.3)
    mem_ax.set_ylabel("GiB per device")
    mem_ax.set_title("memory per device (best layout of each strategy)")
    time_ax.set_ylabel("predicted prefill seconds")
    time_ax.set_title("prefill time (only where the layout fits)")
    mem_ax.legend(fontsize=7)
    fig.suptitle(f"{dims.name} on {world} x {hw.name} ({spec.dtype})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
