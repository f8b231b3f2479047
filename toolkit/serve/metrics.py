"""What /metrics shows (Prometheus text, through prometheus_client): requests, tokens,
seconds, prefix-cache hits and the queue."""
from __future__ import annotations


class Metrics:
    def __init__(self, queue_length):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lctk_requests", "Requests answered, by endpoint and outcome",
                                ["endpoint", "outcome"], registry=self.registry)
        self.prompt_tokens = Counter("lctk_prompt_tokens", "Prompt tokens of answered requests", registry=self.registry)
        self.generated_tokens = Counter("lctk_generated_tokens", "Tokens generated", registry=self.registry)
        self.cached_tokens = Counter("lctk_cached_tokens", "Prompt tokens reused from the prefix cache",
                                     registry=self.registry)
        self.cache_hits = Counter("lctk_prefix_cache_hits", "Requests that reused a cached prefix",
                                  registry=self.registry)
        self.prefill_seconds = Histogram("lctk_prefill_seconds", "Prefill time per request", registry=self.registry)
        self.decode_seconds = Histogram("lctk_decode_seconds", "Decode time per request", registry=self.registry)
        queue = Gauge("lctk_queue_length", "Requests waiting for the ranks", registry=self.registry)
        queue.set_function(queue_length)

    def record(self, info: dict):
        self.prompt_tokens.inc(info["prompt_tokens"])
        self.generated_tokens.inc(info["completion_tokens"])
        self.cached_tokens.inc(info["cached_tokens"])
        if info["cached_tokens"]:
            self.cache_hits.inc()
        self.prefill_seconds.observe(info["prefill_s"])
        self.decode_seconds.observe(info["decode_s"])

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
