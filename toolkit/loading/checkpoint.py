"""A model folder's safetensors files: which file holds each tensor, its shape and dtype, and
reads of any slice of a tensor straight into the tensor that keeps it.

The format is an 8-byte header length, a JSON header (dtype, shape, byte offsets of each
tensor) and the raw data. A read maps the rows it needs a block at a time, copies the slice
into the destination (casting the dtype and moving it to the device on the way) and releases
the block's pages (madvise DONTNEED). Mapped pages otherwise stay in the rank's resident
memory until the file closes, and safetensors' own get_slice returns a new tensor that is then
copied again: measured on a tp=4 load, those two took the largest rank's peak from 0.16 to
0.59 of the checkpoint.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BLOCK_BYTES = 32 << 20  # file bytes mapped at a time
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """A folder whose weights cannot be read tensor by tensor; the message says what would work."""


class ShareError(RuntimeError):
    """A parameter whose share of the checkpoint cannot be told from the model."""


class Checkpoint:
    """The tensors of one model folder. Use as a context manager: files stay open while loading."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            raise CheckpointError(f"{self.folder} has no safetensors weights ({', '.join(found) or 'no weight files'}); "
                                  "each rank reads its share from safetensors: save the model with "
                                  "save_pretrained(folder) (safetensors is its default)")
        self._maps: dict[str, mmap.mmap] = {}
        # name -> (file, shape, dtype, first byte of the data in the file)
        self.entries: dict[str, tuple[str, tuple[int, ...], torch.dtype, int]] = {}
        try:
            for file in files:
                self._index(file)
        except BaseException:
            self.close()
            raise

    def _index(self, file: str):
        fd = os.open(self.folder / file, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, size, 8))
            # private and writable only so torch can view it; nothing is ever written
            self._maps[file] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in _DTYPES:
                raise CheckpointError(f"{self.folder / file}: tensor {name} has dtype {entry['dtype']}, "
                                      f"which this loader does not read")
            self.entries[name] = (file, tuple(entry["shape"]), _DTYPES[entry["dtype"]], 8 + size + entry["data_offsets"][0])

    def close(self):
        for mapping in self._maps.values():
            mapping.close()
        self._maps.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def nbytes(self) -> int:
        """Bytes of all tensors (what a rank would hold if it loaded everything)."""
        return sum(dtype.itemsize * math.prod(shape) for _file, shape, dtype, _at in self.entries.values())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor, or the part `index` selects, as stored (a new CPU tensor)."""
        _file, shape, dtype, _at = self.entries[name]
        out = torch.empty(_selected_shape(shape, index), dtype=dtype)
        self.read_into(name, index, out)
        return out

    def read_into(self, name: str, index: tuple[slice, ...] | None, out: torch.Tensor) -> int:
        """Fill `out` (any dtype, device and strides) with the tensor or the part that `index`
        selects: one slice per dim, at most one of them partial. -> bytes read."""
        file, shape, dtype, start = self.entries[name]
        if tuple(out.shape) != _selected_shape(shape, index):
            raise ValueError(f"{name}: cannot read {_selected_shape(shape, index)} into {tuple(out.shape)}")
        if not out.is_contiguous():  # a strided part of a parameter: through a buffer of its size
            buffer = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            done = self.read_into(name, index, buffer)
            out.copy_(buffer)
            return done
        dim, lo, hi = _partial_dim(shape, index)
        rows = math.prod(shape[:dim]) if dim else hi - lo  # runs of the selection, as [rows, elements]
        if rows == 0 or out.numel() == 0:
            return 0
        mapping = self._maps[file]
        row_elems = math.prod(shape[dim:]) if dim else math.prod(shape[1:])  # one whole row in the file
        first, last = (lo * row_elems // shape[dim], hi * row_elems // shape[dim]) if dim else (0, row_elems)
        base = start + (lo * row_elems * dtype.itemsize if dim == 0 else 0)
        row_bytes = row_elems * dtype.itemsize
        target = out.view(rows, -1)  # [rows, elements kept per row]
        step = max(1, BLOCK_BYTES // row_bytes)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            at, length = base + r0 * row_bytes, (r1 - r0) * row_bytes
            block = torch.frombuffer(mapping, dtype=torch.uint8, count=length, offset=at)
            target[r0:r1].copy_(block.view(dtype).view(r1 - r0, row_elems)[:, first:last])
            page = at - at % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_DONTNEED, page, at + length - page)
        return out.numel() * dtype.itemsize


def _partial_dim(shape, index) -> tuple[int, int, int]:
    """(dim, start, stop) of the one partial slice (dim 0, whole, when there is none)."""
    partial = [(d, s) for d, s in enumerate(index or ()) if s != slice(None)]
    if len(partial) > 1 or any(s.step not in (None, 1) for _, s in partial):
        raise ValueError(f"reads take at most one contiguous partial slice, got {index}")
    if not shape:
        return 0, 0, 1
    if not partial:
        return 0, 0, shape[0]
    d, s = partial[0]
    lo, hi, _ = s.indices(shape[d])
    return d, lo, hi


def _selected_shape(shape, index) -> tuple[int, ...]:
    if not shape:
        return ()
    dim, lo, hi = _partial_dim(shape, index)
    return tuple(hi - lo if d == dim else n for d, n in enumerate(shape))
