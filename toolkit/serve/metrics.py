"""What /metrics shows (Prometheus text, through prometheus_client): requests, tokens, seconds,
prefix-cache hits, and the engine: requests running and waiting, KV blocks used and free, KV bytes held,
preemptions, SP ranks busy, and histograms of time to first token, of time between tokens and of the
SP ranks each request ran on."""
from __future__ import annotations

# seconds: from a few milliseconds (a GPU's decode step) to minutes (a long prompt on CPUs)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)


def _busy(engine) -> int:
    """SP ranks some running request is placed on (all of them when any runs without elastic placement)."""
    sched = engine.scheduler
    if sched.placer is None:
        return engine.topo.dims.sp if sched.running else 0
    return sched.pool.busy_ranks()


class Metrics:
    def __init__(self, queue_length, engine=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self._totals = (0, 0)  # tokens generated, decode steps: answered requests' so far
        self.requests = Counter("lctk_requests", "Requests answered, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("lctk_prompt_tokens", "Prompt tokens of answered requests", registry=r)
        self.generated_tokens = Counter("lctk_generated_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("lctk_cached_tokens", "Prompt tokens read from a shared cached prefix", registry=r)
        self.cache_hits = Counter("lctk_prefix_cache_hits", "Requests that read a cached prefix", registry=r)
        self.prefill_seconds = Histogram("lctk_prefill_seconds", "Prefill time per request", registry=r)
        self.decode_seconds = Histogram("lctk_decode_seconds", "Decode time per request", registry=r)
        self.ttft = Histogram("lctk_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lctk_inter_token_latency_seconds", "Between two tokens of one request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.guessed = Counter("lctk_guesses_checked", "Tokens guessed by speculation and checked in a decode step",
                               registry=r)
        self.accepted = Counter("lctk_guesses_kept", "Guessed tokens that were the model's own choice",
                                registry=r)
        self.decode_steps = Counter("lctk_decode_steps", "Decode steps of answered requests (a step gives one "
                                    "token, plus its accepted guesses)", registry=r)
        self.degrees = Histogram("lctk_request_sp_degree", "Sequence-parallel ranks each answered request ran on "
                                 "(elastic placement)", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        Gauge("lctk_tokens_per_decode_step", "Tokens a request's decode step gave, on average so far",
              registry=r).set_function(lambda: self._tokens_per_step())
        queue = Gauge("lctk_queue_length", "Requests waiting for the ranks", registry=r)
        queue.set_function(queue_length)
        if engine is not None:
            sched = engine.scheduler
            gauges = {"lctk_requests_running": ("Requests in the running batch", lambda: len(sched.running)),
                      "lctk_requests_waiting": ("Requests admitted to the engine, waiting for room",
                                                lambda: len(sched.waiting)),
                      "lctk_kv_blocks_used": ("KV cache blocks held by requests", lambda: sched.pool.used),
                      "lctk_kv_blocks_free": ("KV cache blocks free", lambda: sched.pool.free),
                      "lctk_kv_bytes": ("Bytes of KV cache buffers rank 0 holds: running requests' and cached "
                                        "prompts', each once (every rank holds about as much)", engine.kv_bytes),
                      "lctk_preemptions": ("Requests preempted so far (their cache dropped, recomputed later)",
                                           lambda: sched.preemptions),
                      "lctk_busy_sp_ranks": ("Sequence-parallel ranks holding some request (elastic placement: "
                                             "fewer than all while short requests run)", lambda: _busy(engine))}
            for name, (what, read) in gauges.items():
                Gauge(name, what, registry=r).set_function(read)

    def record(self, info: dict):
        self.prompt_tokens.inc(info["prompt_tokens"])
        self.generated_tokens.inc(info["completion_tokens"])
        self.cached_tokens.inc(info["cached_tokens"])
        if info["cached_tokens"]:
            self.cache_hits.inc()
        self.prefill_seconds.observe(info["prefill_s"])
        self.decode_seconds.observe(info["decode_s"])
        self.ttft.observe(info["prefill_s"])
        if info.get("sp_degree"):
            self.degrees.observe(info["sp_degree"])
        for gap in info.get("itl_s", ()):
            self.itl.observe(gap)
        guessed = info.get("speculation") or {}
        self.guessed.inc(guessed.get("drafted", 0))
        self.accepted.inc(guessed.get("accepted", 0))
        steps = max(info["completion_tokens"] - guessed.get("accepted", 0), 0)
        self.decode_steps.inc(steps)
        self._totals = (self._totals[0] + info["completion_tokens"], self._totals[1] + steps)

    def _tokens_per_step(self) -> float:
        tokens, steps = self._totals
        return tokens / steps if steps else 0.0

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
