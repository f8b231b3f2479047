"""Running a model past its trained length: the config's RoPE scaling set before the model
is built (yarn, linear, dynamic), with max_position_embeddings following, so the context
cap, the planner and the pre-flight all see the new length.

Dynamic NTK scaling in transformers recomputes the frequencies from the largest position in
each forward call. Under chunked prefill, and with sequence parallelism (where every rank
holds other positions), that would give each chunk and each rank other frequencies; here it
is fixed once, at the scaled length: NTK-aware scaling of the base as transformers computes
it for a sequence of that length. So the result does not depend on the layout.
"""
from __future__ import annotations

import copy

TYPES = ("yarn", "linear", "dynamic")


def parse(spec: str) -> tuple[str, float]:
    kind, _, factor = spec.partition(":")
    try:
        value = float(factor)
    except ValueError:
        value = 0.0
    if kind not in TYPES or not value > 1.0:
        raise ValueError(f"--rope-scaling {spec!r}: give TYPE:FACTOR with TYPE one of {', '.join(TYPES)} and "
                         "FACTOR above 1, e.g. yarn:4 (a 32K model run at 128K)")
    return kind, value


def scaled(config, spec: str | None):
    """A copy of config with the scaling applied (config itself is cached and shared: never changed)."""
    if not spec:
        return config
    kind, factor = parse(spec)
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"--rope-scaling: this model already has {params['rope_type']} RoPE scaling in its config; "
                         "it runs at its own length")
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    original = config.max_position_embeddings
    out = copy.deepcopy(config)
    if kind == "dynamic":
        from .models import head_dim

        dim = int(head_dim(config) * params.get("partial_rotary_factor", 1.0))
        base = theta * (factor * factor - (factor - 1)) ** (dim / (dim - 2))  # at seq_len = factor x original
        out.rope_parameters = {**params, "rope_type": "default", "rope_theta": base}
    else:
        out.rope_parameters = {**params, "rope_type": kind, "rope_theta": theta, "factor": factor,
                               **({"original_max_position_embeddings": original} if kind == "yarn" else {})}
    out.max_position_embeddings = int(original * factor)
    return out
