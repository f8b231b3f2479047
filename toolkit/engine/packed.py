"""A step with prefill in one forward: the decode rows' tokens and every prefill chunk lie side by
side in one sequence, so a step reads the weights once, not once more per chunk (a forward's
fixed cost is most of a decode step on a CPU: two chunks beside decoding requests made a step
three forwards). Sarathi-Serve's stall-free batching; vLLM packs a step the same way.

Attention stays each request's own: the step's state cuts the sequence back into the rows
(toolkit.engine.rows, their keys read as a decode step reads them) and each chunk, which its own
state attends as a prefill chunk alone (split across its SP ranks, its collectives in its
groups). Everything per token (norms, MLPs, experts, rotary embeddings by position) does not
care where a token lies in the sequence."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .hf import STATE_KWARG, rope_for_length
from .prefill import begin_local_chunk, share_chunk_logits, share_last_stage_logits
from .rows import RowsAttention, rows_step
from .sequence_parallel import SequenceParallelAttention


@dataclass
class Chunk:
    """One request's prefill chunk in a step: ids (every rank's alike) from global position start."""

    state: SequenceParallelAttention
    ids: list[int]
    start: int
    final: bool  # its prompt ends here: its last token's logits choose a token


class StepAttention:
    """The `lctk_state` of a packed forward: B rows of S decode tokens first, then each chunk's
    tokens on this rank."""

    def __init__(self, rows: RowsAttention | None, width: int, chunks: list[tuple[SequenceParallelAttention, int]]):
        self.rows, self.width, self.chunks = rows, width, chunks  # chunks: (state, tokens on this rank)
        self.decoded = len(rows.states) * width if rows is not None else 0

    def attend(self, layer: int, q, k, v, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """q [1, H, T, d], k/v [1, G, T, d] (T: the rows' B*S tokens, then the chunks') -> [1, T, H, d]."""
        parts, at = [], self.decoded
        if self.rows is not None:
            def as_rows(x):  # [1, heads, B*S, d] -> [B, heads, S, d]
                return x[0, :, :at].unflatten(1, (-1, self.width)).transpose(0, 1)

            out = self.rows.attend(layer, as_rows(q), as_rows(k), as_rows(v), scale, window, softcap)  # [B, S, H, d]
            parts.append(out.flatten(0, 1)[None])  # [1, B*S, H, d]
        for state, n in self.chunks:
            piece = slice(at, at + n)
            parts.append(state.attend(layer, q[:, :, piece], k[:, :, piece], v[:, :, piece], scale,
                                      window, softcap))  # [1, n, H, d]
            at += n
        return torch.cat(parts, dim=1)  # [1, T, H, d]

    def end_step(self) -> None:
        if self.rows is not None:
            self.rows.end_step()
        for state, _ in self.chunks:
            state.end_step()


def rope_groups(switch: int | None, decode: list, chunks: list) -> list[tuple[list, list]]:
    """The engine's decode rows (rid, tokens, position, room) and prefill chunks (rid, start, ids,
    prompt length, ...) by the rotary table they need: with LongRoPE, those on either side of the
    switch to the long factors run as two forwards (a forward has one table; a chunk's is its
    whole prompt's)."""
    switch = switch if switch is not None else float("inf")
    groups = [([r for r in decode if r[2] + 1 <= switch], [p for p in chunks if p[3] <= switch]),
              ([r for r in decode if r[2] + 1 > switch], [p for p in chunks if p[3] > switch])]
    return [g for g in groups if g[0] or g[1]]


@torch.no_grad()
def packed_step(model, rows: tuple[torch.Tensor, list[int], RowsAttention] | None, chunks: list[Chunk],
                rope_tokens: int, stage=None) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """One forward over decode rows (tokens [B, S], their first positions, their RowsAttention) and
    prefill chunks -> (the rows' logits [B, S, V] or None, each chunk's last-token logits [V] where it
    is final, else None), fp32, on every rank. rope_tokens: the length the rotary table is chosen
    for (every row and chunk of one forward needs the same table: rope_groups)."""
    if not chunks:  # decode rows alone: the rows' own forward, [B, S] as they are
        return rows_step(model, rows[0], rows[1], rows[2], stage, rope_tokens=rope_tokens), []
    device = (rows[2].topo if rows is not None else chunks[0].state.topo).device
    B, S = rows[0].shape if rows is not None else (0, 1)
    ids, positions, keep = [], [], []
    if rows is not None:
        tokens, first, attention = rows
        attention.begin_decode(first, S)
        ids.append(tokens.flatten())
        positions.append((torch.tensor(first, device=device).view(-1, 1) + torch.arange(S, device=device)).flatten())
        keep.append(torch.arange(B * S, device=device))
    placed, at = [], B * S
    for chunk in chunks:
        local_ids, local_positions, last = begin_local_chunk(chunk.state, torch.tensor(chunk.ids, device=device),
                                                             chunk.start)  # [S_loc] x2, [1]
        ids.append(local_ids)
        positions.append(local_positions)
        if chunk.final:  # kept where another rank holds the last token too: every rank's logits line up
            keep.append(last + at)
        placed.append((chunk.state, local_ids.shape[0]))
        at += local_ids.shape[0]
    state = StepAttention(rows[2] if rows is not None else None, S, placed)
    rope_for_length(model, rope_tokens)
    ids, positions = torch.cat(ids)[None], torch.cat(positions)[None]  # [1, T]
    keep = torch.cat(keep) if keep else torch.zeros(1, dtype=torch.long, device=device)  # [K]
    if stage is None:
        logits = model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep,
                       **{STATE_KWARG: state}).logits[0].float()  # [K, V]
    else:
        logits = stage.forward(ids, positions, None, state, logits_to_keep=keep)  # [1, K, V] on the last stage
        logits = None if logits is None else logits[0]
    state.end_step()
    vocab = model.config.vocab_size
    decoded = None
    if rows is not None:
        part = None if logits is None else logits[: B * S].view(B, S, vocab)
        decoded = part if stage is None else share_last_stage_logits(part, stage, 0, (B, S, vocab), device)
    finals, k = [], B * S
    for chunk in chunks:
        if chunk.final:
            finals.append(share_chunk_logits(None if logits is None else logits[k], chunk.state, stage, vocab))
            k += 1
        else:
            finals.append(None)
    return decoded, finals
