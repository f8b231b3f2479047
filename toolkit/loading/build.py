"""This rank's model, built without ever holding what it does not keep.

1. The HF model is built on the meta device (accelerate's init_empty_weights: no parameter
   memory; buffers such as RoPE's inv_freq are computed for real, rope scaling included).
2. The layout decides the share: a pipeline stage keeps its layers (and the embeddings on
   the first stage, the final norm and head on the last); DeepSpeed AutoTP replaces the
   linears with its TP layers, which record their split, and materialises only the shards.
3. Each parameter is read from the checkpoint's safetensors as exactly that share, cast to
   the run's dtype, one tensor at a time, on the rank's device.
"""
from __future__ import annotations

import re

import torch

from ..distributed.topology import Topology
from .checkpoint import Checkpoint
from .experts import renamed
from .shares import fill_parameters

_LAYER = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")


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


def build_rank_model(folder, config, run, topo: Topology, trust_remote_code: bool = False):
    """-> (model in eval mode on the rank's device holding only its share, pipeline stage or None)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with Checkpoint(folder) as checkpoint:
        with init_empty_weights():  # include_buffers=False: inv_freq and friends are real
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, run.dtype),
                                                     trust_remote_code=trust_remote_code)
        model.eval()
        stage = None
        if run.dims.pp > 1:  # drop the other stages' layers before anything is allocated
            from ..engine.pipeline import PipelineStage

            stage = PipelineStage(model, topo)
        if run.dims.tp > 1:
            from ..tensor_parallel.autotp import shard_with_deepspeed

            buffers = {name: buf.clone() for name, buf in model.named_buffers()}
            model = shard_with_deepspeed(model, topo)  # AutoTP layers; DeepSpeed's to_empty allocates the shards
            for name, buf in model.named_buffers():  # to_empty left them uninitialised
                buf.copy_(buffers[name])
        materialize(model, topo.device)
        fill_parameters(model, checkpoint, checkpoint_names(model, checkpoint, stage.start if stage else 0))
    return model, stage
