"""Load a saved document cache on this layout: each rank works out the positions (an even
contiguous share of its ring rank) and KV heads it will hold, and reads just those from the
saved ranks' files, whatever layout wrote them. Nothing is used before it is verified (verify.py)."""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..distributed.timing import clock
from .placement import even_range, from_runs, kv_head_ids
from .session import QUESTION_ROOM, DocumentSession
from ..attention.kv_formats import cache_kind
from ..attention.kv_quant import CAST, CAST_DTYPE, stored_width
from ..models import head_dim as model_head_dim
from .store import PLANES, TOKENS, CacheError, _gather, ids_sha256, mismatch, read_manifest
from .session import document_ids
from .verify import checksum_name, expected_tensors, file_checksum, header_tensors, inside, read_header, tensor_mismatch


def _checked_file(folder: Path, name: str, where: str, size_saved: int | None = None) -> tuple[Path, int, dict]:
    """(path, size, header tensors) of a file the manifest names, held inside the folder."""
    file = inside(folder, name)
    if file is None:
        if (folder / name).is_symlink():
            raise CacheError(f"{where}: {name} is a symbolic link; a cache's files must be its own, save it again")
        raise CacheError(f"{where}: {name} is missing; the cache is incomplete, save it again")
    size = file.stat().st_size
    if size_saved is not None and size != size_saved:
        raise CacheError(f"{where}: {name} is truncated or was overwritten ({size} bytes, "
                         f"the manifest says {size_saved}); save the cache again")
    try:
        return file, size, header_tensors(read_header(file, size))
    except (OSError, ValueError) as err:  # damaged JSON, an impossible length
        raise CacheError(f"{where}: {name} is corrupted ({type(err).__name__}); save the cache again") from None


def _rank_file(folder: Path, entry: dict, where: str, planes, kv_heads: int) -> Path:
    """A rank file whose size and header are what its manifest entry says, and that entry what
    this model would have written for its layout: refused before a tensor byte is read."""
    name = entry["file"]
    file, _, found = _checked_file(folder, name, where, entry["bytes"])
    why = tensor_mismatch(found, entry["tensors"])
    if why is None:
        why = tensor_mismatch(entry["tensors"], expected_tensors(entry, planes, PLANES), "the manifest",
                              "this model, for the layers, heads and positions it records,")
    if why is None and any(h >= kv_heads for h in entry["kv_heads"]):
        why = f"the manifest gives it KV heads up to {max(entry['kv_heads'])}; this model has {kv_heads}"
    if why:
        raise CacheError(f"{where}: {name} does not match: {why}; save the cache again")
    return file


def _open(file: Path, where: str):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:  # safetensors raises its own error type on a damaged header
        raise CacheError(f"{where}: {file.name} is corrupted ({type(err).__name__}); save the cache again") from None


def _document_ids(folder: Path, manifest: dict, where: str) -> list[int]:
    from safetensors import safe_open

    file, _, found = _checked_file(folder, TOKENS, where)
    if found != {"ids": {"dtype": "I64", "shape": [manifest["tokens"]]}}:
        raise CacheError(f"{where}: {TOKENS} does not hold the manifest's {manifest['tokens']} token ids; "
                         "save the cache again")
    try:
        with safe_open(str(file), framework="pt") as handle:
            ids = handle.get_tensor("ids").tolist()
    except Exception as err:
        raise CacheError(f"{where}: {TOKENS} is corrupted ({type(err).__name__}); save the cache again") from None
    if len(ids) != manifest["tokens"] or ids_sha256(ids) != manifest["document_sha256"]:
        raise CacheError(f"{where}: the document's token ids do not match the manifest; save the cache again")
    return ids


def check_cache(lcm, path) -> tuple[dict, list[int]]:
    """The manifest and document ids, or a CacheError saying why this cache cannot serve this model."""
    manifest = read_manifest(path)
    why = mismatch(manifest, lcm)
    if why:
        raise CacheError(f"the cache in {path} does not fit this model: {why}")
    return manifest, _document_ids(Path(path), manifest, str(path))


class _Hasher(threading.Thread):
    """This rank's share of the rank files (every world-th), hashed in the background while the
    tensors are read: hashing and file reads release the GIL, so it can use a core the reads leave free."""

    def __init__(self, files: list[tuple[Path, str]], checksum: str):
        super().__init__(daemon=True, name="lctk-cache-checksum")
        self.files, self.checksum = files, checksum
        self.error = f"its files' {checksum} could not be checked"  # until every one is

    def run(self):
        try:
            for file, want in self.files:
                if file_checksum(file, self.checksum) != want:
                    self.error = (f"{file.name} is damaged: its {self.checksum} is not the one the manifest "
                                  "recorded at save; save the cache again")
                    return
            self.error = None
        except Exception as err:  # an unreadable file: refused, never taken as checked
            self.error = f"a rank file cannot be read to check it ({type(err).__name__}); save the cache again"


def stored_planes(kind: str | None, head_dim: int, dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(trailing shape, dtype) of each plane a cache of `kind` stores per layer (store.PLANES' order)."""
    if kind is None:
        return [((head_dim,), dtype)] * 2
    if kind in CAST:
        return [((head_dim,), CAST_DTYPE[kind])] * 2
    data = torch.uint8 if kind == "int4" else torch.int8 if kind == "int8" else torch.float8_e4m3fn
    return [((stored_width(kind, head_dim),), data)] * 2 + [((), torch.float32)] * 2


def _fill(layer: int, name: str, heads: list[int], a: int, b: int, saved: list, out: torch.Tensor, where: str):
    """out [1, len(heads), b - a, d] <- the saved shards' pieces of these heads and positions."""
    filled = torch.zeros(len(heads), b - a, dtype=torch.bool)
    for entry, handle, all_positions in saved:
        if layer not in entry["layers"]:
            continue
        positions = all_positions[entry["layer_first"].get(str(layer), 0) :]  # what this layer kept
        i0, i1 = (int(torch.searchsorted(positions, x)) for x in (a, b))  # ascending: one run of offsets
        if i0 == i1:
            continue
        dest = positions[i0:i1] - a
        piece = None
        for j, head in enumerate(heads):
            if head not in entry["kv_heads"] or bool(filled[j, dest].all()):
                continue
            h = entry["kv_heads"].index(head)
            if piece is None:
                piece = handle.get_slice(f"{name}.{layer}")
            out[0, j, dest] = piece[:, h : h + 1, i0:i1][0, 0].to(out.dtype)  # [i1 - i0, d'] (a scale: [i1 - i0])
            filled[j, dest] = True
    if not bool(filled.all()):
        raise CacheError(f"{where}: the saved ranks do not hold every position and head of layer {layer}; "
                         "the cache is incomplete, save it again")


def _read(lcm, manifest: dict, saved: list, planes, where: str):
    """A new attention state whose cache holds this rank's heads and even share of positions."""
    topo, dims, c, n = lcm.topo, lcm.topo.dims, lcm.topo.coords, manifest["tokens"]
    heads = kv_head_ids(lcm.config.num_key_value_heads, dims.tp, c["tp"], dims.ulysses, c["ulysses"])
    a, b = even_range(n, dims.ring, c["ring"])
    state = lcm.new_state(lcm._reserve(n, QUESTION_ROOM))
    evicted = {int(i): upto for i, upto in manifest["evicted"].items()}
    for layer in _layers(lcm):
        first = max(a, evicted.get(layer, -1) + 1)  # a sliding window's layer: its last keys only
        held = max(0, b - first)
        read = []
        for name, (width, plane_dtype) in zip(PLANES, planes):
            out = torch.empty((1, len(heads), held, *width), dtype=plane_dtype)  # [1, g, L, d'] or scales [1, g, L]
            _fill(layer, name, heads, first, first + held, saved, out, where)
            read.append(out.to(topo.device))
        state.cache.layer(layer).extend(read, state.cache.reserve_tokens)
        state.cache.layer(layer).dropped = min(first, b) - a  # a range wholly evicted drops all it had
    state.cache.set_positions([torch.arange(*even_range(n, dims.ring, r)) for r in range(dims.ring)])
    state.cache.evicted = {i: upto for i, upto in evicted.items() if i in _layers(lcm)}
    return state


def _layers(lcm) -> range:
    return range(lcm.stage.start, lcm.stage.end) if lcm.stage is not None else range(lcm.config.num_hidden_layers)


def load_session(lcm, path, document: str | None = None, verify: bool = True) -> DocumentSession:
    """Collective: every rank reads its share. The manifest, file names, sizes and headers are
    checked before any tensor is read; each rank file's checksum while they are read (every rank
    hashing its share of the files), and a mismatch anywhere refuses the cache on every rank.
    With `document` (its text), a cache saved for another document is refused too. verify=False
    skips only the checksum (storage the caller vouches for; the benchmark's baseline): the manifest,
    names, sizes and headers are checked all the same."""
    t0 = clock(lcm.topo.device)
    manifest, ids = check_cache(lcm, path)
    if document is not None and ids != document_ids(lcm.tokenizer, document, manifest["chat"]):
        raise CacheError(f"the cache in {path} was saved for another document")
    folder, where, topo = Path(path), str(path), lcm.topo
    dtype = next(lcm.model.parameters()).dtype
    planes = stored_planes(cache_kind(lcm.run.kv_dtype, lcm.run.dtype), model_head_dim(lcm.config), dtype)
    files = [_rank_file(folder, e, where, planes, lcm.config.num_key_value_heads) for e in manifest["ranks"]]
    checksum = checksum_name(manifest["format_version"])
    hasher = _Hasher([(f, e[checksum]) for i, (f, e) in enumerate(zip(files, manifest["ranks"]))
                      if verify and i % topo.world == topo.rank], checksum)
    hasher.start()
    state, error = None, None
    try:
        saved = [(entry, _open(file, where), from_runs(entry["positions"]))
                 for file, entry in zip(files, manifest["ranks"])]
        state = _read(lcm, manifest, saved, planes, where)
    except CacheError as err:  # every rank must reach the gather below
        error = str(err)
    finally:
        hasher.join()
    errors = [e for e in _gather(topo, error or (hasher.error and f"{where}: {hasher.error}")) if e]
    if errors:  # a damaged file one rank hashed refuses the cache on every rank
        raise CacheError(errors[0])
    session = DocumentSession(lcm, ids, state, manifest["chat"], 0.0, loaded_from=where)
    session.load_s = clock(topo.device) - t0
    return session
