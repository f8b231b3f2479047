"""Pipeline parallelism: contiguous layer stages, activations passed stage to stage.

A stage keeps the HF model object but only its own decoder layers (their `layer_idx`
unchanged, so the KV cache of a stage holds exactly its layers), the embeddings on the first
stage and the final norm and head on the last. The HF forward still
runs: the first stage starts from token ids, the others from the received hidden state
(`inputs_embeds`), and every stage but the last skips the final norm and the head.
In prefill the chunks are the micro-batches: stage s works on chunk i while stage s+1
works on chunk i-1, so the bubble is (P-1)/M for M chunks.
"""
from __future__ import annotations

from collections import deque

import torch

from .hf import STATE_KWARG
from ..distributed.timing import clock
from ..distributed.topology import Topology


def balanced_stages(layer_weights: list[float], stages: int, first_extra: float = 0.0,
                    last_extra: float = 0.0) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges minimising the heaviest stage (embeddings on
    the first stage, the LM head on the last). Exact DP; L and P are small."""
    n = len(layer_weights)
    if not 1 <= stages <= n:
        raise ValueError(f"pipeline degree {stages} must be between 1 and the {n} layers")
    prefix = [0.0]
    for w in layer_weights:
        prefix.append(prefix[-1] + w)

    def load(stage: int, a: int, b: int) -> float:
        return prefix[b] - prefix[a] + (first_extra if stage == 0 else 0) + (last_extra if stage == stages - 1 else 0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[s][j]: first j layers on s stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                cand = max(best[s - 1][i], load(s - 1, i, j))
                if cand < best[s][j]:
                    best[s][j], cut[s][j] = cand, i
    bounds, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


class PipelineStage:
    """This rank's stage: which layers it runs, and its neighbours in the pipeline."""

    def __init__(self, model, topo: Topology):
        self.model, self.topo = model, topo
        dims, c = topo.dims, topo.coords
        base = model.model
        layers = list(base.layers)
        bounds = balanced_stages([parameter_count(layer) for layer in layers], dims.pp,
                                 first_extra=parameter_count(base.embed_tokens),
                                 last_extra=parameter_count(model.lm_head))  # a tied head is a copy there
        self.stage, self.stages = c["pp"], dims.pp
        self.start, self.end = bounds[self.stage]
        self.first, self.last = self.stage == 0, self.stage == dims.pp - 1
        base.layers = torch.nn.ModuleList(layers[self.start : self.end])
        if not self.first:  # later stages start from the received hidden state
            base.embed_tokens = torch.nn.Identity()
        if not self.last:  # the final norm and the head belong to the last stage
            base.norm = torch.nn.Identity()
            model.lm_head = torch.nn.Identity()
        same = dict(tp=c["tp"], ulysses=c["ulysses"], ring=c["ring"])
        self.prev = None if self.first else dims.rank_of(pp=self.stage - 1, **same)
        self.next = None if self.last else dims.rank_of(pp=self.stage + 1, **same)
        self.hidden_size = model.config.hidden_size
        self._pending = []  # wait() of each send in flight (it keeps its tensor alive until done)
        self.busy_s = 0.0
        # seconds of compute per forward call (chunk or token), latest last; bounded for long decodes
        self.busy_log: deque[float] = deque(maxlen=1 << 16)

    def _busy(self, t0: float):
        spent = clock(self.topo.device) - t0
        self.busy_s += spent
        self.busy_log.append(spent)

    def forward(self, local_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, state, logits_to_keep=None):
        """Run this stage on one chunk or decode token (ids [S]: -> logits [V]) or on a batch of rows
        (ids [B, S]: -> logits [B, S', V] of the last S' = logits_to_keep positions); the last stage returns them, the others None."""
        rows = local_ids.dim() == 2
        ids, positions = (local_ids, positions) if rows else (local_ids[None], positions[None])  # [B, S]
        kwargs = {"position_ids": positions, "use_cache": False, STATE_KWARG: state}
        if self.first:
            kwargs["input_ids"] = ids
        else:
            hidden = torch.empty(*ids.shape, self.hidden_size, dtype=self.model.dtype, device=local_ids.device)
            # [B, S_loc, h] from the same SP/TP slot of the previous stage
            self.topo.comm.recv(hidden, self.prev, self.topo.world_group(), tag="pipeline")
            kwargs["inputs_embeds"] = hidden
        t0 = clock(self.topo.device)  # the received activations are in: compute starts now
        if self.last:
            out = self.model(logits_to_keep=keep if logits_to_keep is None else logits_to_keep, **kwargs)
            self._busy(t0)
            if rows:  # [B, S, V]: every position kept (a decode step's token and its guesses)
                return out.logits.float()
            return out.logits[0, -1].float()
        hidden = self.model.model(**kwargs).last_hidden_state.contiguous()  # [B, S_loc, h]
        self._busy(t0)
        self._drain(keep_last=1)
        self._pending.append(self.topo.comm.send(hidden, self.next, self.topo.world_group(), tag="pipeline"))
        return None

    def _drain(self, keep_last: int = 0):
        while len(self._pending) > keep_last:
            self._pending.pop(0)()

    def finish(self):
        self._drain()

    def last_stage_rank(self, sp_owner: int) -> int:
        """Global rank on the last stage holding the logits of SP rank `sp_owner` (tp 0)."""
        u = sp_owner % self.topo.dims.ulysses
        return self.topo.dims.rank_of(tp=0, ulysses=u, ring=sp_owner // self.topo.dims.ulysses, pp=self.stages - 1)
