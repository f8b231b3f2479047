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
from .ownership import check_replaceable, fresh_sibling, new_id, not_ours, swap_in, write_marker
from .placement import kv_head_ids, to_runs
from .verify import Malformed, check_manifest, checksum_name, file_checksum, header_tensors, inside, read_header
from .. import __version__

PLANES = ("k", "v", "ks", "vs")  # what a rank's file holds per layer: data, and scales when quantised
# 2: sliding-window layers keep their last keys only ("evicted", "layer_first"); a quantised cache its
# scales ("ks", "vs") and its "kv_dtype". 3: a marker id (ownership.py), each rank file's sha256 and its
# tensors' dtypes and shapes (verify.py). 4: xxh3-128 in place of sha256 (verify.CHECKSUMS: checked at
# memory speed). 1 and 2 cannot be verified, so they are not read (save again)
FORMAT, FORMAT_VERSION, READS = "lctk-document-cache", 4, (3, 4)
MANIFEST, TOKENS = "manifest.json", "tokens.safetensors"
MAX_MANIFEST = 256 << 20
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
    """Where a cache may be saved: a new or empty directory, or a cache this toolkit wrote (replaced);
    anything else is refused and left untouched (ownership.py). Checked before any work."""
    return check_replaceable(path, FORMAT, MANIFEST, (TOKENS,), "document cache", CacheError)


def _still_ours(target: Path) -> None:
    why = not_ours(target, FORMAT, MANIFEST, (TOKENS,))
    if why:
        raise CacheError(f"{target} changed while the cache was being saved: {why}; it is left as it is")


def _rank_record(file: Path) -> dict:
    """What the manifest says of a rank file: size, checksum (streamed), and each tensor's dtype and shape."""
    size, checksum = file.stat().st_size, checksum_name(FORMAT_VERSION)
    return {"bytes": size, checksum: file_checksum(file, checksum), "tensors": header_tensors(read_header(file, size))}


def save_session(session, path) -> dict:
    """Collective. A crash at any point leaves the previous cache at `path`, or none: never half of one."""
    from safetensors.torch import save_file

    lcm, topo, cache = session.lcm, session.lcm.topo, session.state.cache
    cache.rollback(session._mark)
    target = check_target(path)  # every rank sees the same filesystem: all refuse, none waits
    made = None
    if topo.is_main:
        try:
            made = str(fresh_sibling(target, "partial"))
        except OSError as err:
            made = CacheError(f"cannot save the cache next to {path} ({type(err).__name__}: {err})")
    made = _gather(topo, made)[0]  # the folder exists before anyone writes (or every rank refuses)
    if isinstance(made, Exception):
        raise made
    partial, dims, c = Path(made), lcm.topo.dims, lcm.topo.coords
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
        info.update(_rank_record(partial / name), layers=sorted(int(k[2:]) for k in tensors if k.startswith("k.")),
                    kv_heads=heads, positions=to_runs(positions),
                    layer_first={str(i): kv.first for i, kv in cache.layers.items() if kv.first},
                    kv_bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
    except Exception as err:  # every rank must reach the gather, or the others wait forever
        info["error"] = f"rank {topo.rank}: {type(err).__name__}: {err}"
    infos = _gather(topo, info)
    errors = [i["error"] for i in infos if i["error"]]
    manifest = None
    if not errors and topo.is_main:
        try:
            save_file({"ids": torch.tensor(session.ids, dtype=torch.int64)}, str(partial / TOKENS))
            marker_id = new_id()
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "toolkit": __version__,
                        "marker": marker_id, "model": _identity(lcm), "dtype": _dtype(lcm), "tokens": session.tokens,
                        "document_sha256": ids_sha256(session.ids), "chat": session.chat,
                        "layout": {"tp": dims.tp, "ulysses": dims.ulysses, "ring": dims.ring, "pp": dims.pp},
                        "sequence_layout": session.state.layout.kind, "chunk_size": lcm.chunk_size,
                        "kv_dtype": cache.kind or "auto",
                        "evicted": {str(i): upto for i, upto in cache.evicted.items()},
                        "kv_bytes": sum(i["kv_bytes"] for i in infos),
                        "ranks": [{k: v for k, v in i.items() if k != "error"} for i in infos]}
            (partial / MANIFEST).write_text(json.dumps(manifest))
            write_marker(partial, FORMAT, marker_id)
            _fsync_dir(partial)
            swap_in(partial, target, _still_ours)
            _fsync_dir(target.parent)
        except Exception as err:  # the others are past their last chance to fail: tell them at the gather
            errors.append(f"rank 0: {type(err).__name__}: {err}")
    if errors and topo.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # made by fresh_sibling above: ours
    errors = [e for part in _gather(topo, errors[:1]) for e in part][:1]  # rank 0's own failure reaches all
    if errors:
        raise CacheError(f"saving the cache to {path} failed ({errors[0]}); nothing was replaced")
    return manifest or {}


def read_manifest(path) -> dict:
    """The manifest, checked key by key (verify.check_manifest), or a CacheError of one line."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise CacheError(f"{path} is not a saved document cache ({MANIFEST} is missing); save one with "
                         "--save-cache or DocumentSession.save")
    file = inside(folder, MANIFEST)
    if file is None:
        raise CacheError(f"{path}/{MANIFEST} is a symbolic link or not a regular file; a cache's files are its own")
    if file.stat().st_size > MAX_MANIFEST:
        raise CacheError(f"{path}/{MANIFEST} is over {MAX_MANIFEST >> 20} MiB: not a manifest lctk wrote")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CacheError(f"{path}/{MANIFEST} is corrupted ({type(err).__name__}); save the cache again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}/{MANIFEST} is not an lctk document cache manifest")
    if manifest.get("format_version") not in READS:
        raise CacheError(f"{path} was written in cache format {manifest.get('format_version')}; this lctk reads "
                         f"formats {', '.join(map(str, READS))}: save the cache again")
    try:
        check_manifest(manifest)
    except Malformed as err:
        raise CacheError(f"{path}/{MANIFEST} is malformed: {err}; save the cache again") from None
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
