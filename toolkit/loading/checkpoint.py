"""A model folder's safetensors files: which file holds each tensor, its shape and dtype, and
reads of any slice of a tensor without touching the rest of it (safe_open(...).get_slice).

Only headers are read to build the index; a slice read maps just the pages it covers.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """A folder whose weights cannot be read tensor by tensor; the message says what would work."""


class Checkpoint:
    """The tensors of one model folder. Use as a context manager: files stay open while loading."""

    def __init__(self, folder):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            raise CheckpointError(f"{self.folder} has no safetensors weights ({', '.join(found) or 'no weight files'}); "
                                  "each rank reads its share from safetensors: save the model with "
                                  "save_pretrained(folder) (safetensors is its default)")
        self._stack = contextlib.ExitStack()
        self._handles = {name: self._stack.enter_context(safe_open(str(self.folder / name), framework="pt"))
                         for name in files}
        self.entries: dict[str, tuple[str, tuple[int, ...], str]] = {}  # name -> (file, shape, dtype)
        for file, handle in self._handles.items():
            for key in handle.keys():
                part = handle.get_slice(key)
                self.entries[key] = (file, tuple(part.get_shape()), part.get_dtype())

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def nbytes(self) -> int:
        """Bytes of all tensors (what a rank would hold if it loaded everything)."""
        total = 0
        for _file, shape, dtype in self.entries.values():
            total += _DTYPES[dtype].itemsize * int(torch.Size(shape).numel())
        return total

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The tensor, or the part of it that `index` (one slice per dim) selects, as stored."""
        file = self.entries[name][0]
        if index is None or all(s == slice(None) for s in index):
            return self._handles[file].get_tensor(name)
        return self._handles[file].get_slice(name)[index]
