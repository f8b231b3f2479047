"""What a CUDA graph of the decode step (`--cuda-graph`, toolkit.engine.static_decode) cannot capture,
read from the model's config before any weight is read, so that it is refused in one line."""
from __future__ import annotations

from ..attention.kv_formats import cache_kind
from ..options import parse_speculate
from .hf import uses_positional_attention


def dynamic_rope_types(config) -> list[str]:
    """The dynamic RoPE types a config asks for: transformers recomputes their frequencies in every
    forward from max(position_ids), compared on the host (a sync, which a CUDA graph capture
    refuses). Read from rope_parameters (transformers 5; one dict, or one per layer type as in
    Gemma 3) and the older rope_scaling, under "rope_type" or "type"; a text config's too."""
    found = []
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: config)())}.values():
        for attr in ("rope_parameters", "rope_scaling"):
            params = getattr(cfg, attr, None)
            if not isinstance(params, dict):
                continue
            nested = [p for p in params.values() if isinstance(p, dict)]
            for entry in nested or [params]:
                kind = str(entry.get("rope_type") or entry.get("type") or "")
                if "dynamic" in kind and kind not in found:
                    found.append(kind)
    return found


def check_capturable(config) -> None:
    """Refuse, in one line and before any weight is read, a config whose decode step cannot be captured."""
    kinds = dynamic_rope_types(config)
    if kinds:
        raise ValueError(f"cuda_graph (--cuda-graph): this model's config has {kinds[0]} RoPE scaling, whose "
                         "frequencies transformers recomputes from each forward's positions on the host, so the decode "
                         "step cannot be captured: drop --cuda-graph (decode runs eagerly)")


def check_cuda_device(cuda_available: bool) -> None:
    """Refuse --cuda-graph without CUDA, in one line, before anything else is read."""
    if not cuda_available:
        raise ValueError("cuda_graph (--cuda-graph) captures the decode step on a CUDA device and this machine "
                         "has none: drop it (CPU decode runs eagerly)")


def check_cuda_graph_run(config, run) -> None:
    """Refuse, in one line and before any weight is read, what --cuda-graph cannot do with this run."""
    if run.dims.pp > 1:
        raise ValueError("cuda_graph (--cuda-graph) captures one whole forward and cannot run with pipeline "
                         f"stages (pp={run.dims.pp}): drop it or choose a layout without pp")
    if cache_kind(run.kv_dtype, run.dtype) is not None:
        raise ValueError(f"cuda_graph (--cuda-graph): the captured decode step reads a cache in the model's dtype, "
                         f"not a {run.kv_dtype} one: drop one of the two")
    if uses_positional_attention(config):
        raise ValueError(f"cuda_graph (--cuda-graph): the captured decode step does not do the sliding-window or "
                         f"soft-capped attention of {config.model_type}: drop it (decode runs eagerly)")
    if parse_speculate(run.speculate).mode in ("ngram", "draft"):
        raise ValueError(f"cuda_graph (--cuda-graph): the captured decode step takes one token a step and cannot "
                         f"check guesses (--speculate {run.speculate}): drop one of the two")
