"""One request, whichever front end made it (generate, a session's ask, the server), and what
it gives back: the tokens, their text, the prompt's length, why it ended and the timings. It
lives below every front end, so sessions and the API share it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..distributed.timing import clock
from .decode import Sampling, choose_token
from ..options import Speculation, parse_speculate

# why a text ended, as OpenAI's finish_reason says it: an end-of-sequence token or a stop
# string ("stop"), max_new_tokens ("length"), or its owner went away before it ended ("abort")
FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    timings: dict = field(default_factory=dict)
    finish_reason: str = "length"


@dataclass(eq=False)
class Request:
    """A prompt to continue, as rank 0 holds it while the engine runs it."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    on_token: Callable[[int], None] | None = None      # rank 0: each token as it is chosen
    should_stop: Callable[[], bool] | None = None      # rank 0: True ends it (a stop string seen, a client gone)
    on_prefill: Callable[[int, int], None] | None = None  # rank 0: (prompt tokens in the cache, all of them)
    on_end: Callable[[list[int], str], None] | None = None  # rank 0: (its tokens, why it ended) as it ends
    keep_logits: bool = False                          # rank 0: keep the logits each token was chosen from
    prefix: int | None = None                          # a shared prefix's id (Engine.share): its keys are read, not computed
    shared: int = 0                                    # ... and how many leading prompt tokens it holds
    share_prompt: bool = False                         # once its prompt is in, share that cache (Engine.on_shared)
    speculate: Speculation | str = "off"               # guesses of its next tokens (toolkit.engine.speculation)
    # the engine's:
    rid: int = -1
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrived: float = field(default_factory=clock)
    token_times: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        self._processors = self.sampling.processors()
        self._generator = torch.Generator(device="cpu").manual_seed(self.sampling.seed)
        self.speculate = parse_speculate(self.speculate)
        self.drafter = None  # its guesser, given by the engine as it is added (speculation.make_drafter)

    @property
    def known(self) -> list[int]:
        """Every token whose key the cache will hold: the prompt and what was generated (a copy)."""
        return self.prompt + self.output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def last(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] after the last known token -> [1, V] after its processors (which see its ids)."""
        if self.keep_logits:
            self.logits.append(logits.detach().cpu().clone())
        if not len(self._processors):
            return logits[None]
        return self._processors(torch.tensor([self.known], device=logits.device), logits[None])

    def choose(self, logits: torch.Tensor) -> int:
        """logits [V] after the last known token -> the next token, as a lone generate would choose it
        (its processors see the same ids, its generator is seeded alike and kept through preemption)."""
        return int(choose_token(self.scores(logits), self.sampling, self._generator).item())

    def add(self, token: int, now: float) -> None:
        """The next token is chosen (at `now`)."""
        self.output.append(token)
        self.token_times.append(now)
        if self.drafter is not None:
            self.drafter.add(token)

    def timings(self) -> dict:
        first = self.token_times[0] if self.token_times else self.arrived
        last = self.token_times[-1] if self.token_times else first
        return {"ttft_s": first - self.arrived, "prefill_s": first - self.arrived, "decode_s": last - first,
                "tokens_per_s": (len(self.token_times) - 1) / (last - first) if last > first else 0.0,
                **({"speculation": self.drafter.stats()} if self.drafter is not None else {})}
