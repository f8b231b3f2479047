"""What a rank holds of each checkpoint tensor, and the reads that fill it.

The split is never re-derived here: DeepSpeed's AutoTP layers record theirs when they are
built (`_partition_sizes`, `tp_index`; column-parallel layers split dim 0 of the weight,
row-parallel ones dim 1), so the slice read from the checkpoint is exactly AutoTP's, uneven
splits and empty shards included. A parameter whose shape is the checkpoint's is read whole.
"""
from __future__ import annotations

import copy

import torch

from .checkpoint import Checkpoint


class ShareError(RuntimeError):
    """A parameter whose share of the checkpoint cannot be told from the model."""


def share_index(module, param: torch.Tensor, full_shape: tuple[int, ...], name: str) -> tuple[slice, ...] | None:
    """The slices of the checkpoint tensor this parameter holds (None: all of it)."""
    shape = tuple(param.shape)
    if shape == tuple(full_shape):
        return None
    dims = [d for d, (mine, full) in enumerate(zip(shape, full_shape)) if mine != full]
    sizes, rank = getattr(module, "_partition_sizes", None), getattr(module, "tp_index", None)
    if len(shape) != len(full_shape) or len(dims) != 1 or sizes is None or rank is None:
        raise ShareError(f"{name}: this rank holds {shape} of the checkpoint's {tuple(full_shape)} and "
                         f"{type(module).__name__} does not say which part (an AutoTP layer of a kind the loader "
                         "does not read by slices)")
    dim = dims[0]
    if sum(sizes) != full_shape[dim] or sizes[rank] != shape[dim]:
        raise ShareError(f"{name}: AutoTP's split {tuple(sizes)} of dim {dim} does not match the checkpoint's "
                         f"{full_shape[dim]} and this rank's {shape[dim]}")
    start = sum(sizes[:rank])
    index = [slice(None)] * len(shape)
    index[dim] = slice(start, start + sizes[rank])
    return tuple(index)


def _dim0(start: int, stop: int, ndim: int) -> tuple[slice, ...]:
    return (slice(start, stop),) + (slice(None),) * (ndim - 1)


def share_reads(module, param: torch.Tensor, full_shape: tuple[int, ...], name: str):
    """[(index into the checkpoint tensor, where it goes in the parameter)] for this rank's share
    (None: all of it). Most shares are one slice; two kinds are several:
    - fused projections (Phi-3's qkv_proj, gate_up_proj): AutoTP cuts each sub-parameter (q, k,
      v; gate, up) on its own and records the widths (`_subparam_shard_widths`); the rank's
      rows are its piece of each, side by side;
    - KV heads replicated over TP ranks (tensor_parallel.kv_heads): the rank's rows of the grown
      projection are copies of the checkpoint's head they were made from."""
    widths = getattr(module, "_subparam_shard_widths", None)
    repeats = getattr(module, "_lctk_kv_repeats", None)
    if tuple(param.shape) == tuple(full_shape) and repeats is None:
        return [(None, None)]
    if widths is not None and param.shape[1:] == tuple(full_shape[1:]):
        rank, reads, source, at = module.tp_index, [], 0, 0
        for sub_size, w in zip(module._subparam_sizes, widths):
            start = source + sum(w[:rank])
            reads.append((_dim0(start, start + w[rank], param.dim()), _dim0(at, at + w[rank], param.dim())))
            source, at = source + sub_size, at + w[rank]
        if at != param.shape[0]:
            raise ShareError(f"{name}: AutoTP's sub-parameter widths give {at} rows, the parameter has {param.shape[0]}")
        return reads
    if repeats is not None:
        head_dim = module._lctk_head_dim
        rows = full_shape[0] * repeats  # the grown projection's rows
        index = share_index(module, param, (rows, *full_shape[1:]), name) if param.shape[0] != rows else None
        first = 0 if index is None else index[0].start
        reads = []
        for at in range(0, param.shape[0], head_dim):  # one head at a time: its source is head j // repeats
            source = (first + at) // head_dim // repeats * head_dim
            reads.append((_dim0(source, source + head_dim, param.dim()), _dim0(at, at + head_dim, param.dim())))
        return reads
    return [(share_index(module, param, full_shape, name), None)]


def fill_parameters(model, checkpoint: Checkpoint, checkpoint_name) -> int:
    """Copy each parameter's share from the checkpoint (cast to the parameter's dtype, on its
    device), straight into its memory; `checkpoint_name(model_name)` maps a parameter's name in
    this rank's model to the checkpoint's. -> bytes read."""
    from .experts import expert_reads

    read, done = 0, set()
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in done:  # tied: the same parameter under two names
                continue
            done.add(id(param))
            name = f"{module_name}.{pname}" if module_name else pname
            source = checkpoint_name(name)
            reads = expert_reads(module, pname, param, source, checkpoint)
            if reads is None:
                if source not in checkpoint:
                    raise ShareError(f"{name} is not in the checkpoint (looked for {source!r})")
                reads = [(source, index, dest) for index, dest in
                         share_reads(module, param, checkpoint.shape(source), name)]
            with torch.no_grad():
                for tensor, index, dest in reads:
                    read += checkpoint.read_into(tensor, index, param.data if dest is None else param.data[dest])
    return read


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

    from ..engine.pipeline import balanced_stages, parameter_count
    from ..tensor_parallel.experts import intermediate_share
    from ..tensor_parallel.kv_heads import PROJECTIONS as REPLICATED

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
