"""The rules a layout tp x ulysses x ring x pp must obey, stated once, and the rank
arithmetic of a layout (ParallelDims, from distributed/dims.py: the topology builds its groups
from it, and distributed/ sits below the planner).

This is the only layout validator: the planner rejects candidates with it, the run
configuration (toolkit.config) checks the layout it will run with it, and the engine's
topology builds its groups from `rank_groups`. A layout the planner accepts is exactly a
layout the engine runs. Rank order, outermost to innermost, is (pp, ring, ulysses, tp):
TP ranks are consecutive, then Ulysses, then ring, then PP.
"""
from __future__ import annotations

import math
from typing import Optional

from ..distributed.dims import DEGREE_NAMES, ParallelDims
from ..options import positive_int_problem
from .model_dims import ModelDims



def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _join(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


def node_size(world: int, gpus_per_node: Optional[int]) -> int:
    """GPUs that share one node's fast links; a world smaller than a node is one node."""
    if gpus_per_node is None:
        return world
    return max(1, min(gpus_per_node, world))


def tp_fits_kv_heads(kv_heads: int, tp: int) -> bool:
    """TP splits the KV heads evenly, or (more ranks than KV heads) gives each rank the one KV
    head its query heads read, replicated over tp / G ranks."""
    return kv_heads % tp == 0 or tp % kv_heads == 0


def valid_tp_sizes(dims: ModelDims) -> list[int]:
    """TP sizes that split the query heads evenly and the KV heads evenly or by replication."""
    return [t for t in divisors(dims.num_heads) if tp_fits_kv_heads(dims.num_kv_heads, t)]


def kv_heads_per_tp_rank(kv_heads: int, tp: int) -> int:
    """KV heads a TP rank computes and caches: G/tp, or 1 (replicated) when tp > G."""
    return max(kv_heads // tp, 1)


def valid_ulysses_degrees(dims: ModelDims, tp: int) -> list[int]:
    """Ulysses degrees that split the heads left per TP rank.

    Query heads must divide evenly; KV heads either divide evenly or are
    replicated (degree a multiple of the KV heads per TP rank).
    """
    if dims.num_heads % tp or not tp_fits_kv_heads(dims.num_kv_heads, tp):
        return []
    heads, kv = dims.num_heads // tp, kv_heads_per_tp_rank(dims.num_kv_heads, tp)
    return [u for u in divisors(heads) if kv % u == 0 or u % kv == 0]


def kv_heads_per_rank(dims: ModelDims, tp: int, ulysses: int) -> float:
    """KV heads each rank holds: G/(tp*u), or 1 when Ulysses replicates KV heads."""
    return max(dims.num_kv_heads / (tp * ulysses), 1.0)


def structural_errors(dims: ModelDims, tp: int, ulysses: int, ring: int, pp: int,
                      world: int, gpus_per_node: Optional[int] = None) -> list[str]:
    """Reasons, as sentences, why a layout breaks a rule (memory aside); empty if none."""
    degrees = {"tp": tp, "ulysses": ulysses, "ring": ring, "pp": pp}
    bad = [problem for problem in (positive_int_problem(k, v) for k, v in degrees.items()) if problem]
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
    elif not tp_fits_kv_heads(kv, tp):
        errors.append(f"tensor parallel size {tp} neither divides the {kv} KV heads nor is a multiple of them "
                      f"(to replicate each over tp/{kv} ranks); valid sizes: {_join(tp_ok)}")
    if tp > node:
        errors.append(f"TP={tp} spans {math.ceil(tp / node)} nodes of {node} GPUs: keep TP "
                      "within a node and use ring across nodes")
    elif node % tp:
        errors.append(f"TP={tp} groups would straddle nodes of {node} GPUs ({node} is not a "
                      f"multiple of {tp}); TP sizes that tile a node: "
                      f"{_join([t for t in tp_ok if node % t == 0])}")
    if heads % tp == 0 and tp_fits_kv_heads(kv, tp):
        u_ok = valid_ulysses_degrees(dims, tp)
        per_tp, kv_per_tp = heads // tp, kv_heads_per_tp_rank(kv, tp)
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


def layouts_that_fit(dims: ModelDims, world: int, gpus_per_node: Optional[int] = None,
                     most: int = 6) -> list[str]:
    """A few pipeline-free layouts of `world` ranks that break no rule, for error messages."""
    found = [f"tp={t} ulysses={u} ring={r}" for t, u, r, p in enumerate_layouts(world)
             if p == 1 and not structural_errors(dims, t, u, r, p, world, gpus_per_node)]
    return found[:most]


def fill_degrees(dims: ModelDims, world: int, tp: Optional[int] = None, ulysses: Optional[int] = None,
                 ring: Optional[int] = None, pp: Optional[int] = None,
                 gpus_per_node: Optional[int] = None) -> ParallelDims:
    """Degrees not given fill the world (all Ulysses where the heads allow it, else ring),
    then the layout is checked; ValueError says what is wrong and which layouts fit."""
    tp, pp = tp or 1, pp or 1
    fits = layouts_that_fit(dims, world, gpus_per_node)
    if world % (tp * pp):
        raise ValueError(f"tp={tp} x pp={pp} does not divide the world of {world} ranks; "
                         f"layouts that fit these heads: {', '.join(fits)}")
    rest = world // (tp * pp)
    if ulysses is None and ring is None:
        ulysses, ring = (rest, 1) if rest in valid_ulysses_degrees(dims, tp) else (1, rest)
    elif ulysses is None:
        ulysses = rest // ring if rest % ring == 0 else None
    elif ring is None:
        ring = rest // ulysses if rest % ulysses == 0 else None
    if ulysses is None or ring is None or tp * ulysses * ring * pp != world:
        given = " x ".join(f"{k}={v}" for k, v in zip(DEGREE_NAMES, (tp, ulysses, ring, pp)) if v is not None)
        raise ValueError(f"degrees {given} must multiply to the world size {world}; "
                         f"layouts that fit these heads: {', '.join(fits)}")
    errors = structural_errors(dims, tp, ulysses, ring, pp, world, gpus_per_node)
    if errors:
        raise ValueError("; ".join(errors) + f"; layouts that fit: {', '.join(fits)}")
    return ParallelDims(tp, ulysses, ring, pp)


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
