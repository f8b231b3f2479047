"""A document session's cache on disk: one safetensors file per rank with its K/V shards, the
document's token ids, and manifest.json saying what model, dtype, layout, positions and heads
it holds. Written into a temporary directory and renamed by rank 0 after every rank is done;
read back on any layout, each rank reading only the positions and heads it will hold."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..attention.kv_formats import cache_kind
from .placement import kv_head_ids, to_runs
from .. import __version__

# 2: sliding-window layers keep their last keys only ("evicted", "layer_first"); a quantised cache its
# scales ("ks", "vs") and its "kv_dtype"; 1 reads as 2 without them
PLANES = ("k", "v", "ks", "vs")  # what a rank's file holds per layer: data, and scales when quantised
FORMAT, FORMAT_VERSION, READS = "lctk-document-cache", 2, (1, 2)
MANIFEST, TOKENS = "manifest.json", "tokens.safetensors"
_NOT_IDENTITY = {"torch_dtype", "dtype", "attn_implementation", "transformers_version", "_name_or_path",
                 "use_cache", "tp_plan", "base_model_tp_plan"}


class CacheError(ValueError):
    """A saved cache that cannot be used here; the message says which part and why."""


def config_sha256(config) -> str:
    items = {k: v for k, v in config.to_dict().items() if k not in _NOT_IDENTITY and not k.startswith("_")}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(folder) -> str | None:
    """Names, sizes, headers and the first 64 KiB of tensor data of each safetensors file: a few reads
    even for a 405B checkpoint's hundreds of files, and it changes with the weights."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    for file in files:
        with open(file, "rb") as handle:
            digest.update(file.name.encode() + str(file.stat().st_size).encode())
            head = handle.read(8)
            digest.update(head + handle.read(int.from_bytes(head, "little") + 65536 if len(head) == 8 else 0))
    return digest.hexdigest() if files else None


def ids_sha256(ids) -> str:
    return hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()


def _gather(topo, obj) -> list:
    """Every rank's obj, in rank order (and so a barrier too)."""
    return topo.comm.all_gather_object(obj, topo.world_group())


def _identity(lcm) -> dict:
    cfg = lcm.config
    return {"config_sha256": config_sha256(cfg), "weights": weights_fingerprint(lcm.weights_folder),
            "model_type": cfg.model_type, "layers": cfg.num_hidden_layers}


def _dtype(lcm) -> str:
    return str(next(lcm.model.parameters()).dtype).removeprefix("torch.")


def _fsync_dir(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target(path) -> Path:
    """Where a cache may be saved: a new or empty directory, or an old cache (replaced); checked before any work."""
    target = Path(path).absolute()
    if not target.parent.is_dir():
        raise CacheError(f"cannot save the cache to {path}: folder {target.parent} does not exist")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MANIFEST).is_file())):
        raise CacheError(f"{path} exists and is not a saved document cache; give a new directory (or an old cache)")
    return target


def save_session(session, path) -> dict:
    """Collective. A crash at any point leaves the previous cache at `path`, or none: never half of one."""
    from safetensors.torch import save_file

    lcm, topo, cache = session.lcm, session.lcm.topo, session.state.cache
    cache.rollback(session._mark)
    target = check_target(path)  # every rank sees the same filesystem: all refuse, none waits
    partial = target.parent / f".{target.name}.partial"
    if topo.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _gather(topo, None)  # the folder exists before anyone writes
    dims, c = lcm.topo.dims, lcm.topo.coords
    name = f"rank-{topo.rank:05d}.safetensors"
    info = {"file": name, "rank": topo.rank, "coords": dict(c), "error": None}
    try:
        tensors = {}
        for i, kv in sorted(cache.layers.items()):
            stored = kv.stored()  # the live keys (a sliding window's layer: its last ones), as stored
            if stored.length:
                for plane, tensor in zip(PLANES, stored.tensors()):  # [1, g, L, d'] (scales [1, g, L])
                    tensors[f"{plane}.{i}"] = tensor.contiguous().cpu()
        save_file(tensors, str(partial / name))
        with open(partial / name, "rb+") as handle:
            os.fsync(handle.fileno())
        positions = cache.shard_positions(c["ring"])
        heads = kv_head_ids(lcm.config.num_key_value_heads, dims.tp, c["tp"], dims.ulysses, c["ulysses"])
        info.update(bytes=(partial / name).stat().st_size, layers=sorted(int(k[2:]) for k in tensors if k.startswith("k.")),
                    kv_heads=heads, positions=to_runs(positions),
                    layer_first={str(i): kv.first for i, kv in cache.layers.items() if kv.first},
                    kv_bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
    except Exception as err:  # every rank must reach the gather, or the others wait forever
        info["error"] = f"rank {topo.rank}: {type(err).__name__}: {err}"
    infos = _gather(topo, info)
    errors = [i["error"] for i in infos if i["error"]]
    manifest = None
    if not errors and topo.is_main:
        save_file({"ids": torch.tensor(session.ids, dtype=torch.int64)}, str(partial / TOKENS))
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "toolkit": __version__,
                    "model": _identity(lcm), "dtype": _dtype(lcm), "tokens": session.tokens,
                    "document_sha256": ids_sha256(session.ids), "chat": session.chat,
                    "layout": {"tp": dims.tp, "ulysses": dims.ulysses, "ring": dims.ring, "pp": dims.pp},
                    "sequence_layout": session.state.layout.kind, "chunk_size": lcm.chunk_size,
                    "kv_dtype": cache.kind or "auto",
                    "evicted": {str(i): upto for i, upto in cache.evicted.items()},
                    "kv_bytes": sum(i["kv_bytes"] for i in infos),
                    "ranks": [{k: v for k, v in i.items() if k != "error"} for i in infos]}
        (partial / MANIFEST).write_text(json.dumps(manifest))
        _fsync_dir(partial)
        old = target.parent / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.rename(target, old)
        os.rename(partial, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    elif errors and topo.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    _gather(topo, None)
    if errors:
        raise CacheError(f"saving the cache to {path} failed ({errors[0]}); nothing was replaced")
    return manifest or {}


def read_manifest(path) -> dict:
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise CacheError(f"{path} is not a saved document cache ({MANIFEST} is missing); save one with "
                         "--save-cache or DocumentSession.save")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}/{MANIFEST} is corrupted ({type(err).__name__}); save the cache again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}/{MANIFEST} is not an lctk document cache manifest")
    if manifest.get("format_version") not in READS:
        raise CacheError(f"{path} was written in cache format {manifest.get('format_version')}; this lctk reads "
                         f"formats {', '.join(map(str, READS))}: save the cache again")
    return manifest


def mismatch(manifest: dict, lcm) -> str | None:
    """Why this cache cannot serve this model, or None."""
    mine = _identity(lcm)
    theirs = manifest["model"]
    if theirs.get("config_sha256") != mine["config_sha256"]:
        return (f"it was saved from another model ({theirs.get('model_type')}, {theirs.get('layers')} layers; "
                f"this one is {mine['model_type']}, {mine['layers']} layers)" if
                (theirs.get("model_type"), theirs.get("layers")) != (mine["model_type"], mine["layers"])
                else "it was saved from a model with another configuration")
    if theirs.get("weights") and mine["weights"] and theirs["weights"] != mine["weights"]:
        return "it was saved from a model with the same configuration but other weights"
    if manifest.get("dtype") != _dtype(lcm):
        return f"it holds {manifest.get('dtype')} keys and values; this model runs in {_dtype(lcm)} (--dtype)"
    saved, mine = manifest.get("kv_dtype", "auto"), cache_kind(lcm.run.kv_dtype, lcm.run.dtype) or "auto"
    if saved != mine:
        return f"its KV cache is stored as {saved}; this run stores {mine} (--kv-dtype {saved} reads it)"
    return None
