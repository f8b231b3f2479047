"""Which requests run in the next engine step, and how many of their tokens: rank 0 decides,
every rank executes the same plan.

A request's known tokens are its prompt and what it has generated; `computed` of them are in
the cache. A step computes, for each request it includes, the next stretch of known tokens:
one token for a request that is decoding (its last generated token), a chunk of the prompt for
one that is prefilling. Requests decoding go first and always run (stall-free: a long prompt
never holds them up); prefill chunks fill the step's token budget after them, oldest request
first; a waiting request is admitted when the blocks of its known tokens fit. When a decoding
request needs a block and none is free, the newest running request is preempted: its blocks
go back, and it waits at the head of the queue to be computed again from its known tokens.
So the oldest request always progresses, and one that fits the pool alone always finishes.

Pure Python: no torch, tested exhaustively (tests/test_scheduler.py)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .blocks import BlockPool, blocks_for
from .placed_pool import Placer


class RequestTooLarge(ValueError):
    """The request can never fit the pool, whatever else runs: refused before any work."""


@dataclass
class Tracked:
    rid: int
    tokens: int          # known: prompt + generated so far
    most: int            # prompt + max_new_tokens: the most it can ever hold
    order: int           # arrival order: preemption takes the newest
    shared: int = 0      # leading known tokens read from a shared prefix (not this request's blocks)
    home: object = None  # elastic: the placement it must run on (its shared prefix's), else None
    computed: int = 0    # known tokens already in the cache (the shared ones included)
    preemptions: int = 0

    def own(self, tokens: int) -> int:
        """Of the first `tokens` positions, those this request's own blocks hold."""
        return tokens - self.shared


@dataclass
class StepPlan:
    decode: list[int] = field(default_factory=list)                   # rids, one token each
    prefill: list[tuple[int, int, int]] = field(default_factory=list)  # (rid, start, length)
    preempted: list[int] = field(default_factory=list)                # rids whose cache is dropped
    admitted: list[int] = field(default_factory=list)                 # rids starting (or restarting) now

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(n for _, _, n in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill or self.preempted)


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch_tokens: int, max_running: int, chunk_tokens: int,
                 placer: Placer | None = None):
        """max_batch_tokens: tokens of one step while some request is decoding (their tokens and
        prefill chunks together); chunk_tokens: the most one prefill chunk takes when nothing is
        decoding (the run's chunk size: a prompt alone goes as fast as it would by itself).
        placer: elastic placement (pool is then a PlacedPool): each request admitted runs on a block
        of the SP ranks, and max_running counts the requests on each rank."""
        if min(max_batch_tokens, max_running, chunk_tokens) < 1:
            raise ValueError("max_batch_tokens, max_running and chunk_tokens must be at least 1")
        self.pool, self.max_batch_tokens, self.max_running = pool, max_batch_tokens, max_running
        self.placer = placer
        self.chunk_tokens = chunk_tokens
        self.waiting: deque[Tracked] = deque()
        self.running: list[Tracked] = []  # in arrival order
        self.requests: dict[int, Tracked] = {}
        self._order = 0
        self.preemptions = 0

    # ---- requests come and go -----------------------------------------------------------
    def check_fits(self, prompt_tokens: int, max_new_tokens: int, shared: int = 0) -> None:
        most = prompt_tokens - shared + max_new_tokens
        if blocks_for(most, self.pool.block_size) > self.pool.num_blocks:
            raise RequestTooLarge(
                f"the request needs room for {most} tokens ({prompt_tokens - shared} of prompt + {max_new_tokens} new) and "
                f"the KV cache holds {self.pool.tokens} ({self.pool.num_blocks} blocks of {self.pool.block_size}): "
                "shorten the prompt, ask for fewer tokens, or give the cache more blocks")

    def add(self, rid: int, prompt_tokens: int, max_new_tokens: int, shared: int = 0, home=None) -> None:
        """shared: leading prompt tokens already in a shared prefix's cache (a document's); home:
        the placement that prefix lies on (elastic)."""
        if rid in self.requests:
            raise ValueError(f"request {rid} is already scheduled")
        if not 0 <= shared < prompt_tokens:
            raise ValueError(f"a shared prefix of {shared} tokens must leave some of the {prompt_tokens}-token prompt")
        self.check_fits(prompt_tokens, max_new_tokens, shared)
        tracked = Tracked(rid, prompt_tokens, prompt_tokens + max_new_tokens, self._order, shared, home, shared)
        self._order += 1
        self.requests[rid] = tracked
        self.waiting.append(tracked)

    def appended(self, rid: int) -> None:
        """Rank 0 chose request rid's next token: one more known token."""
        self.requests[rid].tokens += 1

    def speculate(self, rid: int, guesses: int) -> int:
        """Room in rid's blocks for up to `guesses` keys after its decode token (its step is planned)
        -> how many fit: more blocks are taken only where free, never by preempting another."""
        tracked = self.requests[rid]
        while guesses and not self.pool.fits(rid, tracked.own(tracked.computed + guesses)):
            guesses -= 1
        self.pool.grow(rid, tracked.own(tracked.computed + guesses))
        return guesses

    def computed(self, rid: int, tokens: int) -> None:
        """Rank 0: `tokens` more of rid's known tokens are in the cache (guesses kept by its step)."""
        self.requests[rid].computed += tokens

    def finish(self, rid: int) -> None:
        """rid is done (or gone): its blocks go back to the pool."""
        tracked = self.requests.pop(rid, None)
        if tracked is None:
            return
        if tracked in self.running:
            self.running.remove(tracked)
        elif tracked in self.waiting:
            self.waiting.remove(tracked)
        self.pool.release(rid)

    @property
    def idle(self) -> bool:
        return not self.requests

    # ---- one step -------------------------------------------------------------------------
    def _preempt(self, victim: Tracked, plan: StepPlan) -> None:
        self.running.remove(victim)
        self.pool.release(victim.rid)
        victim.computed, victim.preemptions = victim.shared, victim.preemptions + 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        plan.preempted.append(victim.rid)
        if victim.rid in plan.decode:
            plan.decode.remove(victim.rid)
        plan.prefill = [p for p in plan.prefill if p[0] != victim.rid]
        if victim.rid in plan.admitted:
            plan.admitted.remove(victim.rid)

    def schedule(self, prefill_budget: int | None = None) -> StepPlan:
        """The next step. prefill_budget: the most prefill tokens to run next to decoding requests
        (a latency goal's share; default: what max_batch_tokens leaves after them)."""
        plan = StepPlan()
        for tracked in list(self.running):  # decoding requests first, oldest first
            if tracked not in self.running or tracked.tokens - tracked.computed != 1:
                continue
            while not self.pool.fits(tracked.rid, tracked.own(tracked.computed + 1)):
                self._preempt(self._newest_sharing(tracked), plan)  # the newest on its ranks gives way
                if tracked not in self.running:
                    break
            else:
                self.pool.grow(tracked.rid, tracked.own(tracked.computed + 1))
                plan.decode.append(tracked.rid)
        # the step's token budget per SP rank (one budget without elastic placement): a request's
        # tokens count on each of its ranks, so requests on other ranks run beside it in full
        ranks = self.pool.sp if self.placer is not None else 1
        if plan.decode:
            budget = [self.max_batch_tokens] * ranks
            for rid in plan.decode:
                for r in self._ranks(rid):
                    budget[r] -= 1
            budget = [b if prefill_budget is None else min(b, prefill_budget) for b in budget]
        else:
            budget = [self.chunk_tokens] * ranks
        under_way = [t for t in self.running if t.tokens - t.computed > 1]  # one left: it ran as a decode row
        reserve = [0] * ranks  # prompts under way keep half the step on their ranks: none starves
        for t in under_way:
            for r in self._ranks(t.rid):
                reserve[r] = budget[r] // 2
        room = lambda members: min(budget[r] - reserve[r] for r in members)  # noqa: E731
        while self.waiting:
            tracked = self.waiting[0]  # new requests first: a chat behind a long prompt starts at once
            if not self._place(tracked, room):
                break  # admitted when its known tokens and its next one fit: it waits, first in line
            self.waiting.popleft()
            self.pool.grow(tracked.rid, tracked.own(tracked.tokens + 1))
            self.running.append(tracked)
            self.running.sort(key=lambda t: t.order)
            plan.admitted.append(tracked.rid)
            self._prefill(plan, tracked, room(self._ranks(tracked.rid)), budget)
        for tracked in sorted(under_way, key=lambda t: t.tokens - t.computed):  # the nearest to done first
            self._prefill(plan, tracked, min(budget[r] for r in self._ranks(tracked.rid)), budget)
        for rid in plan.decode:
            self.requests[rid].computed += 1
        for rid, _, n in plan.prefill:
            self.requests[rid].computed += n
        return plan

    def _ranks(self, rid: int):
        return self.pool.where[rid].members if self.placer is not None else range(1)

    def _prefill(self, plan: StepPlan, tracked: Tracked, room: int, budget: list[int]) -> None:
        """Up to `room` of tracked's prompt this step, counted on each of its ranks."""
        n = min(tracked.tokens - tracked.computed, room)
        if n > 0:
            plan.prefill.append((tracked.rid, tracked.computed, n))
            for r in self._ranks(tracked.rid):
                budget[r] -= n

    def _newest_sharing(self, tracked: Tracked) -> Tracked:
        return next(t for t in reversed(self.running) if t is tracked or self.pool.shares(t.rid, tracked.rid))

    def _place(self, tracked: Tracked, room) -> bool:
        """Whether the next waiting request can start now: some of the step's budget is left on its
        ranks (room(ranks) > 0), and room in the pool for it and for one more running request
        (elastic: on each rank of the best block that has both)."""
        tokens = tracked.own(tracked.tokens + 1)
        if self.placer is None:
            return room(range(1)) > 0 and len(self.running) < self.max_running and self.pool.fits(tracked.rid, tokens)
        loaded = len(self.waiting) > 1  # others wait behind it: fewer ranks each serve more of them
        for placement in self.placer.choices(tracked.tokens, tracked.most, tracked.home, loaded):
            free = self.pool.load(placement)[0] < self.max_running and room(placement.members) > 0
            self.pool.place(tracked.rid, placement)
            if free and self.pool.fits(tracked.rid, tokens):
                return True
        self.pool.release(tracked.rid)
        return False

    def placement(self, rid: int):
        """Elastic: where rid runs (None: every rank, as launched)."""
        return self.pool.where.get(rid) if self.placer is not None else None

    @property
    def prefill_position(self) -> int:
        """The furthest a prompt still prefilling has come (where the next chunk's attention is dearest)."""
        return max((t.computed for t in self.running if t.tokens - t.computed > 1), default=0)

    def ready(self, rid: int) -> bool:
        """After the step: every known token of rid is in the cache, so its logits choose the next."""
        tracked = self.requests.get(rid)
        return tracked is not None and tracked.computed == tracked.tokens
