"""This rank's model, built without ever holding what it does not keep.

1. The HF model is built on the meta device (accelerate's init_empty_weights: no parameter
   memory; buffers such as RoPE's inv_freq are computed for real, rope scaling included).
   Its parameters are made on meta from the start (`ParametersOnMeta`), not allocated and
   then moved there, so not even a moment's allocation of a whole expert happens.
2. The layout decides the share, still on the meta device: a pipeline stage keeps its layers
   (and the embeddings on the first stage, the final norm and head on the last); the fused
   experts, which AutoTP does not split, are cut to this rank's rows; DeepSpeed AutoTP replaces
   the linears with its TP layers, which record their split, and then materialises the model
   (`to_empty`): every parameter is allocated at its share, none whole. How the parts AutoTP
   does not record were cut comes back as tensor_parallel's `Splits`.
3. Each parameter is read from the checkpoint's safetensors as exactly that share, cast to
   the run's dtype, one tensor at a time, on the rank's device.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch.overrides import TorchFunctionMode

from ..distributed.topology import Topology
from ..engine.pipeline import PipelineStage
from ..tensor_parallel.autotp import apply_tensor_parallel
from ..models import clear_quantizer_flags
from ..tensor_parallel.splits import NONE
from .checkpoint import Checkpoint
from .experts import renamed
from .shares import fill_parameters

_LAYER = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")
# what modules make their parameters with (nn.Linear: empty; norms: ones, zeros; experts: empty)
_PARAMETER_FACTORIES = frozenset({torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full,
                                  torch.rand, torch.randn, torch.randint, torch.normal})


class ParametersOnMeta(TorchFunctionMode):
    """While a model is built: a factory call that makes parameters (torch.empty, zeros, ones, ...)
    and names no device makes a meta tensor. accelerate's init_empty_weights alone lets each
    module allocate its parameter on the default device and moves it to meta when it is
    registered: for a moment every parameter exists whole (an expert tensor of Mixtral-8x7B:
    ~1.9 GB in bf16). Buffers, computed with arange and arithmetic (RoPE's inv_freq), stay real."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PARAMETER_FACTORIES and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def build_meta_model(config, dtype: torch.dtype, trust_remote_code: bool = False):
    """The HF model with every parameter on the meta device and its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    def build(parameters_on_meta: bool):
        # include_buffers=False: inv_freq and friends are real
        with init_empty_weights(), ParametersOnMeta() if parameters_on_meta else contextlib.nullcontext():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)

    model = build(True)
    if any(buf.is_meta for buf in model.buffers()):  # a buffer made by one of those factories: accelerate alone
        model = build(False)
    return model


def materialize(model, device) -> None:
    """Meta parameters become uninitialised ones on `device` (tied ones stay tied); buffers move."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=False)
                module._parameters[name] = made[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)


def checkpoint_names(model, checkpoint: Checkpoint, first_layer: int = 0):
    """Map a parameter's name in this rank's model to the checkpoint's: a stage's layers are
    numbered from 0 but are layers first_layer.. of the checkpoint; a tied head reads the
    embedding it is tied to when the checkpoint stores only that; a family's renamed module
    (Mixtral's router) reads the checkpoint's name."""
    tied = getattr(model, "_tied_weights_keys", None)
    tied = tied if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", False) else {}

    def name(local: str) -> str:
        match = _LAYER.match(local)
        if match and first_layer:
            local = f"{match[1]}{int(match[2]) + first_layer}{match[3]}"
        if local not in checkpoint and local in tied:
            return tied[local]
        return local if local in checkpoint else renamed(local, checkpoint)

    return name


def apply_parallelism(model, topo: Topology):
    """The layout applied to a built model (on the meta device, or real: `parallelize`), in the
    one order every loader path uses: the pipeline stage first, so that tensor parallelism
    cuts only the layers that stay; then the experts and AutoTP's linears.
    -> (model, pipeline stage or None, how tensor_parallel cut what AutoTP does not record)."""
    stage, splits = None, NONE
    if topo.dims.pp > 1:  # drop the other stages' layers before anything is allocated
        stage = PipelineStage(model, topo)
    if topo.dims.tp > 1:
        clear_quantizer_flags(model)  # a GGUF-loaded model's markers make DeepSpeed's dtype cast raise
        buffers = {name: buf.clone() for name, buf in model.named_buffers()}
        model, splits = apply_tensor_parallel(model, topo)  # DeepSpeed's to_empty allocates the shares
        for name, buf in model.named_buffers():  # to_empty leaves a meta model's buffers uninitialised
            buf.copy_(buffers[name])
    return model, stage, splits


def build_rank_model(folder, config, run, topo: Topology, trust_remote_code: bool = False):
    """-> (model in eval mode on the rank's device holding only its share, pipeline stage or None)."""
    with Checkpoint(folder) as checkpoint:
        model = build_meta_model(config, getattr(torch, run.dtype), trust_remote_code).eval()
        model, stage, splits = apply_parallelism(model, topo)
        materialize(model, topo.device)
        fill_parameters(model, checkpoint, checkpoint_names(model, checkpoint, stage.start if stage else 0), splits)
    return model, stage
