"""The engine: requests join and leave at step boundaries; each step runs a decode row for every
request that is decoding (its token, and guesses of the next ones to check: toolkit.engine.
speculation; one forward, the weights read once for all rows) and prefill chunks of the others,
within a token budget (toolkit.engine.scheduler).

Rank 0 schedules and chooses tokens; every rank runs the same plan, the only thing broadcast per
step: the tokens chosen last step, the decode rows (tokens, position), the prefill chunks (token
ids), the requests dropped. Every rank keeps one attention state (its cache shard) per running
request, keyed by the request's id, and every request's tokens and finish reason, so a result is
the same on every rank."""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from ..distributed.timing import clock
from ..options import check_positive_int
from .cache import PrefixedKVCache, held_kv_bytes
from .decode import decoder
from .hf import long_rope_switch, uses_positional_attention
from .pace import Pace
from .packed import Chunk, packed_step, rope_groups
from .placing import Placing
from .prefixes import SharedPrefixes
from .request import Request
from .rows import RowsAttention
from .sequence_parallel import SequenceParallelAttention
from .speculation import choose_checked, make_drafter
from .settings import EngineSettings


class Engine:
    def __init__(self, model, stage, topo, new_state: Callable[[int], SequenceParallelAttention],
                 reserve: Callable[[int, int], int], chunk_tokens: int, eos_token_ids: set[int],
                 settings: EngineSettings = EngineSettings(), degree_for: Callable[[int, int, bool], int] | None = None):
        """new_state(reserve_tokens, topology): an empty attention state; reserve(prompt, new, ring):
        the cache room a request of that size reserves on this rank; degree_for(prompt, new): the SP
        ranks a request spans under elastic placement (None: every one; toolkit.planner.elastic)."""
        self.model, self.stage, self.topo = model, stage, topo
        self.new_state, self.reserve, self.eos = new_state, reserve, set(eos_token_ids)
        if settings.kv_blocks is None:
            raise ValueError("the engine needs the pool's size: settings.kv_blocks (LongContextModel sizes it from memory)")
        self.settings, self.chunk_tokens = settings, settings.prefill_chunk or chunk_tokens
        self.placing = Placing(topo, settings, degree_for)
        self.scheduler = self.placing.scheduler(self.chunk_tokens)
        self.requests: dict[int, Request] = {}        # rank 0: every request not yet finished
        self.states: dict[int, SequenceParallelAttention] = {}  # every rank: the running requests' caches
        self.outputs: dict[int, list[int]] = {}       # every rank: tokens of each request so far
        self.finished: dict[int, tuple] = {}          # every rank: (finish reason, rank 0's timings), until collected
        self.on_shared: Callable[[int, int], None] | None = None  # (rid, prefix id) when a prompt is shared
        self._sharing: list[tuple[int, int]] = []     # rank 0: (rid, prompt tokens) to share at the next step
        self._emitted: list[tuple[int, int]] = []     # rank 0: chosen this step, told to all in the next plan
        self._ended: list[tuple[int, str, dict]] = []  # rank 0: ended this step, likewise
        self._next_rid, self.steps = 0, 0
        self.prefixes, self.pace = SharedPrefixes(), Pace()  # every rank: caches read by reference; rank 0: step times
        self.switch = long_rope_switch(model)
        # the step of a request decoding alone: "eager" (the rows step), or the fixed-shape step
        # ("static"; "cuda-graph" captures it once per request and replays it per token)
        self.decode_mode = "eager"
        self._fixed_ok = not uses_positional_attention(model.config)
        self._alone: dict[int, Callable] = {}  # every rank: rid -> its fixed-shape step, made at first use
        self._guesses: dict[int, list[int]] = {}  # rank 0: the guesses each decode row of this step carries
        self._checked: dict[int, int] = {}  # every rank: rid -> tokens its decode row ran this step
        self.draft_model = None  # rank 0: the model speculate="draft" guesses with

    def kv_bytes(self) -> int:
        """Bytes of the KV buffers this rank holds now (safe to call from another thread)."""
        return held_kv_bytes(list(self.states.values()), self.prefixes.values())

    # ---- rank 0: requests in ---------------------------------------------------------------
    def add(self, request: Request) -> int:
        """Rank 0: queue a request -> its id. Refused at once (RequestTooLarge) if the pool can never hold it."""
        check_positive_int("max_new_tokens", request.max_new_tokens, ValueError)
        if not request.prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if request.prefix is not None and (request.prefix not in self.prefixes
                                           or self.prefixes[request.prefix].tokens != request.shared):
            raise ValueError(f"shared prefix {request.prefix} of {request.shared} tokens is not one this engine holds")
        self.scheduler.check_fits(len(request.prompt), request.max_new_tokens, request.shared)
        request.rid, self._next_rid = self._next_rid, self._next_rid + 1
        request.drafter = make_drafter(request.speculate, request.prompt, self.draft_model, request.sampling)
        home = self.placing.home(request, self.prefixes.home(request.prefix), self.scheduler.pool)  # may drop it
        self.scheduler.add(request.rid, len(request.prompt), request.max_new_tokens, request.shared, home)
        self.requests[request.rid] = request
        return request.rid

    def cancel(self, rid: int) -> None:
        """Rank 0: end request rid now (its owner is gone), whatever it has done."""
        if rid in self.requests:
            self._end(self.requests[rid], "abort")

    @property
    def busy(self) -> bool:
        """Rank 0: some request waits or runs, or some news has still to reach the other ranks."""
        return bool(self.requests or self._emitted or self._ended or self._sharing
                    or self.prefixes.has_news)

    # ---- every rank: one step ------------------------------------------------------------------
    def step(self, note=None) -> dict | None:
        """Collective: rank 0 plans, every rank runs the plan. -> the plan (None: nothing was left).
        note: what rank 0's caller tells every rank's with this step (plan["note"]; a server's new
        requests and cache decisions), sent even when there is nothing to run."""
        plan = self._plan() if self.topo.is_main else None
        if self.topo.is_main and note is not None:
            plan = plan or {"emitted": [], "ended": [], "drop": [], "decode": [], "prefill": []}
            plan["note"] = note
        if self.topo.world > 1:
            plan = self.topo.comm.broadcast_object(plan, self.topo.world_group())
        if plan is None:
            return None
        self._learn(plan)
        started = clock(self.topo.device)
        logits = self.placing.gather(self._run(plan), {row[0]: len(row[1]) for row in plan["decode"]} | {
            p[0]: 1 for p in plan["prefill"] if p[1] + len(p[2]) == p[3]})  # the logits that choose tokens
        if self.topo.is_main:
            self.pace.measure(len(plan["decode"]), [(p[1], len(p[2])) for p in plan["prefill"]],
                              clock(self.topo.device) - started, max((len(row[1]) for row in plan["decode"]), default=1))
            for rid, start, ids, total, *_ in plan["prefill"]:
                request = self.requests.get(rid)
                if request is not None and request.on_prefill is not None:
                    request.on_prefill(start + len(ids) - request.shared, total - request.shared)
            self._choose(logits)
        self.steps += 1
        return plan

    def _plan(self) -> dict | None:
        for rid, request in list(self.requests.items()):  # owners gone before their turn
            if request.should_stop is not None and not request.output and request.should_stop():
                self._end(request, "abort")
        if not self.busy:
            return None
        sched = self.scheduler.schedule(self.pace.prefill_budget(self.settings.max_itl_ms, self.scheduler.prefill_position))
        decode = [self._decode_row(self.requests[rid], len(sched.decode)) for rid in sched.decode]
        prefill = []
        for rid, start, n in sched.prefill:
            request = self.requests[rid]
            known = request.known if start + n > len(request.prompt) else request.prompt
            reserve = self.reserve(request.length - request.shared, request.max_new_tokens,
                                   self.scheduler.placement(rid)) if rid in sched.admitted else None  # None: it has one
            prefill.append((rid, start, known[start : start + n], request.length, reserve, request.prefix,
                            request.share_prompt))
        plan = {"emitted": self._emitted, "ended": self._ended, "drop": sched.preempted + [e[0] for e in self._ended],
                "decode": decode, "prefill": prefill, "share": self._sharing, **self.prefixes.news(),
                "where": self.placing.news(self.scheduler, sched.admitted)}
        self._emitted, self._ended, self._sharing = [], [], []
        return plan

    def _decode_row(self, request: Request, rows: int) -> tuple:
        """(rid, [its last token, guesses of the next], its position, room: tokens still to come)."""
        position, room = request.length - 1, request.max_new_tokens - len(request.output) + 1
        guesses = []
        if request.drafter is not None and self.decode_mode == "eager":
            most = room - 2  # the step's own token is one of those to come
            if self.switch is not None and position < self.switch:  # a step reads one rotary table
                most = min(most, self.switch - position - 1)
            guesses = request.drafter.propose(most, lambda width: self.pace.width_cost(rows, width))
            guesses = guesses[: self.scheduler.speculate(request.rid, len(guesses))]
        self._guesses[request.rid] = guesses
        return request.rid, [request.last, *guesses], position, room

    def _learn(self, plan: dict) -> None:
        kept = Counter(rid for rid, _ in plan["emitted"])
        for rid, width in self._checked.items():  # the guesses found wrong leave every rank's cache
            if rid in self.states:
                self.states[rid].drop_newest(width - kept[rid])
        self._checked = {}
        for rid, token in plan["emitted"]:
            self.outputs.setdefault(rid, []).append(token)
        for rid, reason, timings in plan["ended"]:
            self.finished[rid] = (reason, timings)
        if not self.topo.is_main:  # rank 0 made these when it decided them, in this order
            self.prefixes.follow(plan)
        for rid, tokens in plan.get("share", ()):  # before the drops: a request may have ended at its first token
            pid = self.prefixes.share(self.states.get(rid), tokens, self.placing.where.get(rid))
            if self.on_shared is not None:
                self.on_shared(rid, pid)
        for rid in plan["drop"]:
            self.states.pop(rid, None)
            self._alone.pop(rid, None)
        self.placing.learn(plan)

    @torch.no_grad()
    def _run(self, plan: dict) -> dict[int, torch.Tensor]:
        """The plan's forwards on this rank -> logits [S, V] of each request it advanced (S > 1: a
        decode row's token and its guesses). A step with prefill is one forward (toolkit.engine.packed)."""
        logits: dict[int, torch.Tensor] = {}
        device, runs = self.topo.device, self.placing.runs
        chunks = [p for p in plan["prefill"] if runs(p[0])]  # (rid, start, ids, prompt length, reserve, prefix, pinned)
        for rid, _, _, _, reserve, prefix, pinned in chunks:
            if reserve is not None:
                state = self.states[rid] = self.new_state(reserve, self.placing.topology(rid))
                state.cache.pinned = pinned  # a cache kept for later prompts drops no window's keys
                if prefix is not None:  # the prefix's keys are read where they lie; this request stores its own
                    state.cache = PrefixedKVCache(self.prefixes[prefix], state.cache.reserve_tokens)
        for group, grouped in rope_groups(self.switch, [row for row in plan["decode"] if runs(row[0])], chunks):
            alone = len(group) == 1 and len(group[0][1]) == 1 and not plan["prefill"] and (
                not self.placing.elastic or len(plan["decode"]) == 1)  # decided alike on every rank
            step = self._fixed_step(group[0]) if alone else None
            if step is not None:
                logits[group[0][0]] = step(group[0][1][0], group[0][2])[None]
                continue
            rows = None
            if group:  # (rid, tokens, position, room); shorter rows padded: their extra keys go with wrong guesses
                width = self.placing.width(plan["decode"], group)
                tokens = torch.tensor([row[1] + row[1][-1:] * (width - len(row[1])) for row in group], device=device)
                rows = (tokens, [row[2] for row in group], RowsAttention([self.states[row[0]] for row in group]))
            rope_tokens = max([row[2] + len(row[1]) for row in group] + [p[3] for p in grouped])
            out, finals = packed_step(self.model, rows, [Chunk(self.states[p[0]], p[2], p[1], p[1] + len(p[2]) == p[3])
                                                         for p in grouped], rope_tokens, self.stage)  # [B, S, V], [V] each
            logits.update((p[0], last[None]) for p, last in zip(grouped, finals) if last is not None)
            for i, row in enumerate(group):
                logits[row[0]] = out[i, : len(row[1])]
                self._checked[row[0]] = width
        return logits

    def _fixed_step(self, row: tuple):
        """The static or CUDA-graph step of a request decoding alone (decode_mode), or None where
        the rows step runs: eager mode, or a cache the fixed-shape step does not read (a shared
        prefix's, a quantised one, a window's). Decided from what every rank knows alike."""
        rid, _, _, room = row
        step = self._alone.get(rid)
        if step is None and self.decode_mode != "eager" and self._fixed_ok:
            cache = self.states[rid].cache
            if getattr(cache, "prefix", None) is None and cache.kind is None and not cache.evicted:
                step = self._alone[rid] = decoder(self.model, self.states[rid], self.stage, self.decode_mode, room)
        return step

    # ---- rank 0: tokens out ---------------------------------------------------------------
    def _choose(self, logits: dict[int, torch.Tensor]) -> None:
        """Each request's next tokens: one, or with guesses, as many as plain decode would have
        chosen the same way (a guess is kept while it equals the token chosen in its place)."""
        now = clock()  # after _run's clock: the device is synchronised
        for rid, rows in logits.items():
            request = self.requests.get(rid)
            if request is None or not self.scheduler.ready(rid):
                continue  # a prompt part way through: its logits are not asked for yet
            accepted = choose_checked(request, rows, self._guesses.pop(rid, []),
                                      lambda token: self._take(request, token, now))
            if request.finish_reason is None:
                self.scheduler.computed(rid, accepted)  # the kept guesses' keys are in the cache

    def _take(self, request: Request, token: int, now: float) -> int:
        """Rank 0: `token` is request's next: record it, tell its owner, end the request if it is done."""
        if request.share_prompt and not request.output:  # its prompt is all in: others may read it now
            self._sharing.append((request.rid, len(request.prompt)))
        request.add(token, now)
        self._emitted.append((request.rid, token))
        if request.on_token is not None:
            request.on_token(token)
        if token in self.eos:
            self._end(request, "stop")
        elif len(request.output) >= request.max_new_tokens:
            self._end(request, "length")
        elif request.should_stop is not None and request.should_stop():
            self._end(request, "stop")
        else:
            self.scheduler.appended(request.rid)
        return token

    def _end(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        placed = self.placing.report(self.scheduler.placement(request.rid))
        self.scheduler.finish(request.rid)
        self.requests.pop(request.rid, None)
        self._ended.append((request.rid, reason, {**request.timings(), **placed}))
        if request.on_end is not None:
            request.on_end(request.output, reason)

    # ---- every rank: a whole batch of requests -------------------------------------------------
    def run(self, requests: list[Request] | None = None) -> dict[int, tuple[list[int], str, dict]]:
        """Collective: add `requests` (rank 0's are the ones that count) and step until every
        request has ended -> {rid: (tokens, finish reason, timings)} on every rank, in the order added."""
        try:
            if self.topo.is_main:
                for request in requests or ():
                    self.add(request)
            while self.step() is not None:
                pass
        except BaseException:  # a caller's callback raised: nothing of this run stays behind
            self.reset()
            raise
        return self.take_finished()

    def reset(self) -> None:
        """Forget every request (shared prefixes stay): an engine as new, on this rank."""
        self.scheduler, self.placing.where = self.placing.scheduler(self.chunk_tokens), {}
        self.requests, self.states, self.outputs, self.finished = {}, {}, {}, {}
        self._emitted, self._ended, self._sharing, self._alone, self._guesses, self._checked = [], [], [], {}, {}, {}

    def take_finished(self) -> dict[int, tuple[list[int], str, dict]]:
        """The requests that ended since the last call -> {rid: (tokens, reason, timings)}, forgotten here."""
        finished, self.finished = self.finished, {}
        return {rid: (self.outputs.pop(rid, []), *ended) for rid, ended in sorted(finished.items())}
