"""Many questions decoded as one batch over one document's sharded cache.

Each question is prefilled after the document on its own (the usual path, any layout); what
it added to the cache is copied into a small per-question suffix and the document's cache is
rolled back. Every decode step then runs the B questions as rows of one forward: the weights
are read once for all rows, the document's K/V once per KV head for all rows (the rows fold
into the query dimension of one kernel call), and each row's suffix is masked to its own
length. Row b's new token goes to the ring shard that is shortest for row b, the rule
single-question decode uses, so each row sees the keys a separate `ask` would see and the
answers are the same tokens.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..attention.kernels import decode_attention, merge_many, merge_partials
from ..attention.kv_quant import StoredKV, attend_stored, round_trip
from .decode import Sampling, choose_token
from .hf import STATE_KWARG, rope_for_length
from .prefill import share_last_stage_logits
from .sequence_parallel import Masking, SequenceParallelAttention

Suffix = dict[int, StoredKV]  # layer -> what a question left on this rank, as the cache stored it


class BatchDecodeAttention:
    """The `lctk_state` of a batched decode step: the document's cache (shared) + one suffix per row."""

    def __init__(self, base: SequenceParallelAttention, suffixes: list[Suffix], suffix_shards: list[list[int]],
                 suffix_positions: list[torch.Tensor], room: int, dtype: torch.dtype):
        """base: the document's state (cache rolled back to the document); suffixes[b]: what row b's
        question left on this rank; suffix_shards[b][r]: its tokens on ring rank r; suffix_positions[b]:
        the positions of row b's keys on this rank (host); room: new tokens per row; dtype: the
        model's (a quantised cache's suffix is held dequantised, its new keys rounded as it would)."""
        self.base, self.topo, self.comm = base, base.topo, base.comm
        doc = base.cache.shard_lengths
        self.totals = [[doc[r] + s[r] for r in range(base.ring)] for s in suffix_shards]  # [row][ring rank]
        self.lengths = [s[base.r_rank] for s in suffix_shards]  # suffix keys of each row on this rank
        self.positions = [list(p.tolist()) for p in suffix_positions]  # ... and their positions
        self.step_positions: list[int] = []
        cap = max(self.lengths) + room
        self.kind = base.cache.kind
        self.k, self.v = {}, {}
        for layer in suffixes[0]:  # every layer of this stage
            rows = [suffix[layer].dequantized(dtype) for suffix in suffixes]  # (k, v) [1, g, n_b, d] each
            k0 = rows[0][0]
            shape = (len(suffixes), k0.shape[1], cap, k0.shape[3])  # [B, g, cap, d]
            self.k[layer], self.v[layer] = k0.new_zeros(shape), k0.new_zeros(shape)
            for b, (k, v) in enumerate(rows):
                self.k[layer][b, :, : k.shape[2]] = k[0]
                self.v[layer][b, :, : v.shape[2]] = v[0]
        self.owners: list[int] = []
        self._own = self._own_at = self._visible = None
        self._widest = 0

    @property
    def rows(self) -> int:
        return len(self.totals)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (the others finished): later steps compute the rest alone."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.topo.device)
        for layer in self.k:
            self.k[layer] = self.k[layer].index_select(0, idx)
            self.v[layer] = self.v[layer].index_select(0, idx)
        self.totals = [self.totals[b] for b in rows]
        self.lengths = [self.lengths[b] for b in rows]
        self.positions = [self.positions[b] for b in rows]

    def begin_decode(self, positions: list[int]) -> None:
        """Each row's owner; the index tensors are built once per step, not per layer."""
        self.step_positions = positions
        r_rank, device = self.base.r_rank, self.topo.device
        self.owners = [t.index(min(t)) for t in self.totals]
        mine = [b for b, o in enumerate(self.owners) if o == r_rank]
        self._own = torch.tensor(mine, dtype=torch.long, device=device) if mine else None
        self._own_at = torch.tensor([self.lengths[b] for b in mine], dtype=torch.long, device=device)
        visible = [n + (o == r_rank) for n, o in zip(self.lengths, self.owners)]
        self._visible_list = visible
        self._visible = torch.tensor(visible, dtype=torch.long, device=device)  # [B]
        self._widest = max(visible)

    def end_step(self) -> None:
        for b, owner in enumerate(self.owners):
            self.totals[b][owner] += 1
            if owner == self.base.r_rank:
                self.lengths[b] += 1
                self.positions[b].append(self.step_positions[b])

    def attend(self, layer: int, q, k, v, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """q [B, H, 1, d], k/v [B, G, 1, d] -> out [B, 1, H, d]."""
        base = self.base
        q_l, k_l, v_l = base.decode_heads(q, k, v)  # [B, H/U, 1, d], [B, G'/U, 1, d] x2
        suffix_k, suffix_v = self.k[layer], self.v[layer]
        if self._own is not None:  # rows this rank owns: [n, g, d] into (row, :, its next slot), as stored
            suffix_k[self._own, :, self._own_at] = round_trip(k_l[self._own, :, 0:1], self.kind)[:, :, 0]
            suffix_v[self._own, :, self._own_at] = round_trip(v_l[self._own, :, 0:1], self.kind)[:, :, 0]
        doc = base.cache.layer(layer).stored(k_l)  # [1, g, L_doc, .]: read once for all rows
        masking = Masking(window if window is not None and window <= max(self.step_positions) else None, softcap)
        if masking.active:
            doc_pos = base.cache.live_positions(layer, base.r_rank)
            out, lse = self._by_positions(masking, q_l, doc, doc_pos, suffix_k, suffix_v, scale)
        else:
            out, lse = self._shared(q_l, doc, suffix_k, suffix_v, scale)
        return base.finish_decode(out, lse, q.dtype, layer).transpose(1, 2)  # [B, 1, H, d]

    def _by_positions(self, masking, q_l, doc, doc_pos, suffix_k, suffix_v, scale):
        """Sliding windows and soft-capping: each row against the document's keys it can see and
        its own suffix, by position (a window reads a few keys per row; no row shares a mask)."""
        outs, lses = [], []
        for b, p in enumerate(self.step_positions):
            q_pos, n = torch.tensor([p]), int(self._visible_list[b])
            suffix_pos = torch.tensor(self.positions[b] + ([p] if len(self.positions[b]) < n else []))
            parts = [masking.attend_stored(q_l[b : b + 1], doc, q_pos, doc_pos, scale),
                     masking.attend(q_l[b : b + 1], suffix_k[b : b + 1, :, :n], suffix_v[b : b + 1, :, :n], q_pos,
                                    suffix_pos, scale)]
            out, lse = merge_many(parts)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    def _shared(self, q_l, doc, suffix_k, suffix_v, scale):
        out, lse = attend_stored(q_l, doc, lambda q, k, v, _a: decode_attention(q, k, v, scale))  # [B, h, 1, .]
        if self._widest:
            o_s, l_s = decode_attention(q_l, suffix_k[:, :, : self._widest], suffix_v[:, :, : self._widest],
                                        scale, key_lengths=self._visible)
            out, lse = merge_partials(out, lse, o_s, l_s)
        return out, lse


@torch.no_grad()
def batch_decode_step(model, tokens: torch.Tensor, positions: list[int], state: BatchDecodeAttention,
                      stage=None) -> torch.Tensor:
    """tokens [B] and their positions (the same on every rank) -> logits [B, V] fp32."""
    state.begin_decode(positions)
    rope_for_length(model, max(positions) + 1)  # rows on both sides of a LongRoPE switch never share a batch
    ids = tokens.view(-1, 1)                                                 # [B, 1]
    pos = torch.tensor(positions, device=tokens.device).view(-1, 1)          # [B, 1]
    if stage is None:
        out = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1, **{STATE_KWARG: state})
        state.end_step()
        return out.logits[:, -1].float()
    logits = stage.forward(ids, pos, None, state, logits_to_keep=1)
    state.end_step()
    return share_last_stage_logits(logits, stage, 0, (ids.shape[0], model.config.vocab_size), state.topo.device)


def generate_batch(model, prompts: list[list[int]], first_logits: torch.Tensor, state: BatchDecodeAttention,
                   max_new_tokens: int, sampling: Sampling, eos_token_ids: set[int],
                   on_token: Callable[[int, int], None] | None = None, stage=None) -> list[list[int]]:
    """The decode loop of `generate_tokens` for B rows at once -> the new tokens of each row.

    first_logits [B, V]. Each row has its processors' view of its own ids and its own generator
    seeded like a single `ask`, so row b's tokens are the ones `ask(question_b)` would choose.
    Rows that end (EOS or their last token) leave the batch; the chosen tokens travel from rank 0.
    on_token(row, token) is called for every token."""
    processors = sampling.processors()
    topo, device = state.topo, first_logits.device
    generators = [torch.Generator(device="cpu").manual_seed(sampling.seed) for _ in prompts]
    ids = [torch.tensor([p], device=device) for p in prompts]  # [1, L_b] per row
    new_tokens: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the row of the batch -> its question
    logits = first_logits  # [B_active, V]
    for step in range(max_new_tokens):
        chosen = torch.cat([choose_token(processors(ids[b], logits[i][None]), sampling, generators[b])
                            for i, b in enumerate(active)])
        picked = topo.comm.broadcast(chosen, 0, topo.world_group(), tag="token")  # [B_active]
        still = []
        for i, (b, tok) in enumerate(zip(active, picked.tolist())):
            new_tokens[b].append(tok)
            if on_token is not None:
                on_token(b, tok)
            ids[b] = torch.cat([ids[b], picked[i].view(1, 1)], dim=1)
            if tok not in eos_token_ids and step < max_new_tokens - 1:
                still.append(i)
        if not still:
            break
        if len(still) < len(active):
            state.keep(still)
            picked, active = picked[still], [active[i] for i in still]
        logits = batch_decode_step(model, picked, [ids[b].shape[1] - 1 for b in active], state, stage)
    return new_tokens
