"""How big an engine is and how it paces a step: one frozen record, checked when made."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import check_positive_int

DEFAULT_BLOCK_TOKENS = 256


@dataclass(frozen=True)
class EngineSettings:
    """max_batch_tokens: tokens of one step while requests are decoding (their one each plus
    prefill chunks); max_running: requests in the batch at once; kv_blocks: the pool's blocks
    of block_tokens positions; max_itl_ms: a goal for the time between two tokens of a running
    request, kept by giving prefill a smaller share of a step (None: no goal); prefill_chunk:
    the most prompt tokens a step takes while nothing decodes (None: the run's chunk, so a prompt
    alone goes as fast as by itself; a server sets max_batch_tokens, so that a request arriving
    while a long prompt prefills waits one short step, not the whole chunk); elastic: each request
    spans the SP ranks its size needs (toolkit.planner.elastic), not all of them; min_sp_tokens:
    instead of the planner's choice, prompts shorter than this run on one SP rank, others on all."""

    max_batch_tokens: int = 512
    max_running: int = 32
    kv_blocks: int | None = None  # None: sized from the memory free once the weights are in
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    max_itl_ms: float | None = None
    prefill_chunk: int | None = None
    elastic: bool = False
    min_sp_tokens: int | None = None

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_running", "block_tokens"):
            check_positive_int(name, getattr(self, name), ValueError)
        for name in ("kv_blocks", "prefill_chunk", "min_sp_tokens"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name), ValueError)
        if self.max_itl_ms is not None and not self.max_itl_ms > 0:
            raise ValueError(f"max_itl_ms must be a positive number of milliseconds, got {self.max_itl_ms!r}")
