"""Pure planner: which tp x ulysses x ring x pp layout to run, and why.

No torch here: the planner is arithmetic over model dims, hardware rates and
the prompt length, so it can run before a single weight is loaded.
"""
from .choose import (LONG_CONTEXT_TOKENS, LayoutPlan, Plan, PlanError,
                     auto_layout, choose, evaluate_all, evaluate_layout, make_spec, plan,
                     validate_layout)
from ..distributed.dims import rank_groups
from .cost import LayoutCost, estimate, pipeline_bubble
from .hardware import DTYPE_BYTES, Hardware, HardwareError, list_hardware, load_hardware, step_token_budget
from .model_dims import ModelDims, ModelDimsError, list_models, load_model_dims
from .paths import config_dir
from ..options import DEFAULT_CHUNK_TOKENS_PER_RANK, RING_MODES, SEQUENCE_LAYOUTS, WORKLOADS
from .spec import RunSpec
from .rules import (enumerate_layouts, structural_errors, valid_degrees,
                    valid_tp_sizes, valid_ulysses_degrees)

__all__ = [
    "LONG_CONTEXT_TOKENS", "WORKLOADS", "LayoutPlan", "Plan", "PlanError", "auto_layout",
    "choose", "evaluate_all", "evaluate_layout", "make_spec", "plan", "validate_layout",
    "DEFAULT_CHUNK_TOKENS_PER_RANK", "RING_MODES", "SEQUENCE_LAYOUTS", "LayoutCost",
    "RunSpec", "estimate", "pipeline_bubble", "DTYPE_BYTES", "Hardware", "HardwareError",
    "list_hardware", "load_hardware", "step_token_budget", "ModelDims", "ModelDimsError", "list_models",
    "load_model_dims", "config_dir", "enumerate_layouts", "rank_groups",
    "structural_errors", "valid_degrees", "valid_tp_sizes", "valid_ulysses_degrees",
]
