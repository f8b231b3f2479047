"""Load a saved document cache on this layout: each rank works out the positions (an even
contiguous share of its ring rank) and KV heads it will hold, and reads just those from the
saved ranks' files, whatever layout wrote them."""
from __future__ import annotations

from pathlib import Path

import torch

from ..distributed.timing import clock
from .placement import even_range, from_runs, kv_head_ids
from .session import QUESTION_ROOM, DocumentSession
from ..attention.kv_quant import CAST, CAST_DTYPE, stored_width
from ..models import head_dim as model_head_dim
from .store import PLANES, TOKENS, CacheError, ids_sha256, mismatch, read_manifest
from .session import document_ids


def _open(folder: Path, entry: dict, where: str):
    from safetensors import safe_open

    file = folder / entry["file"]
    if not file.is_file():
        raise CacheError(f"{where}: {entry['file']} is missing; the cache is incomplete, save it again")
    if file.stat().st_size != entry["bytes"]:
        raise CacheError(f"{where}: {entry['file']} is truncated or was overwritten ({file.stat().st_size} bytes, "
                         f"the manifest says {entry['bytes']}); save the cache again")
    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:  # safetensors raises its own error type on a damaged header
        raise CacheError(f"{where}: {entry['file']} is corrupted ({type(err).__name__}); save the cache again") from None


def _document_ids(folder: Path, manifest: dict, where: str) -> list[int]:
    from safetensors import safe_open

    try:
        with safe_open(str(folder / TOKENS), framework="pt") as handle:
            ids = handle.get_tensor("ids").tolist()
    except Exception as err:
        raise CacheError(f"{where}: {TOKENS} is missing or corrupted ({type(err).__name__}); save the cache again") \
            from None
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
        positions = all_positions[entry.get("layer_first", {}).get(str(layer), 0) :]  # what this layer kept
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


def load_session(lcm, path, document: str | None = None) -> DocumentSession:
    """Collective: every rank reads its share. Refusals come before any tensor is read; with
    `document` (its text), a cache saved for another document is refused too."""
    t0 = clock(lcm.topo.device)
    manifest, ids = check_cache(lcm, path)
    if document is not None and ids != document_ids(lcm.tokenizer, document, manifest["chat"]):
        raise CacheError(f"the cache in {path} was saved for another document")
    folder, where = Path(path), str(path)
    topo, dims, c = lcm.topo, lcm.topo.dims, lcm.topo.coords
    n = manifest["tokens"]
    saved = []
    for entry in manifest["ranks"]:
        saved.append((entry, _open(folder, entry, where), from_runs(entry["positions"])))
    heads = kv_head_ids(lcm.config.num_key_value_heads, dims.tp, c["tp"], dims.ulysses, c["ulysses"])
    a, b = even_range(n, dims.ring, c["ring"])
    layers = range(lcm.stage.start, lcm.stage.end) if lcm.stage is not None else range(lcm.config.num_hidden_layers)
    head_dim = model_head_dim(lcm.config)
    dtype = next(lcm.model.parameters()).dtype
    state = lcm.new_state(lcm._reserve(n, QUESTION_ROOM))
    evicted = {int(i): upto for i, upto in manifest.get("evicted", {}).items()}
    planes = stored_planes(state.cache.kind, head_dim, dtype)
    for layer in layers:
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
    state.cache.evicted = {i: upto for i, upto in evicted.items() if i in layers}
    session = DocumentSession(lcm, ids, state, manifest["chat"], 0.0, loaded_from=where)
    session.load_s = clock(topo.device) - t0
    return session
