"""What is asked of a layout (RunSpec: prompt and output lengths, numerics), apart from its
cost and memory, which both read it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..options import RUN_OPTIONS, chunk_tokens


@dataclass(frozen=True)
class RunSpec:
    """What is asked of the layout: prompt and output lengths and numerics."""

    context: int                      # prompt tokens
    new_tokens: int = 256
    chunk_size: Optional[int] = None  # None: DEFAULT_CHUNK_TOKENS_PER_RANK per SP rank
    dtype: str = "bfloat16"           # weights, activations and KV cache
    ffn_dtype: Optional[str] = None   # "fp8": FFN weights in FP8, FFN GEMMs at the FP8 rate
    ring_mode: str = RUN_OPTIONS["ring_mode"].default
    sequence_layout: str = RUN_OPTIONS["sequence_layout"].default
    pp_interleave: int = 1            # k model chunks per PP stage (interleaved schedule)
    kv_dtype: str = RUN_OPTIONS["kv_dtype"].default  # what the KV cache stores (attention.kv_formats)

    def chunk_for(self, sp: int) -> int:
        """The run's chunk on `sp` sequence-parallel ranks (toolkit.options.chunk_tokens)."""
        return chunk_tokens(sp, self.context, self.chunk_size)
