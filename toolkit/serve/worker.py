"""The model step every rank runs: rank 0 takes a request off the queue and broadcasts it,
all ranks prefill (reusing a cached prefix) and decode together, and rank 0 hands each token
to the request's stream. Requests run one at a time; when there are none, rank 0 still
broadcasts now and then so the others never wait past the process group's timeout."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import torch

from ..distributed.timing import clock
from ..engine.decode import Sampling, generate_tokens
from .prefix_cache import PrefixCache

IDLE_BROADCAST_S = 5.0
SHUTTING_DOWN = "the server is shutting down: send the request again in a moment, to this or another server"


@dataclass
class Job:
    """One request as every rank sees it (what crosses the broadcast), plus rank 0's stream."""
    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    salt: str = ""          # the tenant and cache_salt: prefixes are reused only between requests of one salt
    kind: str = "generate"  # generate | idle | shutdown
    # rank 0 only, never broadcast:
    emit: object = field(default=None, repr=False)     # emit(token | None, info) from the engine thread
    stopped: threading.Event = field(default_factory=threading.Event, repr=False)

    def wire(self) -> dict:
        return {"ids": self.ids, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "salt": self.salt,
                "kind": self.kind}


class Worker:
    def __init__(self, lcm, max_cached_tokens: int, metrics=None):
        self.lcm, self.metrics = lcm, metrics
        self.cache = PrefixCache(lcm, max_cached_tokens)
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.failed: str | None = None
        self.thread_ok = True  # False once the engine loop has ended (shutdown, or a rank died)
        self.current: Job | None = None  # rank 0: the request being generated

    def stop(self, grace_s: float) -> None:
        """Rank 0 (SIGTERM): accept nothing more, answer what waits with a 503 (Retry-After),
        let the running request finish, or cut it at its next token after `grace_s` seconds."""
        self.stopping.set()
        # from a thread: a signal handler that took the queue's lock while the main thread held it would deadlock
        threading.Thread(target=self.refuse_waiting, name="lctk-refuse", daemon=True).start()

        def cut():
            job = self.current
            if job is not None:
                job.stopped.set()

        timer = threading.Timer(grace_s, cut)
        timer.daemon = True
        timer.start()

    def alive(self) -> bool:
        return not self.stopping.is_set() and self.thread_ok

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    def _broadcast(self, job: Job | None) -> Job:
        topo = self.lcm.topo
        wire = topo.comm.broadcast_object(job.wire() if job is not None else None, topo.world_group())
        return Job(**wire) if job is None else job

    def _next(self) -> Job | None:
        """Rank 0: the next request, an idle tick, or shutdown."""
        waited = 0.0
        while True:
            if self.stopping.is_set():
                self.refuse_waiting()
                return Job([], 0, kind="shutdown")
            try:
                job = self.jobs.get(timeout=0.2)
                if not job.stopped.is_set():  # its client left while it waited
                    return job
            except queue.Empty:
                waited += 0.2
                if waited >= IDLE_BROADCAST_S:
                    return Job([], 0, kind="idle")

    def refuse_waiting(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job.emit is not None:
                job.emit(None, {"error": SHUTTING_DOWN, "status": 503})

    def run(self):
        """Every rank: serve until rank 0 says shutdown."""
        main = self.lcm.topo.is_main
        while True:
            job = self._broadcast(self._next() if main else None)
            if job.kind == "shutdown":
                return
            if job.kind == "idle":
                continue
            try:
                self.current = job
                self._generate(job)
            except Exception as err:  # noqa: BLE001 - requests are validated first; this one fails alone
                self.failed = f"{type(err).__name__}: {err}"
                if job.emit is not None:
                    job.emit(None, {"error": self.failed})
            finally:
                self.current = None

    def _generate(self, job: Job):
        lcm, device = self.lcm, self.lcm.topo.device
        t0 = clock(device)
        entry, logits, reused = self.cache.prefill(job.ids, job.max_tokens, job.salt)
        mark = entry.state.cache.mark()
        t1 = clock(device)
        sampling = Sampling(do_sample=job.temperature > 0, temperature=job.temperature or 1.0, top_p=job.top_p,
                            seed=job.seed)
        emit = job.emit
        try:
            tokens = generate_tokens(lcm.model, torch.tensor([job.ids]), logits, entry.state, job.max_tokens,
                                     sampling, lcm.eos_token_ids(), (lambda t: emit(t, None)) if emit else None,
                                     lcm.stage, should_stop=job.stopped.is_set, decode_mode=lcm.decode_mode)
        finally:
            entry.state.cache.rollback(mark)
            self.cache.keep(entry)
        t2 = clock(device)
        info = {"prompt_tokens": len(job.ids), "cached_tokens": reused, "completion_tokens": len(tokens),
                "finish_reason": "length" if len(tokens) >= job.max_tokens and tokens[-1] not in lcm.eos_token_ids()
                else "stop", "prefill_s": t1 - t0, "decode_s": t2 - t1}
        if self.metrics is not None:
            self.metrics.record(info)
        if emit is not None:
            emit(None, info)
