"""RunConfig: what a run is decided by before a weight is read, made once and frozen.

`make_run_config` is the one way to get one: preset (default `auto`, the planner) or
explicit degrees, plus overrides, for this world and prompt length, checked by the one
layout validator (toolkit.planner.rules). Everything below takes the RunConfig it is given.
No torch at import. The options themselves are declared in toolkit.options.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional

from .distributed.dims import DEGREE_NAMES, ParallelDims
from .options import DTYPE_NAMES, RUN_OPTIONS, check_run_option_names, check_values, chunk_tokens
from .planner.rules import fill_degrees
from .planner import PlanError, load_hardware, load_model_dims, plan, validate_layout
from .planner.presets import merged_settings

# The run options a RunConfig carries besides its degrees (toolkit.options; `workload` only steers the planner).
CARRIED = tuple(name for name, option in RUN_OPTIONS.items() if option.carried and name not in DEGREE_NAMES)


@dataclass(frozen=True)
class RunConfig:
    """Degrees, prefill chunk, compute dtype, ring settings, and the planner's reason. Each option
    is checked by its declaration (toolkit.options). Made by hand, it runs in float32 with the one
    default chunk for its degrees."""

    dims: ParallelDims = ParallelDims()
    chunk_size: Optional[int] = None  # None: toolkit.options.chunk_tokens for dims.sp
    dtype: str = "float32"
    sequence_layout: str = RUN_OPTIONS["sequence_layout"].default
    ring_mode: str = RUN_OPTIONS["ring_mode"].default
    why: str = ""
    kv_dtype: str = RUN_OPTIONS["kv_dtype"].default  # what the KV cache stores (attention.kv_formats)
    speculate: str = RUN_OPTIONS["speculate"].default  # guesses checked in the decode step (engine.speculation)

    def __post_init__(self):
        if self.chunk_size is None:
            object.__setattr__(self, "chunk_size", chunk_tokens(self.dims.sp))
        check_values({name: getattr(self, name) for name in CARRIED}, decided=True)

    @property
    def layout(self) -> dict:
        """The degrees, as `--json` reports them."""
        return {k: getattr(self.dims, k) for k in DEGREE_NAMES}

    def to_dict(self) -> dict:
        return {**self.layout, **{k: v for k, v in asdict(self).items() if k != "dims"}}


def detect_hardware() -> str:
    """The planner's hardware entry for this machine's accelerator (configs/hardware)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for key, entry in (("h200", "h200"), ("h100", "h100-80gb"), ("a100", "a100-80gb"), ("l40s", "l40s")):
        if key in name:
            return entry
    return "h100-80gb"


def checkpoint_dtype(model, hw) -> str:
    """The dtype a run takes unless told: float32 on CPU; on GPUs the checkpoint's own (its
    config's torch_dtype), so nothing is converted, else the hardware's default."""
    if hw.name == "cpu":
        return "float32"
    stored = (model.get("dtype") or model.get("torch_dtype")) if isinstance(model, Mapping) else None
    stored = str(stored).replace("torch.", "") if stored else None
    return stored if stored in DTYPE_NAMES else hw.default_dtype


def make_run_config(model, world: int, *, ranks_per_node: Optional[int] = None,
                    context_tokens: Optional[int] = None, preset=None, hardware=None, new_tokens: int = 256,
                    **overrides) -> RunConfig:
    """The RunConfig for a model (its HF config as a dict, a ModelDims or a configs/models name).

    `overrides` are the run options (toolkit.options); those given (not None) win over the preset.
    Explicit degrees with no preset: those degrees, the others filling the world. Otherwise the
    preset (default `auto`) decides: degrees it leaves "auto" are the planner's choice among
    layouts keeping the fixed ones, sized for `context_tokens` (capped at the model's context:
    longer documents go by map-reduce). Either way the chunk is toolkit.options.chunk_tokens.
    """
    check_run_option_names(overrides)
    dims = load_model_dims(dict(model) if isinstance(model, Mapping) else model)
    hw = load_hardware(hardware or detect_hardware())
    node = min(ranks_per_node or world, world)
    context = min(context_tokens or dims.max_position_embeddings, dims.max_position_embeddings)
    explicit = preset is None and any(overrides.get(k) not in (None, "auto") for k in DEGREE_NAMES)
    settings = merged_settings(None if explicit else preset or "auto", overrides)
    fixed = {k: settings[k] for k in DEGREE_NAMES if settings[k] != "auto"}
    dtype = checkpoint_dtype(model, hw) if settings["dtype"] == "auto" else settings["dtype"]
    name = f"preset {settings['name']!r}"
    if explicit:
        layout = fill_degrees(dims, world, *(fixed.get(k) for k in DEGREE_NAMES), gpus_per_node=node)
        why = f"degrees given: {layout.label()}"
    elif len(fixed) == len(DEGREE_NAMES):
        reasons = validate_layout(dims, *(fixed[k] for k in DEGREE_NAMES), world, node, hw, context, new_tokens,
                                  settings["chunk_size"], dtype, settings["kv_dtype"])
        if reasons:
            raise PlanError(f"{name}: " + "; ".join(reasons))
        layout, why = ParallelDims(**fixed), f"{name} fixes every degree"
    else:
        try:
            result = plan(dims, hw, world, context, new_tokens, settings["workload"], node, settings["chunk_size"],
                          dtype, ring_mode=settings["ring_mode"], sequence_layout=settings["sequence_layout"],
                          fixed=fixed, kv_dtype=settings["kv_dtype"])
        except PlanError as err:
            raise PlanError(f"{name}: {err}", err.candidates) from None
        layout, why = ParallelDims(**result.chosen.degrees), result.why
    chosen = {**{k: settings[k] for k in CARRIED}, "dtype": dtype,
              "chunk_size": chunk_tokens(layout.sp, context, settings["chunk_size"])}
    return RunConfig(dims=layout, why=why, **chosen)
