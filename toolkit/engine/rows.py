"""One decode forward for many requests, each with its own cache: the `lctk_state` of a batched
step. The weights are read once for all rows; each row attends its own keys as its own decode
step would; rows that read one shared prefix (questions after one document) read its keys once
for all of them (the rows fold into the query dimension of one kernel call) and merge that
partial with their own by log-sum-exp; the step's communication (ring merge, Ulysses gather)
is done once for all rows."""
from __future__ import annotations

import torch

from ..attention.kernels import (attention_flops, count_work, decode_attention, fold_query_rows, folded_decode,
                                 merge_partials, unfold_query_rows)
from ..attention.kv_quant import attend_stored
from .hf import STATE_KWARG, rope_for_length
from .prefill import share_last_stage_logits
from .sequence_parallel import SequenceParallelAttention


class RowsAttention:
    def __init__(self, states: list[SequenceParallelAttention]):
        if not states:
            raise ValueError("a batched decode step needs at least one row")
        self.states = states
        self.base = states[0]  # topology, groups and head split: the same for every row of a block
        self.topo, self.comm = self.base.topo, self.base.comm
        self.blocks = None  # rows on more than one block of ranks: (row indices, their RowsAttention) per block
        by_block: dict[tuple, list[int]] = {}
        for b, state in enumerate(states):
            by_block.setdefault(state.topo.block, []).append(b)
        if len(by_block) > 1:
            self.blocks = [(rows, RowsAttention([states[b] for b in rows])) for _, rows in sorted(by_block.items())]

    def begin_decode(self, positions: list[int], count: int = 1) -> None:
        for state, position in zip(self.states, positions):
            state.begin_decode(position, count)

    def drop_newest(self, counts: list[int]) -> None:
        for state, count in zip(self.states, counts):
            state.drop_newest(count)

    def end_step(self) -> None:
        for state in self.states:
            state.end_step()

    def attend(self, layer: int, q, k, v, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """q [B, H, S, d], k/v [B, G, S, d] (row b: request b's token and guesses) -> out [B, S, H, d].
        Rows placed on different blocks of ranks (elastic) attend over their own block's groups, the
        blocks in one order on every rank (fewest ranks first), so no two ranks wait on each other
        in a different order."""
        if self.blocks is None:
            return self._attend(layer, q, k, v, scale, window, softcap)
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # [B, S, H, d]
        for rows, part in self.blocks:
            idx = torch.tensor(rows, device=q.device)
            out[idx] = part._attend(layer, q[idx], k[idx], v[idx], scale, window, softcap)
        return out

    def _attend(self, layer, q, k, v, scale, window, softcap) -> torch.Tensor:
        q_l, k_l, v_l = self.base.decode_heads(q, k, v)  # [B, H/U, S, d], [B, G'/U, S, d] x2
        positional = window is not None or softcap is not None
        shared = {} if positional else self._sharing(layer)
        plain = {} if positional or q_l.shape[2] != 1 else self._plain(layer, q_l, k_l, v_l, scale)
        parts = [plain[b] if b in plain else state.decode_partial(
            layer, q_l[b : b + 1], k_l[b : b + 1], v_l[b : b + 1], scale, window, softcap, own_only=b in shared)
            for b, state in enumerate(self.states)]
        out = torch.cat([o for o, _ in parts])   # [B, H/U, S, d]
        lse = torch.cat([s for _, s in parts])   # [B, H/U, S]
        for keys, rows in self._groups(shared):  # a shared prefix read once for all its rows, then merged
            idx = torch.tensor(rows, device=q_l.device)
            o_p, l_p = attend_stored(q_l[idx], keys, lambda q_, k_, v_, _a: decode_attention(q_, k_, v_, scale))
            out[idx], lse[idx] = merge_partials(o_p, l_p, out[idx], lse[idx])  # the prefix's keys come first
        return self.base.finish_decode(out, lse, q.dtype, layer).transpose(1, 2)  # [B, S, H, d]

    def _plain(self, layer: int, q_l, k_l, v_l, scale: float) -> dict[int, tuple]:
        """Rows of one token whose keys are plain (SequenceParallelAttention.plain_decode_keys) ->
        {row: (out [1, H/U, 1, d], lse)}, by the kernel alone: the queries folded once for all rows
        and their work counted once (the call chain around a row's kernel cost as much as it)."""
        H, d = q_l.shape[1], q_l.shape[3]
        qg = fold_query_rows(q_l, k_l.shape[1], False)  # [B, G', H/(U G'), d]
        found, flops = {}, 0.0
        for b, state in enumerate(self.states):
            keys = state.plain_decode_keys(layer, k_l[b : b + 1], v_l[b : b + 1])  # [1, G', L, d] x2
            if keys is not None:
                out, lse = folded_decode(qg[b : b + 1], *keys, scale)
                found[b] = (unfold_query_rows(out, 1, H, False).to(q_l.dtype).float(),  # as attend_stored gives it
                            unfold_query_rows(lse, 1, H, False).float())
                flops += attention_flops(1, keys[0].shape[2], H, d, causal=False)
        count_work(flops)
        return found

    def _sharing(self, layer: int) -> dict:
        """Rows whose cache reads a shared prefix holding this layer -> that prefix's keys."""
        found = {}
        for b, state in enumerate(self.states):
            prefix = getattr(state.cache, "prefix", None)
            if prefix is not None and layer in prefix.layers:
                found[b] = prefix.layers[layer]
        return found

    @staticmethod
    def _groups(shared: dict):
        groups: dict[int, tuple] = {}
        for b, keys in shared.items():
            groups.setdefault(id(keys), (keys, []))[1].append(b)
        return groups.values()


@torch.no_grad()
def rows_step(model, tokens: torch.Tensor, positions: list[int], rows: RowsAttention, stage=None,
              rope_tokens: int | None = None) -> torch.Tensor:
    """tokens [B, S] (row b: S tokens from positions[b] on; the same on every rank) -> logits
    [B, S, V] fp32. rope_tokens: the length the rotary table is chosen for (default: the last
    position's); the engine runs rows on either side of a LongRoPE switch apart."""
    B, S = tokens.shape
    rows.begin_decode(positions, S)
    rope_for_length(model, rope_tokens or max(positions) + S)
    pos = torch.tensor(positions, device=tokens.device).view(-1, 1) + torch.arange(S, device=tokens.device)  # [B, S]
    if stage is None:
        out = model(input_ids=tokens, position_ids=pos, use_cache=False, logits_to_keep=S, **{STATE_KWARG: rows})
        rows.end_step()
        return out.logits.float()
    logits = stage.forward(tokens, pos, None, rows, logits_to_keep=S)
    rows.end_step()
    return share_last_stage_logits(logits, stage, 0, (B, S, model.config.vocab_size), rows.topo.device)
