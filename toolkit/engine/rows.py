"""One decode forward for many requests, each with its own cache: the `lctk_state` of a batched
step. The weights are read once for all rows; each row attends its own cache exactly as its
own decode step would (the same kernels on the same keys, so a row's logits do not depend on
what else shares the step), and the communication of the step (ring merge, Ulysses gather)
is done once for all rows."""
from __future__ import annotations

import torch

from .sequence_parallel import SequenceParallelAttention


class RowsAttention:
    def __init__(self, states: list[SequenceParallelAttention]):
        if not states:
            raise ValueError("a batched decode step needs at least one row")
        self.states = states
        self.base = states[0]  # topology, groups and head split: the same for every row
        self.topo, self.comm = self.base.topo, self.base.comm

    def begin_decode(self, positions: list[int]) -> None:
        for state, position in zip(self.states, positions):
            state.begin_decode(position)

    def end_step(self) -> None:
        for state in self.states:
            state.end_step()

    def attend(self, layer: int, q, k, v, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """q [B, H, 1, d], k/v [B, G, 1, d] (row b: request b's token) -> out [B, 1, H, d]."""
        q_l, k_l, v_l = self.base.decode_heads(q, k, v)  # [B, H/U, 1, d], [B, G'/U, 1, d] x2
        parts = [state.decode_partial(layer, q_l[b : b + 1], k_l[b : b + 1], v_l[b : b + 1], scale, window, softcap)
                 for b, state in enumerate(self.states)]
        out = torch.cat([o for o, _ in parts])   # [B, H/U, 1, d]
        lse = torch.cat([s for _, s in parts])   # [B, H/U, 1]
        return self.base.finish_decode(out, lse, q.dtype, layer).transpose(1, 2)  # [B, 1, H, d]
