"""Per-device rates of an accelerator (or CPU rank), read from configs/hardware/."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from .paths import named_configs

# Bytes per element of each dtype the toolkit runs in.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


class HardwareError(ValueError):
    """An unknown hardware name or a malformed hardware file."""


@dataclass(frozen=True)
class Hardware:
    """One device's peak rates, its links and one calibrated compute efficiency.

    ``efficiency`` is the fraction of the peak matmul rate that a dense prefill
    achieves; it is calibrated per entry, never per workload.
    """

    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float
    hbm_gbps: float
    intra_node_gbps: float
    inter_node_gbps: float
    gpus_per_node: int
    efficiency: float
    fp8_tflops: Optional[float] = None
    # fraction of hbm_gbps a decode step reads its weights and cache at (kernels, launches,
    # Python between them); 1.0, the bandwidth floor, unless measured (lctk bench decode)
    decode_efficiency: float = 1.0
    intra_node_latency_us: float = 10.0
    inter_node_latency_us: float = 20.0
    default_dtype: str = "bfloat16"
    description: str = ""

    def __post_init__(self) -> None:
        for key in ("memory_gib", "bf16_tflops", "fp32_tflops", "hbm_gbps",
                    "intra_node_gbps", "inter_node_gbps", "efficiency"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value <= 0:
                raise HardwareError(f"hardware {self.name!r}: {key} must be > 0, got {value!r}")
        for key in ("efficiency", "decode_efficiency"):
            if not 0 < getattr(self, key) <= 1:
                raise HardwareError(f"hardware {self.name!r}: {key} must be in (0, 1]")
        if self.default_dtype not in DTYPE_BYTES:
            raise HardwareError(f"hardware {self.name!r}: default_dtype must be one of "
                                f"{', '.join(DTYPE_BYTES)}")

    def matmul_flops(self, dtype: str) -> float:
        """Peak FLOP/s for matmuls in ``dtype`` (float16 runs at the bf16 rate)."""
        if dtype == "float32":
            return self.fp32_tflops * 1e12
        if dtype == "fp8":
            if self.fp8_tflops is None:
                raise HardwareError(f"{self.name} has no FP8 matmul rate; drop ffn_dtype=fp8")
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12

    def link(self, crosses_nodes: bool) -> tuple[float, float]:
        """(bytes/s, seconds of latency) of one rank's link, inside or across nodes."""
        if crosses_nodes:
            return self.inter_node_gbps * 1e9, self.inter_node_latency_us * 1e-6
        return self.intra_node_gbps * 1e9, self.intra_node_latency_us * 1e-6


_FIELDS = set(Hardware.__dataclass_fields__) - {"name"}


def hardware_from_dict(data: Mapping[str, Any], name: str) -> Hardware:
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise HardwareError(f"hardware {name!r}: unknown keys {', '.join(unknown)}; "
                            f"known keys: {', '.join(sorted(_FIELDS))}")
    try:
        return Hardware(name=name, **data)
    except TypeError as err:  # a required key is missing
        raise HardwareError(f"hardware {name!r}: {err}") from None


STEP_TOKENS_ROUND, STEP_TOKENS_MIN, STEP_TOKENS_MAX = 128, 128, 8192


def step_token_budget(hw: Hardware, dtype: str, itl_factor: float = 4.0) -> int:
    """Tokens one engine step takes while requests are decoding (--max-batch-tokens' default). A
    decode step's time is reading every weight once; `knee` tokens of matmuls take as long (bytes
    per weight x the device's prefill rate / 2 FLOPs per weight and token / the rate weights are
    read at). A step of itl_factor x knee tokens keeps the time between two tokens of a decoding
    request within about itl_factor of its idle decode step while a long prompt prefills beside
    it (the stall-free target), and is as large as that allows, so the prompt goes fast. Rounded
    up to a multiple of 128 tokens, between 128 and 8192. The same for every model size: weights
    read and matmul work grow together."""
    read = hw.hbm_gbps * 1e9 * hw.decode_efficiency  # bytes/s a decode step reads weights at
    knee = DTYPE_BYTES[dtype] * hw.matmul_flops(dtype) * hw.efficiency / (2 * read)
    rounded = STEP_TOKENS_ROUND * math.ceil(itl_factor * knee / STEP_TOKENS_ROUND)
    return int(min(STEP_TOKENS_MAX, max(STEP_TOKENS_MIN, rounded)))


def list_hardware() -> list[str]:
    """Names of the hardware entries in configs/hardware/."""
    return list(named_configs("hardware"))


def load_hardware(hardware: Union[str, Path, Hardware]) -> Hardware:
    """Load a configs/hardware entry by name or from a YAML path."""
    if isinstance(hardware, Hardware):
        return hardware
    known = named_configs("hardware")
    text = str(hardware)
    path = known.get(text) or Path(text).expanduser()
    if not path.is_file():
        raise HardwareError(f"unknown hardware {text!r}; known: {', '.join(known)}")
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise HardwareError(f"{path}: expected a mapping of hardware fields")
    return hardware_from_dict(data, name=path.stem)
