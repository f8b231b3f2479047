"""Architecture numbers of a decoder-only transformer, as the planner needs them.

They come from a named YAML in configs/models/, from a local model folder's
config.json, or from a dict (e.g. a Hugging Face ``config.to_dict()``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

from ..options import positive_int_problem
from .paths import named_configs


class ModelDimsError(ValueError):
    """A model name, folder or config that cannot be turned into ModelDims."""


@dataclass(frozen=True)
class ModelDims:
    """Shapes of a Llama-style model (GQA attention, gated MLP, RMSNorm)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # mixture of experts (Mixtral, Qwen3-MoE): every MoE layer holds num_experts experts of
    # moe_intermediate_size (0: intermediate_size) and runs experts_per_token of them per token
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    dense_layers: int = 0              # layers with a dense MLP among the MoE ones
    # sliding-window attention (Gemma 2/3, Mistral v0.1): sliding_layers layers see the last
    # sliding_window positions; the others all of them
    sliding_window: int = 0
    sliding_layers: int = 0
    norms_per_layer: int = 2           # RMSNorms of hidden size per layer (Gemma: 4)
    qk_norm: bool = False              # per-head q and k norms (Qwen3, Gemma 3)

    def __post_init__(self) -> None:
        for field_name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                           "head_dim", "intermediate_size", "vocab_size",
                           "max_position_embeddings"):
            problem = positive_int_problem(field_name, getattr(self, field_name))
            if problem:
                raise ModelDimsError(f"model {self.name!r}: {problem}")
        if self.num_heads % self.num_kv_heads:
            raise ModelDimsError(
                f"model {self.name!r}: {self.num_heads} query heads are not a multiple of "
                f"{self.num_kv_heads} KV heads")

    # Parameter counts: attention projections, gated MLP, two RMSNorms per layer.
    @property
    def attention_params_per_layer(self) -> int:
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        weights = self.hidden_size * (q_out + 2 * kv_out) + q_out * self.hidden_size
        bias = (q_out + 2 * kv_out) if self.attention_bias else 0
        return weights + bias

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.dense_layers if self.num_experts else 0

    @property
    def expert_params(self) -> int:
        """One expert's gate, up and down projections."""
        return 3 * self.hidden_size * (self.moe_intermediate_size or self.intermediate_size)

    def _mlp_params(self, experts: int) -> float:
        """MLP parameters per layer (averaged over the layers) with `experts` experts counted."""
        dense = 3 * self.hidden_size * self.intermediate_size  # gate, up, down
        if not self.num_experts:
            return dense
        moe = experts * self.expert_params + self.hidden_size * self.num_experts  # experts + router
        return (self.moe_layers * moe + self.dense_layers * dense) / self.num_layers

    @property
    def mlp_params_per_layer(self) -> float:
        """Every expert: what the weights take in memory."""
        return self._mlp_params(self.num_experts)

    @property
    def active_mlp_params_per_layer(self) -> float:
        """The experts one token runs through: what a token's FLOPs and a decode step's reads count."""
        return self._mlp_params(self.experts_per_token)

    @property
    def global_layers(self) -> int:
        return self.num_layers - self.sliding_layers

    def attended_positions(self, n: float, slack: float = 0) -> float:
        """Key positions one layer, on average, holds or reads at context n: a window layer at most
        its window (plus `slack`: the chunk being prefilled, which it holds beside the window)."""
        if not self.sliding_layers:
            return n
        local = min(n, self.sliding_window + slack)
        return (self.global_layers * n + self.sliding_layers * local) / self.num_layers

    @property
    def norm_params_per_layer(self) -> int:
        return self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def layer_params(self) -> float:
        return (self.attention_params_per_layer + self.mlp_params_per_layer
                + self.norm_params_per_layer)

    @property
    def active_layer_params(self) -> float:
        return (self.attention_params_per_layer + self.active_mlp_params_per_layer
                + self.norm_params_per_layer)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Zero when the output projection shares the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """Total parameter count (final norm included)."""
        return round(self.num_layers * self.layer_params + self.embedding_params
                     + self.lm_head_params + self.hidden_size)

    @property
    def active_params(self) -> int:
        """Parameters one token runs through (MoE: its experts only)."""
        return round(self.num_layers * self.active_layer_params + self.embedding_params
                     + self.lm_head_params + self.hidden_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "num_layers": self.num_layers,
            "hidden_size": self.hidden_size, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias, "params": self.params,
            "num_experts": self.num_experts, "experts_per_token": self.experts_per_token,
            "moe_intermediate_size": self.moe_intermediate_size, "dense_layers": self.dense_layers,
            "active_params": self.active_params,
            "sliding_window": self.sliding_window, "sliding_layers": self.sliding_layers,
            "norms_per_layer": self.norms_per_layer, "qk_norm": self.qk_norm,
        }


# Our YAML uses the Hugging Face key names so a file is a trimmed config.json;
# the dataclass names are accepted as well.
_ALIASES = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "hidden_size": ("hidden_size", "n_embd"),
    "num_heads": ("num_attention_heads", "num_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size",),
    "vocab_size": ("vocab_size",),
    "max_position_embeddings": ("max_position_embeddings",),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "attention_bias": ("attention_bias",),
    "num_experts": ("num_local_experts", "num_experts"),
    "experts_per_token": ("num_experts_per_tok", "experts_per_token"),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "sliding_window": ("sliding_window",),
}


def _first(config: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def model_dims_from_dict(config: Mapping[str, Any], name: str | None = None) -> ModelDims:
    """Build ModelDims from HF config keys (missing KV heads = heads, head_dim = hidden/heads)."""
    if "text_config" in config and _first(config, _ALIASES["num_layers"]) is None:
        config = config["text_config"]  # multimodal wrappers keep the LM config inside
    name = name or config.get("name") or config.get("_name_or_path") or "model"
    values: dict[str, Any] = {k: _first(config, keys) for k, keys in _ALIASES.items()}
    required = ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size")
    missing = [_ALIASES[k][0] for k in required if values[k] is None]
    if missing:
        raise ModelDimsError(f"model {name!r}: config lacks {', '.join(missing)}")
    if values["num_kv_heads"] is None:
        values["num_kv_heads"] = values["num_heads"]
    if values["head_dim"] is None:
        values["head_dim"] = values["hidden_size"] // values["num_heads"]
    if values["max_position_embeddings"] is None:
        values["max_position_embeddings"] = 2048
    if "attention_bias" not in config and "qwen2" in str(config.get("model_type", "")):
        values["attention_bias"] = True  # Qwen2 has q/k/v biases without the flag
    values["tie_word_embeddings"] = bool(values["tie_word_embeddings"] or False)
    values["attention_bias"] = bool(values["attention_bias"] or False)
    for key in ("num_experts", "experts_per_token", "moe_intermediate_size"):
        values[key] = int(values[key] or 0)
    values["dense_layers"] = _dense_layers(config, values["num_layers"]) if values["num_experts"] else 0
    values["sliding_window"], values["sliding_layers"] = _windowed(config, values)
    family = str(config.get("model_type", ""))
    values["norms_per_layer"] = int(config.get("norms_per_layer") or (4 if family.startswith("gemma") else 2))
    values["qk_norm"] = bool(config.get("qk_norm", family in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text")))
    return ModelDims(name=str(name), **values)


def _dense_layers(config: Mapping[str, Any], layers: int) -> int:
    """Layers with a dense MLP in a MoE model, as transformers' Qwen-MoE builds them: those in
    mlp_only_layers, and with decoder_sparse_step k all but every k-th (Mixtral: none)."""
    only, step = set(config.get("mlp_only_layers") or ()), int(config.get("decoder_sparse_step") or 1)
    return sum(1 for i in range(layers) if i in only or (i + 1) % step)


def _windowed(config: Mapping[str, Any], values: dict) -> tuple[int, int]:
    """(window, layers that use it), as transformers applies it: from layer_types (Gemma 2/3), a
    Gemma-style pattern (sliding_window_pattern: every Nth layer global), Qwen's layers from
    max_window_layers on when use_sliding_window is set (none when it is not), or else the
    window on every layer (Mistral, Phi-3); a window as long as the context is none."""
    window, layers = int(values.pop("sliding_window") or 0), values["num_layers"]
    if not window or window >= values["max_position_embeddings"] or config.get("use_sliding_window") is False:
        return 0, 0
    types = config.get("layer_types")
    if types:
        return window, sum(t == "sliding_attention" for t in types)
    pattern = config.get("sliding_window_pattern")
    if pattern:
        return window, layers - layers // int(pattern)
    if config.get("sliding_layers"):
        return window, int(config["sliding_layers"])
    if config.get("use_sliding_window") and config.get("max_window_layers") is not None:
        return window, max(0, layers - int(config["max_window_layers"]))
    return window, layers


def list_models() -> list[str]:
    """Names of the models described in configs/models/."""
    return list(named_configs("models"))


def load_model_dims(model: Union[str, Path, Mapping[str, Any], ModelDims]) -> ModelDims:
    """Read dims from a configs/models name, a folder or config.json path, or a dict."""
    if isinstance(model, ModelDims):
        return model
    if isinstance(model, Mapping):
        return model_dims_from_dict(model)
    known = named_configs("models")
    text = str(model)
    if text in known:
        with open(known[text], encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        return model_dims_from_dict(data, name=text)
    path = Path(text).expanduser()
    config_path = path / "config.json" if path.is_dir() else path
    if config_path.is_file() and config_path.suffix == ".json":
        with open(config_path, encoding="utf-8") as handle:
            data = json.load(handle)
        return model_dims_from_dict(data, name=path.name if path.is_dir() else path.stem)
    if config_path.is_file() and config_path.suffix in (".yaml", ".yml"):
        with open(config_path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        return model_dims_from_dict(data, name=config_path.stem)
    raise ModelDimsError(
        f"unknown model {text!r}: not a name in configs/models ({', '.join(known)}) "
        "and not a folder with a config.json")
