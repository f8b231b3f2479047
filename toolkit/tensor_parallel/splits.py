"""The declared contract between tensor_parallel/ (which cuts this rank's parameters) and
loading/ (which reads each parameter's share from the checkpoint): how a parameter was cut,
where DeepSpeed's AutoTP layers do not say it themselves. (They record their own split,
`_partition_sizes` and `tp_index`, `_subparam_shard_widths` for fused projections; the loader
reads those as they are.) Keys are module names in this rank's model, as `named_modules` gives
them after sharding. Made once by `autotp.apply_tensor_parallel`, passed to the loader with the
model; nothing is written on the model for it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .experts import ExpertShare
from .kv_heads import KVRepeats


@dataclass(frozen=True)
class Splits:
    """experts: fused experts module -> the intermediate rows this rank keeps (a module not
    named keeps all of them); kv_repeats: k_proj/v_proj -> how its grown heads map to the
    checkpoint's KV heads (a projection not named was not grown)."""

    experts: Mapping[str, ExpertShare] = field(default_factory=dict)
    kv_repeats: Mapping[str, KVRepeats] = field(default_factory=dict)


NONE = Splits()  # a model that tensor parallelism did not touch (tp == 1)
