"""Where the engine's requests run, on every rank: each on every SP rank as launched, or under
elastic sequence parallelism each on the block of SP ranks the scheduler placed it on
(toolkit.distributed.placement, toolkit.engine.placed_pool).

Rank 0 places a request when it admits it and names the block in that step's plan (only a
block that is not the whole SP group: those are the default); every rank keeps the names until
the request's cache is dropped, runs only the requests on a block of its own, and attends each
over that block's groups. The logits of a step's requests that rank 0 did not run reach it
once after the step (the first rank of each block sends its requests' rows), never per layer."""
from __future__ import annotations

from typing import Callable

import torch

from ..distributed.placement import Placement, placements
from .blocks import BlockPool
from .placed_pool import PlacedPool, Placer
from .scheduler import Scheduler
from .settings import EngineSettings


class Placing:
    def __init__(self, topo, settings: EngineSettings, degree_for: Callable[[int, int, bool], int] | None):
        """degree_for(prompt, new, loaded): the SP ranks a request of that size spans (loaded:
        requests wait behind it; None: every one, as launched: elastic placement off)."""
        self.topo, self.settings, self.degree_for = topo, settings, degree_for
        self.blocks = placements(topo.dims.ulysses, topo.dims.ring)
        self.elastic = degree_for is not None and len(self.blocks) > 1
        if self.elastic:
            for block in self.blocks:  # every block's process groups, now: admitting a request makes none
                topo.placed(block)
        self.where: dict[int, int] = {}  # every rank: rid -> its block's index (absent: every SP rank)

    def scheduler(self, chunk_tokens: int) -> Scheduler:
        s = self.settings
        if not self.elastic:
            return Scheduler(BlockPool(s.kv_blocks, s.block_tokens), s.max_batch_tokens, s.max_running, chunk_tokens)
        pool = PlacedPool(s.kv_blocks, s.block_tokens, self.blocks)
        return Scheduler(pool, s.max_batch_tokens, s.max_running, chunk_tokens, Placer(pool, self.degree_for))

    # ---- rank 0 -----------------------------------------------------------------------------
    def news(self, scheduler: Scheduler, admitted: list[int]) -> dict[int, int]:
        """The blocks of the requests admitted this step (those not on every SP rank)."""
        placed = {rid: scheduler.placement(rid) for rid in admitted}
        return {rid: self.blocks.index(p) for rid, p in placed.items() if p not in (None, self.blocks[-1])}

    def report(self, placement: Placement | None) -> dict:
        """What a request's result says of where it ran under elastic placement: its SP ranks (and so its degree)."""
        placement = placement or self.blocks[-1]
        return {"sp_degree": placement.degree, "sp_ranks": list(placement.members)} if self.elastic else {}

    def home(self, request, index: int | None, pool) -> Placement | None:
        """The block a request reading a shared prefix (on block `index`) must run on; None: any. A
        prefix on a block whose pool could never hold the request is not read (the request computes
        its whole prompt, the same answer): it would wait at the head of the queue for ever."""
        if index is None:
            return None
        block, most = self.blocks[index], len(request.prompt) - request.shared + request.max_new_tokens
        if pool.holds(block.degree, most):
            return block
        request.prefix, request.shared = None, 0
        return None

    def block(self, rid: int) -> Placement:
        return self.blocks[self.where.get(rid, len(self.blocks) - 1)]

    # ---- every rank ---------------------------------------------------------------------------
    def learn(self, plan: dict) -> None:
        for rid in plan["drop"]:
            self.where.pop(rid, None)
        self.where.update(plan.get("where", {}))

    def runs(self, rid: int) -> bool:
        """This rank is one of the ranks request rid runs on."""
        return rid not in self.where or self.topo.sp_rank in self.block(rid).members

    def width(self, decode: list, rows: list) -> int:
        """Tokens per row of a decode forward over `rows` (of the step's `decode` rows): under elastic
        placement the step's widest, so a block's rows are as wide on each of its ranks."""
        return max(len(row[1]) for row in (decode if self.elastic else rows))

    def topology(self, rid: int):
        """The topology request rid's attention sees (its block's groups)."""
        return self.topo if rid not in self.where else self.topo.placed(self.block(rid))

    def gather(self, logits: dict[int, torch.Tensor], wanted: dict[int, int]) -> dict[int, torch.Tensor]:
        """Rank 0's logits of every request in `wanted` (rid -> its rows: the step's requests whose
        logits choose tokens), the ones run elsewhere included: each block away from rank 0 sends
        its requests' rows in one message from its first rank (a header [rows, vocab], then the
        rows), never pickled: a step's logits are megabytes."""
        away: dict[int, list[int]] = {}  # first SP rank of a block -> its wanted requests
        for rid in wanted:
            if rid in self.where and self.block(rid).first != 0:
                away.setdefault(self.block(rid).first, []).append(rid)
        topo, merged = self.topo, dict(logits)
        for first, rids in sorted(away.items()):
            leader = topo.dims.rank_of(ulysses=first % topo.dims.ulysses, ring=first // topo.dims.ulysses)
            if topo.rank == leader:
                rows = torch.cat([logits[rid] for rid in rids]).contiguous()  # [R, V]: each request's rows in turn
                header = torch.tensor(list(rows.shape), dtype=torch.long, device=rows.device)
                topo.comm.send(header, 0, topo.world_group(), tag="logits")()
                topo.comm.send(rows, 0, topo.world_group(), tag="logits")()
            elif topo.is_main:
                header = torch.empty(2, dtype=torch.long, device=topo.device)
                shape = topo.comm.recv(header, leader, topo.world_group(), tag="logits").tolist()
                rows = topo.comm.recv(torch.empty(shape, device=topo.device), leader, topo.world_group(), tag="logits")
                for rid, part in zip(rids, rows.split([wanted[rid] for rid in rids])):
                    merged[rid] = part
        return merged
