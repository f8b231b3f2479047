"""The rules a layout tp x ulysses x ring x pp must obey, stated once.

The engine calls these same functions at run time, so a layout the planner accepts
is exactly a layout the engine accepts. Rank order, outermost to innermost, is
(pp, ring, ulysses, tp): TP ranks are consecutive, then Ulysses, then ring, then PP.
"""
from __future__ import annotations

import math
from typing import Optional

from .model_dims import ModelDims

DEGREE_NAMES = ("tp", "ulysses", "ring", "pp")


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _join(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


def node_size(world: int, gpus_per_node: Optional[int]) -> int:
    """GPUs that share one node's fast links; a world smaller than a node is one node."""
    if gpus_per_node is None:
        return world
    return max(1, min(gpus_per_node, world))


def valid_tp_sizes(dims: ModelDims) -> list[int]:
    """TP sizes that split both the query heads and the KV heads evenly."""
    return divisors(math.gcd(dims.num_heads, dims.num_kv_heads))


def valid_ulysses_degrees(dims: ModelDims, tp: int) -> list[int]:
    """Ulysses degrees that split the heads left per TP rank.

    Query heads must divide evenly; KV heads either divide evenly or are
    replicated (degree a multiple of the KV heads per TP rank).
    """
    if dims.num_heads % tp or dims.num_kv_heads % tp:
        return []
    heads, kv = dims.num_heads // tp, dims.num_kv_heads // tp
    return [u for u in divisors(heads) if kv % u == 0 or u % kv == 0]


def kv_heads_per_rank(dims: ModelDims, tp: int, ulysses: int) -> float:
    """KV heads each rank holds: G/(tp*u), or 1 when Ulysses replicates KV heads."""
    return max(dims.num_kv_heads / (tp * ulysses), 1.0)


def structural_errors(dims: ModelDims, tp: int, ulysses: int, ring: int, pp: int,
                      world: int, gpus_per_node: Optional[int] = None) -> list[str]:
    """Reasons, as sentences, why a layout breaks a rule (memory aside); empty if none."""
    degrees = {"tp": tp, "ulysses": ulysses, "ring": ring, "pp": pp}
    bad = [f"{k} must be a positive integer, got {v!r}" for k, v in degrees.items()
           if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        return bad
    errors: list[str] = []
    product = tp * ulysses * ring * pp
    if product != world:
        errors.append(
            f"tp*ulysses*ring*pp = {tp}*{ulysses}*{ring}*{pp} = {product} but the world has "
            f"{world} ranks; the degrees must multiply to the world size")
    node = node_size(world, gpus_per_node)
    heads, kv = dims.num_heads, dims.num_kv_heads
    tp_ok = valid_tp_sizes(dims)
    if heads % tp:
        errors.append(f"tensor parallel size {tp} does not divide {heads} attention heads; "
                      f"valid sizes: {_join(tp_ok)}")
    elif kv % tp:
        errors.append(f"tensor parallel size {tp} does not divide {kv} KV heads; "
                      f"valid sizes: {_join(tp_ok)}")
    if tp > node:
        errors.append(f"TP={tp} spans {math.ceil(tp / node)} nodes of {node} GPUs: keep TP "
                      "within a node and use ring across nodes")
    elif node % tp:
        errors.append(f"TP={tp} groups would straddle nodes of {node} GPUs ({node} is not a "
                      f"multiple of {tp}); TP sizes that tile a node: "
                      f"{_join([t for t in tp_ok if node % t == 0])}")
    if heads % tp == 0 and kv % tp == 0:
        u_ok = valid_ulysses_degrees(dims, tp)
        per_tp, kv_per_tp = heads // tp, kv // tp
        if per_tp % ulysses:
            errors.append(f"Ulysses degree {ulysses} does not divide the {per_tp} attention "
                          f"heads per TP rank (tp={tp}); valid Ulysses degrees: {_join(u_ok)}")
        elif kv_per_tp % ulysses and ulysses % kv_per_tp:
            errors.append(f"Ulysses degree {ulysses} and {kv_per_tp} KV heads per TP rank "
                          f"(tp={tp}): one must divide the other so KV heads split or "
                          f"replicate evenly; valid Ulysses degrees: {_join(u_ok)}")
    group = tp * ulysses
    if ulysses > 1 and tp <= node:
        if group > node:
            errors.append(f"Ulysses group TP={tp} x Ulysses={ulysses} = {group} GPUs spans "
                          f"{math.ceil(group / node)} nodes of {node}: all-to-all needs "
                          "intra-node links; use ring across nodes")
        elif node % group:
            errors.append(f"TP x Ulysses groups of {group} GPUs would straddle nodes of "
                          f"{node} GPUs; pick tp*ulysses dividing {node}")
    if pp > dims.num_layers:
        errors.append(f"pipeline size {pp} exceeds the {dims.num_layers} layers; "
                      f"use pp <= {dims.num_layers}")
    return errors


def pipeline_warnings(pp: int, context: int, chunk_size: int, bubble: float | None = None) -> list[str]:
    """Warn when prefill chunks are too few to fill the pipeline (M >= 4*pp, GPipe rule);
    `bubble` is the cost model's (causal chunks), else (P-1)/M."""
    if pp <= 1:
        return []
    chunks = math.ceil(context / chunk_size)
    if chunks >= 4 * pp:
        return []
    bubble = (pp - 1) / chunks if bubble is None else bubble
    want = 4 * pp
    if context >= want:
        fix = f"use chunk size <= {context // want} for >= {want} chunks"
    else:
        fix = f"the {context}-token prompt cannot make {want} chunks: avoid pp"
    plural = "s" if chunks != 1 else ""
    return [f"pipeline of {pp} stages gets only {chunks} prefill chunk{plural} (bubble "
            f"{bubble:.0%} of compute); {fix} (M >= 4*pp)"]


def rank_groups(tp: int, ulysses: int, ring: int, pp: int) -> dict[str, list[list[int]]]:
    """Global ranks of every group, with rank = ((p*ring + r)*ulysses + u)*tp + t."""
    sizes = {"pp": pp, "ring": ring, "ulysses": ulysses, "tp": tp}
    strides = {"tp": 1, "ulysses": tp, "ring": tp * ulysses, "pp": tp * ulysses * ring}
    world = tp * ulysses * ring * pp
    groups: dict[str, list[list[int]]] = {}
    for name in DEGREE_NAMES:
        stride, size = strides[name], sizes[name]
        by_base: dict[int, list[int]] = {}
        for rank in range(world):
            base = rank - ((rank // stride) % size) * stride  # same rank, coordinate 0
            by_base.setdefault(base, []).append(rank)
        groups[name] = list(by_base.values())
    return groups


def valid_degrees(dims: ModelDims, world: int,
                  gpus_per_node: Optional[int] = None) -> dict[str, object]:
    """Degrees that obey the head and node rules and divide the world.

    ``tp``: TP sizes; ``ulysses``: Ulysses degrees with tp=1; ``ulysses_by_tp``:
    the Ulysses degrees for each valid TP size; ``ring`` and ``pp``: divisors of the
    world (pp capped at the layer count).
    """
    node = node_size(world, gpus_per_node)
    tps = [t for t in valid_tp_sizes(dims) if world % t == 0 and node % t == 0]
    by_tp = {t: [u for u in valid_ulysses_degrees(dims, t)
                 if world % (t * u) == 0 and node % (t * u) == 0] for t in tps}
    return {
        "tp": tps,
        "ulysses": by_tp.get(1, [1]),
        "ulysses_by_tp": by_tp,
        "ring": divisors(world),
        "pp": [p for p in divisors(world) if p <= dims.num_layers],
    }


def enumerate_layouts(world: int) -> list[tuple[int, int, int, int]]:
    """Every (tp, ulysses, ring, pp) of positive integers whose product is the world."""
    layouts = []
    for tp in divisors(world):
        for u in divisors(world // tp):
            for r in divisors(world // (tp * u)):
                layouts.append((tp, u, r, world // (tp * u * r)))
    return layouts
