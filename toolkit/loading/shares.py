"""What a rank holds of each checkpoint tensor, and the reads that fill it.

The split is never re-derived here: DeepSpeed's AutoTP layers record theirs when they are
built (`_partition_sizes`, `tp_index`; column-parallel layers split dim 0 of the weight,
row-parallel ones dim 1), so the slice read from the checkpoint is exactly AutoTP's, uneven
splits and empty shards included. A parameter whose shape is the checkpoint's is read whole.
"""
from __future__ import annotations

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


def fill_parameters(model, checkpoint: Checkpoint, checkpoint_name) -> int:
    """Copy each parameter's share from the checkpoint (cast to the parameter's dtype, on its
    device); `checkpoint_name(model_name)` maps a parameter's name in this rank's model to the
    checkpoint's. One tensor is in flight at a time. -> bytes read."""
    read, done = 0, set()
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in done:  # tied: the same parameter under two names
                continue
            done.add(id(param))
            name = f"{module_name}.{pname}" if module_name else pname
            source = checkpoint_name(name)
            if source not in checkpoint:
                raise ShareError(f"{name} is not in the checkpoint (looked for {source!r})")
            index = share_index(module, param, checkpoint.shape(source), name)
            with torch.no_grad():
                value = checkpoint.read(source, index)
                read += value.numel() * value.element_size()
                param.copy_(value.to(param.dtype))
    return read
