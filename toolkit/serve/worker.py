"""The model step every rank runs, on the one engine (toolkit.engine.engine): rank 0 takes the
requests that arrived since the last step into the engine (reusing a cached prompt's keys by
reference where one matches), every rank runs the step the engine planned, and rank 0 hands
each token to its request's stream. Requests join and leave at step boundaries, so a long
prompt never holds up the answers being made beside it. When there is nothing to do, rank 0
still sends a step now and then, so the others never wait past the process group's timeout."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from ..engine.decode import Sampling
from ..engine.request import Request
from ..engine.scheduler import RequestTooLarge
from .prefix_cache import PrefixCache

IDLE_BROADCAST_S = 5.0
SHUTTING_DOWN = "the server is shutting down: send the request again in a moment, to this or another server"


@dataclass
class Job:
    """One request as rank 0's HTTP side hands it over, with its stream."""
    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    salt: str = ""          # the tenant and cache_salt: prefixes are reused only between requests of one salt
    emit: object = field(default=None, repr=False)     # emit(token | None, info) from the engine thread
    stopped: threading.Event = field(default_factory=threading.Event, repr=False)


class Worker:
    def __init__(self, lcm, max_cached_tokens: int, metrics=None):
        self.lcm, self.metrics = lcm, metrics
        self.engine = lcm.engine
        self.engine.eos = lcm.eos_token_ids()
        self.cache = PrefixCache(self.engine, max_cached_tokens) if lcm.topo.is_main else None
        self.speculation = lcm.speculation()  # the server's --speculate, for every request
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.failed: str | None = None
        self.thread_ok = True  # False once the engine loop has ended (shutdown, or a rank died)
        self.running: dict[int, tuple[Job, Request, object, int]] = {}  # rank 0: rid -> job, request, entry, pid

    def stop(self, grace_s: float) -> None:
        """Rank 0 (SIGTERM): accept nothing more, answer what waits with a 503 (Retry-After), let
        the running requests finish, or cut them at their next token after `grace_s` seconds."""
        self.stopping.set()
        # from a thread: a signal handler that took the queue's lock while the main thread held it would deadlock
        threading.Thread(target=self.refuse_waiting, name="lctk-refuse", daemon=True).start()

        def cut():
            for job, *_ in list(self.running.values()):
                job.stopped.set()

        timer = threading.Timer(grace_s, cut)
        timer.daemon = True
        timer.start()

    def alive(self) -> bool:
        return not self.stopping.is_set() and self.thread_ok

    @property
    def queued(self) -> int:
        return self.jobs.qsize() + len(self.engine.scheduler.waiting) + (self.cache.waiting if self.cache else 0)

    def refuse_waiting(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job.emit is not None:
                job.emit(None, {"error": SHUTTING_DOWN, "status": 503})

    # ---- rank 0: requests in --------------------------------------------------------------------
    def _admit(self, job: Job) -> None:
        entry, reuse = self.cache.find(job.ids, job.salt)
        leader = self.cache.leader(job.ids, job.salt, reuse)
        if leader is not None:  # most of its prompt is being prefilled: read that once it is done
            self.cache.park(leader, job)
            return
        pid = self.cache.claim(entry, reuse) if entry is not None else None
        sampling = Sampling(do_sample=job.temperature > 0, temperature=job.temperature or 1.0, top_p=job.top_p,
                            seed=job.seed)
        emit = job.emit
        request = Request(job.ids, job.max_tokens, sampling, on_token=(lambda t: emit(t, None)) if emit else None,
                          should_stop=job.stopped.is_set, prefix=pid, shared=reuse if pid is not None else 0,
                          share_prompt=True, speculate=self.speculation)
        try:
            rid = self.engine.add(request)
        except RequestTooLarge as err:
            if entry is not None:
                self.cache.release(entry, pid)
            if emit is not None:
                emit(None, {"error": str(err), "status": 400})
            return
        self.cache.pending[rid] = (list(job.ids), job.salt)
        self.running[rid] = (job, request, entry, pid)

    def _intake(self) -> str | None:
        """Rank 0: move what arrived into the engine (waiting for it while the engine is idle) -> a
        note for every rank: None, "idle" (nothing for a while) or "shutdown"."""
        waited = 0.0
        while True:
            for job in self.cache.take_ready():  # the prompt they waited for is shared (or gone)
                if not job.stopped.is_set():
                    self._admit(job)
            if self.stopping.is_set():
                self.refuse_waiting()
                self._refuse_unstarted()
                if not self.engine.busy:
                    return "shutdown"
            try:
                job = self.jobs.get(timeout=0.2 if not self.engine.busy and not self.stopping.is_set() else 0)
            except queue.Empty:
                if self.engine.busy:
                    return None
                waited += 0.2
                if waited >= IDLE_BROADCAST_S:
                    return "idle"
                continue
            if not job.stopped.is_set():  # its client left while it waited
                self._admit(job)

    def _refuse_unstarted(self) -> None:
        """Rank 0, shutting down: requests the engine holds but has not started get a 503 too."""
        for tracked in list(self.engine.scheduler.waiting):
            job, request, entry, pid = self.running.get(tracked.rid, (None, None, None, None))
            if request is None or request.output:
                continue  # preempted after it began: it finishes
            self.engine.cancel(tracked.rid)
            self.running.pop(tracked.rid)
            self.cache.ended(tracked.rid)
            if entry is not None:
                self.cache.release(entry, pid)
            if job.emit is not None:
                job.emit(None, {"error": SHUTTING_DOWN, "status": 503})
        parked = [job for jobs in self.cache.parked.values() for job in jobs]  # behind a prompt, never started
        self.cache.parked.clear()
        for job in self.cache.take_ready() + parked:
            if job.emit is not None:
                job.emit(None, {"error": SHUTTING_DOWN, "status": 503})

    def _finish(self) -> None:
        """Rank 0: answer the requests that ended in the last step."""
        for rid, (tokens, reason, timings) in self.engine.take_finished().items():
            job, request, entry, pid = self.running.pop(rid, (None, None, None, None))
            if job is None:
                continue
            self.cache.ended(rid)
            if entry is not None:
                self.cache.release(entry, pid)
            info = {"prompt_tokens": len(request.prompt), "cached_tokens": request.shared,
                    "completion_tokens": len(tokens), "finish_reason": "length" if reason == "length" else "stop",
                    "prefill_s": timings.get("ttft_s", 0.0), "decode_s": timings.get("decode_s", 0.0),
                    "itl_s": [b - a for a, b in zip(request.token_times, request.token_times[1:])],
                    "speculation": timings.get("speculation", {}), "sp_degree": timings.get("sp_degree"),
                    "sp_ranks": timings.get("sp_ranks")}
            if self.metrics is not None:
                self.metrics.record(info)
            if job.emit is not None:
                job.emit(None, info)

    def run(self):
        """Every rank: serve until rank 0 says shutdown."""
        main, engine = self.lcm.topo.is_main, self.engine
        while True:
            note = self._intake() if main else None
            try:
                plan = engine.step(note)
            except Exception as err:  # the ranks may no longer agree: every request gets the error, the server stops
                self.failed = f"{type(err).__name__}: {err}"
                for job, *_ in self.running.values():
                    if job.emit is not None:
                        job.emit(None, {"error": self.failed})
                raise
            if main:
                self._finish()
            else:  # what ended is rank 0's to answer; here it is forgotten, or it would pile up for the server's life
                engine.take_finished()
            if plan is not None and plan.get("note") == "shutdown":
                return
