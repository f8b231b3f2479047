"""What a rank holds of each checkpoint tensor, and the reads that fill it.

The split is never re-derived here: DeepSpeed's AutoTP layers record theirs when they are
built (read through tensor_parallel.autotp's `recorded_split`; column-parallel layers split
dim 0 of the weight, row-parallel ones dim 1), so the slice read from the checkpoint is
exactly AutoTP's, uneven splits and empty shards included. A parameter whose shape is the checkpoint's is read whole.
What AutoTP does not cut or record (fused experts, KV heads replicated over TP ranks) comes
from tensor_parallel's declared `Splits`, passed in with the model.
"""
from __future__ import annotations

import torch

from ..tensor_parallel.autotp import recorded_split, recorded_subparameters
from ..tensor_parallel.kv_heads import KVRepeats
from ..tensor_parallel.splits import NONE, Splits
from .checkpoint import Checkpoint, ShareError
from .experts import expert_reads

__all__ = ["ShareError", "fill_parameters", "share_index", "share_reads"]


def share_index(module, param: torch.Tensor, full_shape: tuple[int, ...], name: str) -> tuple[slice, ...] | None:
    """The slices of the checkpoint tensor this parameter holds (None: all of it)."""
    shape = tuple(param.shape)
    if shape == tuple(full_shape):
        return None
    dims = [d for d, (mine, full) in enumerate(zip(shape, full_shape)) if mine != full]
    sizes, rank = recorded_split(module)
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


def share_reads(module, param: torch.Tensor, full_shape: tuple[int, ...], name: str,
                kv_repeats: KVRepeats | None = None):
    """[(index into the checkpoint tensor, where it goes in the parameter)] for this rank's share
    (None: all of it). Most shares are one slice; two kinds are several:
    - fused projections (Phi-3's qkv_proj, gate_up_proj): AutoTP cuts each sub-parameter (q, k,
      v; gate, up) on its own and records the widths (`recorded_subparameters`); the rank's
      rows are its piece of each, side by side;
    - KV heads replicated over TP ranks (tensor_parallel.kv_heads): the rank's rows of the grown
      projection are copies of the checkpoint's head they were made from (kv_repeats)."""
    sub_sizes, widths, rank = recorded_subparameters(module)
    if tuple(param.shape) == tuple(full_shape) and kv_repeats is None:
        return [(None, None)]
    if widths is not None and param.shape[1:] == tuple(full_shape[1:]):
        reads, source, at = [], 0, 0
        for sub_size, w in zip(sub_sizes, widths):
            start = source + sum(w[:rank])
            reads.append((_dim0(start, start + w[rank], param.dim()), _dim0(at, at + w[rank], param.dim())))
            source, at = source + sub_size, at + w[rank]
        if at != param.shape[0]:
            raise ShareError(f"{name}: AutoTP's sub-parameter widths give {at} rows, the parameter has {param.shape[0]}")
        return reads
    if kv_repeats is not None:
        head_dim, repeats = kv_repeats.head_dim, kv_repeats.repeats
        rows = full_shape[0] * repeats  # the grown projection's rows
        index = share_index(module, param, (rows, *full_shape[1:]), name) if param.shape[0] != rows else None
        first = 0 if index is None else index[0].start
        reads = []
        for at in range(0, param.shape[0], head_dim):  # one head at a time: its source is head j // repeats
            source = (first + at) // head_dim // repeats * head_dim
            reads.append((_dim0(source, source + head_dim, param.dim()), _dim0(at, at + head_dim, param.dim())))
        return reads
    return [(share_index(module, param, full_shape, name), None)]


def fill_parameters(model, checkpoint: Checkpoint, checkpoint_name, splits: Splits = NONE) -> int:
    """Copy each parameter's share from the checkpoint (cast to the parameter's dtype, on its
    device), straight into its memory; `checkpoint_name(model_name)` maps a parameter's name in
    this rank's model to the checkpoint's; `splits`: how tensor parallelism cut what AutoTP does
    not record. -> bytes read."""
    read, done = 0, set()
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in done:  # tied: the same parameter under two names
                continue
            done.add(id(param))
            name = f"{module_name}.{pname}" if module_name else pname
            source = checkpoint_name(name)
            reads = expert_reads(module, pname, param, source, checkpoint, splits.experts.get(module_name))
            if reads is None:
                if source not in checkpoint:
                    raise ShareError(f"{name} is not in the checkpoint (looked for {source!r})")
                reads = [(source, index, dest) for index, dest in share_reads(
                    module, param, checkpoint.shape(source), name, splits.kv_repeats.get(module_name))]
            with torch.no_grad():
                for tensor, index, dest in reads:
                    read += checkpoint.read_into(tensor, index, param.data if dest is None else param.data[dest])
    return read
