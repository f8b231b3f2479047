"""Tensor parallelism by DeepSpeed inference AutoTP, over the TP groups of our topology.

Two DeepSpeed traps are handled here (DESIGN.md section 5):
- AutoTP ignores `tp_group` alone and groups the first tp ranks; with an `mpu` alone it
  shards nothing (the layer replacement reads `tp_group`). We pass both.
- On CPU its shared-memory all-reduce reduces over the whole world, not the group; with
  tp < world that sums over SP ranks too (and without the launcher's LOCAL_SIZE it is not
  even set up and faults). We switch it off unless tp == world under the launcher.
AutoTP also prints to stdout; that goes to stderr so `--json` output stays one object.
What AutoTP cannot do is done around it: KV heads fewer than TP ranks are replicated first
(tensor_parallel.kv_heads), fused 3-D experts are cut after (tensor_parallel.experts).
"""
from __future__ import annotations

import contextlib
import sys


from ..distributed.launcher import launcher_env
from ..distributed.topology import Topology
from ..models import head_dim as model_head_dim
from .experts import shard_experts
from .kv_heads import kv_heads_replicated


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


class LocalHeads:
    """A module's view of the shared config with this rank's head counts (everything else, the
    attention implementation included, read from the shared config as it is now)."""

    def __init__(self, config, **heads):
        self._config, self._heads = config, heads

    def __getattr__(self, name):
        heads = self.__dict__.get("_heads", {})
        return heads[name] if name in heads else getattr(self.__dict__["_config"], name)


def localize_fused_attention(model, tp: int) -> int:
    """Phi-3 cuts its fused qkv_proj output at offsets from config.num_attention_heads and its
    num_key_value_heads: global counts, while AutoTP leaves each rank H/tp query and G/tp KV
    heads. Those modules read this rank's counts instead (their code is unchanged). -> modules."""
    config = model.config
    heads, kv = config.num_attention_heads // tp, config.num_key_value_heads // tp
    done = 0
    for module in model.modules():
        if hasattr(module, "qkv_proj") and hasattr(module, "num_key_value_heads"):
            module.config = LocalHeads(config, num_attention_heads=heads, num_key_value_heads=kv)
            module.num_key_value_heads = kv
            done += 1
    return done


def shard_with_deepspeed(model, topo: Topology):
    """AutoTP-shard `model` over this rank's TP group; returns the sharded HF module."""
    import deepspeed

    with contextlib.redirect_stdout(sys.stderr), kv_heads_replicated(model, topo.dims.tp):
        deepspeed.init_distributed(dist_backend="nccl" if topo.device.type == "cuda" else "gloo")
        disable_world_allreduce_if_unsafe(topo)
        engine = deepspeed.init_inference(
            model,
            tensor_parallel={"tp_size": topo.dims.tp, "mpu": ModelParallelUnit(topo), "tp_group": topo.group("tp")},
            dtype=next(model.parameters()).dtype,
            replace_with_kernel_inject=False,
        )
    module = engine.module
    if module is not model:
        raise RuntimeError("DeepSpeed AutoTP returned another model object than the one it was given")
    shard_experts(module, topo)  # fused 3-D experts, which AutoTP leaves whole
    localize_fused_attention(module, topo.dims.tp)
    config = model.config
    heads, tp = config.num_attention_heads, topo.dims.tp
    head_dim = model_head_dim(config)
    kv_per_rank = max(1, getattr(config, "num_key_value_heads", heads) // tp)
    attn = module.model.layers[0].self_attn
    if hasattr(attn, "qkv_proj"):  # fused (Phi-3): this rank's q, k and v rows
        local = attn.qkv_proj.weight.shape[0] // head_dim - 2 * kv_per_rank
    else:
        local = attn.q_proj.weight.shape[0] // head_dim
    if local != heads // tp:
        raise RuntimeError(f"AutoTP left {local} query heads on this rank, expected {heads // tp}")
    return module
