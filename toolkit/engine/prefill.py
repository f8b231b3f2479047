"""Chunked prefill: the prompt goes through in chunks, each split across the SP ranks.

Each chunk attends the cache plus itself, then joins the cache; only one position's logits
are ever computed per chunk, so activations are bounded by the chunk, not the prompt.
"""
from __future__ import annotations

from typing import Callable

import torch

from .hf import STATE_KWARG, rope_for_length
from ..attention.layout import chunk_spans
from .sequence_parallel import SequenceParallelAttention


def last_token_owner(state: SequenceParallelAttention) -> int:
    """SP-group rank (ring * U + ulysses) holding the last real token of the chunk begun last."""
    layout, length = state.layout, state.chunk.length
    for r in range(layout.ring):
        for u in range(layout.ulysses):
            if bool((layout.local_indices(length, r, u) == length - 1).any()):
                return r * layout.ulysses + u
    raise AssertionError("the last token must belong to some rank")


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, state: SequenceParallelAttention, chunk_size: int,
            on_chunk: Callable[[int, int], None] | None = None, stage=None, offset: int = 0,
            rope_tokens: int | None = None) -> torch.Tensor:
    """input_ids [1, N] (the whole prompt, same on every rank) -> last-position logits [V], fp32, on every rank.
    offset: the global position of input_ids[0, 0] when the cache already holds that many (a question
    after a document); rope_tokens: the length of the whole prompt when input_ids is one piece of it
    (the engine's chunks: LongRoPE picks its factors by the whole prompt's length)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"prefill takes one sequence, input_ids of shape [1, N]; got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    if n == 0:
        raise ValueError("the prompt is empty: give at least one token")
    device = state.topo.device
    ids = input_ids[0].to(device)
    spans = chunk_spans(n, chunk_size)
    rope_for_length(model, rope_tokens or offset + n)  # the whole prompt's, for every chunk and every rank
    logits = None
    for i, (start, end) in enumerate(spans):
        local_ids, positions, keep = begin_local_chunk(state, ids[start:end], offset + start)
        if stage is None:
            out = model(input_ids=local_ids[None], position_ids=positions[None], use_cache=False,
                        logits_to_keep=keep, **{STATE_KWARG: state})
            chunk_logits = out.logits[0, -1].float()
        else:  # this stage's layers; activations arrive from / leave for the neighbours
            chunk_logits = stage.forward(local_ids, positions, keep, state)
        state.end_step()
        if i == len(spans) - 1:
            logits = chunk_logits
        if on_chunk is not None:
            on_chunk(i + 1, len(spans))
    return share_chunk_logits(logits, state, stage, model.config.vocab_size)


def share_chunk_logits(logits, state: SequenceParallelAttention, stage, vocab: int) -> torch.Tensor:
    """The last-token logits [V] of the chunk begun last (held by one SP rank; under pipeline stages
    by that rank's last stage, None elsewhere) -> on every rank."""
    owner = last_token_owner(state)
    if stage is None:
        return state.comm.broadcast(logits.contiguous(), owner, state.topo.group("sp"), tag="logits")
    return share_last_stage_logits(logits, stage, owner, vocab, state.topo.device)


def begin_local_chunk(state: SequenceParallelAttention, chunk_ids: torch.Tensor, start: int):
    """Begin a chunk: chunk_ids [n] (every rank's alike) at global positions start.. -> this rank's
    share of it: ids [S_loc] (padding: 0), their positions [S_loc], and keep [1]: the index of the
    chunk's last token here, or 0 where another rank holds it."""
    length, device = chunk_ids.shape[0], chunk_ids.device
    idx = state.begin_chunk(start, length).local_index.to(device)  # [S_loc] chunk-relative, >= length: padding
    local_ids = torch.where(idx < length, chunk_ids[idx.clamp(max=length - 1)], torch.zeros_like(idx))
    mine = (idx == length - 1).nonzero().flatten()
    keep = mine[:1] if mine.numel() else torch.zeros(1, dtype=torch.long, device=device)
    return local_ids, start + idx, keep


def share_last_stage_logits(logits, stage, sp_owner: int, shape, device) -> torch.Tensor:
    """Pipeline: only the last stage has logits (of `shape`: [V], or [B, V] for rows); every rank gets them."""
    stage.finish()
    buf = logits.contiguous() if logits is not None else torch.zeros(shape, device=device)
    topo = stage.topo
    return topo.comm.broadcast(buf, stage.last_stage_rank(sp_owner), topo.world_group(), tag="logits")
