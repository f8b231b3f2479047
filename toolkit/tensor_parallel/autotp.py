"""Tensor parallelism by DeepSpeed inference AutoTP, over the TP groups of our topology.

Two DeepSpeed traps are handled here (ARCHITECTURE.md, Facts):
- AutoTP ignores `tp_group` alone and groups the first tp ranks; with an `mpu` alone it
  shards nothing (the layer replacement reads `tp_group`). We pass both.
- On CPU its shared-memory all-reduce reduces over the whole world, not the group; with
  tp < world that sums over SP ranks too (and without the launcher's LOCAL_SIZE it is not
  even set up and faults). We switch it off unless tp == world under the launcher.
AutoTP also prints to stdout; that goes to stderr so `--json` output stays one object.
This is the one file that touches DeepSpeed's internals: the comm object's shared-memory
level (above), the split its TP layers record (`_partition_sizes`, `tp_index`, the fused
sub-parameter widths), and its split functions, with which `planned_shares` predicts each
rank's share before any weight is read (the loader and `lctk info` use them from here).
What AutoTP cannot do is done around it, before it runs (DeepSpeed materialises a meta model
with `to_empty` at the shapes it finds): fused 3-D experts are cut to this rank's share
(tensor_parallel.experts) and KV heads fewer than TP ranks are replicated
(tensor_parallel.kv_heads). How those were cut is returned as `Splits` for the loader.
"""
from __future__ import annotations

import contextlib
import copy
import sys

import torch

from ..distributed.launcher import launcher_env
from ..distributed.topology import Topology
from ..models import head_dim as model_head_dim
from ..engine.pipeline import balanced_stages, parameter_count
from .experts import intermediate_share, shard_experts
from .kv_heads import PROJECTIONS as REPLICATED
from .kv_heads import kv_heads_replicated
from .splits import Splits


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


def apply_tensor_parallel(model, topo: Topology) -> tuple[object, Splits]:
    """Cut `model` (on the meta device, or real) to this rank's TP share: the experts first, then
    AutoTP's linears; on a meta model DeepSpeed then allocates exactly the shares (`to_empty`).
    -> (the sharded HF module, how the parts AutoTP does not record were cut)."""
    import deepspeed

    experts = shard_experts(model, topo)  # before DeepSpeed materialises anything: AutoTP leaves them whole
    with contextlib.redirect_stdout(sys.stderr), kv_heads_replicated(model, topo.dims.tp) as kv_repeats:
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
    return module, Splits(experts=experts, kv_repeats=kv_repeats)


def recorded_split(module) -> tuple:
    """(sizes of every rank's piece along the split dim, this rank's index) that an AutoTP layer
    recorded when it was built; (None, None) for a module AutoTP did not replace."""
    return getattr(module, "_partition_sizes", None), getattr(module, "tp_index", None)


def recorded_subparameters(module) -> tuple:
    """(sub-parameter sizes, every rank's width of each, this rank's index) of a fused projection
    that AutoTP cut per sub-parameter (Phi-3's qkv_proj, gate_up_proj); Nones otherwise."""
    widths = getattr(module, "_subparam_shard_widths", None)
    if widths is None:
        return None, None, None
    return module._subparam_sizes, widths, module.tp_index


def planned_shares(model, tp: int, pp: int) -> list[list[int]]:
    """Parameters each rank will hold, [stage][tp rank], predicted on a meta model before any
    weight is read, by the rules AutoTP and the pipeline apply (DeepSpeed's own split function
    and row-parallel list; the stage bounds of engine/pipeline.py). Tests hold it to what the
    loader actually keeps."""
    from deepspeed.inference.config import DeepSpeedTPConfig
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.module_inject.fusedqkv_utils import fused_qkv_subparam_sizes, require_tp_fused_qkvw
    from deepspeed.module_inject.layers import _subparam_shard_widths
    from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list

    kv_heads = getattr(model.config, "num_key_value_heads", 0) or model.config.num_attention_heads
    config = copy.copy(model.config)
    config.num_key_value_heads = max(kv_heads, tp)  # what AutoTP splits by once KV heads are replicated
    meta = AutoTPMeta.from_model_config(config, DeepSpeedTPConfig().tp_grain_size)
    rows = {name for _cls, names in AutoTP.tp_parser(model) for name in names} if tp > 1 else set()
    base, head = model.model, model.lm_head

    def linear(module, name: str, row: bool, rank: int, block=None) -> int:
        out_f, in_f = module.weight.shape
        if tp == 1:
            return sum(p.numel() for p in module.parameters())
        if row:  # dim 1 split; the bias is added whole
            bias = module.bias.numel() if module.bias is not None else 0
            return out_f * get_shard_size_list(in_f, tp, meta, name)[rank] + bias
        sizes = None  # fused projections: each sub-parameter cut on its own (AutoTP's rules, its functions)
        if "gate_up_proj" in name:
            sizes, shard_name = (out_f // 2, out_f // 2), "mlp"
        elif require_tp_fused_qkvw(name, tp):
            sizes, shard_name = fused_qkv_subparam_sizes(block, tuple(module.weight.shape), meta), None
        if sizes:
            part = sum(w[rank] for w in _subparam_shard_widths(sizes, tp, meta, shard_name))
        else:
            part = get_shard_size_list(out_f, tp, meta, name)[rank]
        return part * in_f + (part if module.bias is not None else 0)

    def layer(block, rank: int) -> int:
        total = 0
        for name, sub in block.named_modules():
            if isinstance(sub, torch.nn.Linear):
                if tp > kv_heads and name.rsplit(".", 1)[-1] in REPLICATED:  # one KV head's copy
                    total += sub.weight.numel() // kv_heads + (sub.bias.numel() // kv_heads if sub.bias is not None else 0)
                else:  # AutoTP also makes every down_proj row-parallel (a MoE model's dense MLP layers)
                    total += linear(sub, name, name in rows or "down_proj" in name, rank, block)
            elif name and isinstance(getattr(sub, "gate_up_proj", None), torch.nn.Parameter):
                experts, two_i, hidden = sub.gate_up_proj.shape  # cut along the intermediate dim
                a, b = intermediate_share(two_i // 2, tp, rank)
                total += 3 * experts * hidden * (b - a)
            elif name:
                total += sum(p.numel() for p in sub.parameters(recurse=False))
        return total

    layers = list(base.layers)
    bounds = balanced_stages([parameter_count(b) for b in layers], pp, first_extra=parameter_count(base.embed_tokens),
                             last_extra=parameter_count(head))
    tied = head.weight is base.embed_tokens.weight
    shares = []
    for stage, (start, end) in enumerate(bounds):
        per_rank = []
        for rank in range(tp):
            total = sum(layer(b, rank) for b in layers[start:end])
            if stage == 0:
                total += base.embed_tokens.weight.numel()
            if stage == pp - 1:
                total += parameter_count(base.norm)
                if not (tied and pp == 1 and tp == 1):  # a tied head is its own copy once split or staged
                    total += linear(head, "lm_head", True, rank) if tp > 1 else head.weight.numel()
            per_rank.append(total)
        shares.append(per_rank)
    return shares
