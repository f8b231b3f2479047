"""What a saved cache must be before a byte of it is used: a manifest of the expected shape
(every key, of its type, in range), file names that stay inside the cache folder, each rank
file's header holding exactly the tensors, dtypes and shapes the manifest lists, and each rank
file's checksum (header and tensor bytes; xxh3-128 since format 4, sha256 in format 3), hashed
as a stream of 4 MiB blocks. Anything else is a CacheError of one line."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
import xxhash

BLOCK = 4 << 20  # bytes read per step while hashing: memory stays flat whatever the file's size
MAX_HEADER = 100 << 20  # safetensors' own limit on a header
_HEX64 = re.compile(r"[0-9a-f]{64}")
# the checksum each format version records per rank file: xxh3-128 reads at memory speed (about 20 GB/s
# on one core, sha256 under 2 GB/s), so checking a cache costs little over reading it; it detects damage,
# and a cache folder is trusted storage as far as deliberate tampering goes (README, Security and limits)
CHECKSUMS = {3: ("sha256", hashlib.sha256), 4: ("xxh3_128", xxhash.xxh3_128)}
ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64",
            torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
NoneType = type(None)
TOP = {"format": str, "format_version": int, "toolkit": str, "marker": str, "model": dict, "dtype": str,
       "tokens": int, "document_sha256": str, "chat": bool, "layout": dict, "sequence_layout": str,
       "chunk_size": int, "kv_dtype": str, "evicted": dict, "kv_bytes": int, "ranks": list}
MODEL = {"config_sha256": str, "weights": (str, NoneType), "model_type": str, "layers": int}
RANK = {"file": str, "rank": int, "coords": dict, "bytes": int, "layers": list, "kv_heads": list,
        "positions": list, "layer_first": dict, "kv_bytes": int, "tensors": dict}
_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", list: "a list",
          (str, NoneType): "a string or null"}


class Malformed(ValueError):
    """What is wrong with a manifest, said as a fragment ("ranks[0]: 'file' is missing")."""


def _is(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _fields(obj: dict, spec: dict, at: str):
    for key, kind in spec.items():
        if key not in obj:
            raise Malformed(f"{at}{key!r} is missing")
        if not _is(obj[key], kind):
            raise Malformed(f"{at}{key!r} should be {_NAMES[kind]}, not {type(obj[key]).__name__}")


def _ints(values, at: str, low: int = 0, high: int | None = None) -> list[int]:
    if not isinstance(values, list) or not all(_is(v, int) and v >= low and (high is None or v < high)
                                               for v in values):
        bound = f" below {high}" if high is not None else ""
        raise Malformed(f"{at} should be a list of integers from {low}{bound}")
    return values


def plain_name(name: str, at: str) -> str:
    """A file name the manifest gives: a plain name inside the cache folder, nothing else."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or ":" in name:
        raise Malformed(f"{at} names {name!r}, which is not a plain file name inside the cache folder")
    return name


def _rank(entry, i: int, tokens: int, layers: int, checksum: str) -> None:
    at = f"ranks[{i}]: "
    if not isinstance(entry, dict):
        raise Malformed(f"ranks[{i}] should be an object")
    _fields(entry, {**RANK, checksum: str}, at)
    plain_name(entry["file"], f"{at}'file'")
    digits = 2 * CHECKSUMS_BY_NAME[checksum]().digest_size
    if entry["bytes"] < 0 or not re.fullmatch(f"[0-9a-f]{{{digits}}}", entry[checksum]):
        raise Malformed(f"{at}'bytes' or {checksum!r} is not a size and a {checksum} hex digest")
    _ints(entry["layers"], f"{at}'layers'", 0, layers)
    _ints(entry["kv_heads"], f"{at}'kv_heads'")
    held, end = 0, 0
    for run in entry["positions"]:
        if not (isinstance(run, list) and len(run) == 2 and all(_is(x, int) for x in run)
                and run[0] >= end and run[1] >= 1 and run[0] + run[1] <= tokens):
            raise Malformed(f"{at}'positions' should be ascending [start, length] runs inside the {tokens} tokens")
        held, end = held + run[1], run[0] + run[1]
    for layer, first in entry["layer_first"].items():
        if not (layer.isdigit() and int(layer) in entry["layers"] and _is(first, int) and 0 <= first <= held):
            raise Malformed(f"{at}'layer_first' should map a saved layer to a count of its positions")
    for name, spec in entry["tensors"].items():
        if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
                and all(_is(x, int) and x >= 0 for x in spec["shape"])):
            raise Malformed(f"{at}'tensors' should map each tensor's name to its dtype and shape ({name!r} does not)")


def check_manifest(manifest: dict) -> None:
    """Raise Malformed naming the first key that is missing, of a wrong type or out of range
    (the format version is checked before: store.read_manifest)."""
    _fields(manifest, TOP, "")
    checksum = checksum_name(manifest["format_version"])
    _fields(manifest["model"], MODEL, "model: ")
    tokens, layers = manifest["tokens"], manifest["model"]["layers"]
    if tokens < 1 or layers < 1 or not _HEX64.fullmatch(manifest["document_sha256"]):
        raise Malformed("'tokens', 'model.layers' or 'document_sha256' is out of range")
    for layer, upto in manifest["evicted"].items():
        if not (layer.isdigit() and _is(upto, int) and -1 <= upto < tokens):
            raise Malformed("'evicted' should map a layer to the last position it dropped")
    if not manifest["ranks"]:
        raise Malformed("'ranks' is empty")
    for i, entry in enumerate(manifest["ranks"]):
        _rank(entry, i, tokens, layers, checksum)
    files = [entry["file"] for entry in manifest["ranks"]]
    if len(set(files)) != len(files):
        raise Malformed("two ranks name the same file")


def inside(folder: Path, name: str) -> Path | None:
    """folder/name when it is a regular file in the folder itself (a symlink is not), else None."""
    path = folder / name
    return path if path.is_file() and not path.is_symlink() and path.resolve().parent == folder.resolve() else None


def read_header(path: Path, size: int) -> dict:
    """A safetensors file's header (names -> dtype, shape, offsets), read on its own; ValueError if damaged."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(size - 8, MAX_HEADER):
            raise ValueError("its header length is impossible")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not an object")
    header.pop("__metadata__", None)
    return header


def header_tensors(header: dict) -> dict:
    """{name: {"dtype", "shape"}} of a header, the manifest's form."""
    return {name: {"dtype": spec.get("dtype"), "shape": spec.get("shape")} if isinstance(spec, dict) else spec
            for name, spec in header.items()}


def tensor_mismatch(found: dict, listed: dict, found_as: str = "the file", listed_as: str = "the manifest"):
    """How the tensors `found` differ from those `listed` ({name: {"dtype", "shape"}}), or None."""
    for name in sorted(set(found) | set(listed)):
        if name not in listed:
            return f"{found_as} holds a tensor {name!r} {listed_as} does not list"
        if name not in found:
            return f"{found_as} lacks the tensor {name!r} {listed_as} lists"
        have, want = found[name], listed[name]
        if have != want:
            if not isinstance(have, dict):
                return f"{found_as} describes tensor {name!r} as {have!r}"
            return (f"{found_as} says tensor {name!r} is {have.get('dtype')} {have.get('shape')}, "
                    f"{listed_as} {want['dtype']} {want['shape']}")
    return None


def expected_tensors(entry: dict, planes: list[tuple[tuple[int, ...], torch.dtype]], names) -> dict:
    """What a rank file of this model must hold, from its manifest entry: per saved layer and
    plane, [1, its KV heads, its positions kept by that layer, width] in the plane's dtype."""
    held = sum(n for _, n in entry["positions"])
    out = {}
    for layer in entry["layers"]:
        kept = held - entry["layer_first"].get(str(layer), 0)
        for name, (width, dtype) in zip(names, planes):
            out[f"{name}.{layer}"] = {"dtype": ST_DTYPE.get(dtype, str(dtype)),
                                      "shape": [1, len(entry["kv_heads"]), kept, *width]}
    return out


def checksum_name(format_version: int) -> str:
    """The manifest key (and algorithm) of each rank file's checksum in this format version."""
    return CHECKSUMS[format_version][0]


CHECKSUMS_BY_NAME = dict(CHECKSUMS.values())


def file_checksum(path: Path, name: str) -> str:
    """The file's checksum (`name`: a CHECKSUMS algorithm), read in BLOCK-sized pieces into one reused buffer."""
    digest, buffer = CHECKSUMS_BY_NAME[name](), bytearray(BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(view)
            if not n:
                break
            digest.update(view[:n])  # releases the GIL: another thread reads the tensors meanwhile
    return digest.hexdigest()
