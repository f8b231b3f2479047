"""Tensor parallelism by DeepSpeed inference AutoTP, over the TP groups of our topology.

Two DeepSpeed traps are handled here (DESIGN.md section 5):
- AutoTP ignores `tp_group` alone and groups the first tp ranks; with an `mpu` alone it
  shards nothing (the layer replacement reads `tp_group`). We pass both.
- On CPU its shared-memory all-reduce reduces over the whole world, not the group; with
  tp < world that sums over SP ranks too (and without the launcher's LOCAL_SIZE it is not
  even set up and faults). We switch it off unless tp == world under the launcher.
AutoTP also prints to stdout; that goes to stderr so `--json` output stays one object.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from ..distributed.launcher import launcher_env
from ..distributed.topology import Topology


class ModelParallelUnit:
    """The object DeepSpeed asks for its model-parallel (TP) group, rank and size."""

    def __init__(self, topo: Topology):
        self.topo = topo

    def get_model_parallel_group(self):
        return self.topo.group("tp")

    def get_model_parallel_rank(self) -> int:
        return self.topo.coords["tp"]

    def get_model_parallel_world_size(self) -> int:
        return self.topo.dims.tp

    def get_data_parallel_group(self):
        return self.topo.group("sp")

    def get_data_parallel_rank(self) -> int:
        return self.topo.sp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dims.sp


def _world_shm_allreduce_is_safe(topo: Topology) -> bool:
    """The kernel sums over all ranks of the machine, and is only set up when the launcher
    says every rank is local (LOCAL_SIZE == world); anything else faults or sums wrongly."""
    if topo.device.type != "cpu":
        return True
    return topo.dims.tp == topo.world and launcher_env()["deepspeed_local_size"] == topo.world


def disable_world_allreduce_if_unsafe(topo: Topology) -> bool:
    """Make DeepSpeed fall back to torch.distributed.all_reduce(group=tp) when its CPU
    shared-memory kernel would reduce over ranks outside the TP group. -> True if disabled."""
    import deepspeed.comm.comm as ds_comm

    if _world_shm_allreduce_is_safe(topo) or ds_comm.cdb is None:
        return False
    ds_comm.cdb.shm_vector_kernel_level = 0  # below every dtype's requirement: process-group path
    return True


def shard_with_deepspeed(model, topo: Topology):
    """AutoTP-shard `model` over this rank's TP group; returns the sharded HF module."""
    import deepspeed

    with contextlib.redirect_stdout(sys.stderr):
        deepspeed.init_distributed(dist_backend="nccl" if topo.device.type == "cuda" else "gloo")
        disable_world_allreduce_if_unsafe(topo)
        engine = deepspeed.init_inference(
            model,
            tensor_parallel={"tp_size": topo.dims.tp, "mpu": ModelParallelUnit(topo), "tp_group": topo.group("tp")},
            dtype=next(model.parameters()).dtype,
            replace_with_kernel_inject=False,
        )
    module = engine.module
    heads = model.config.num_attention_heads
    q_out = module.model.layers[0].self_attn.q_proj
    local_out = getattr(q_out, "weight", torch.empty(0)).shape[0]
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // heads
    if local_out != heads // topo.dims.tp * head_dim:
        raise RuntimeError(f"AutoTP left {local_out // head_dim} query heads on this rank, expected {heads // topo.dims.tp}")
    return module
