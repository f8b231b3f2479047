"""Speculation: guesses of a request's next tokens that the engine's step checks in one forward.

A decoding request's row normally carries one token; with drafts it carries the token and K
guesses of the tokens after it (q = K + 1 rows against the cache). Rank 0 then chooses token
by token from the row's logits, exactly as plain decode would (the same processors over the
same ids, the same seeded generator, one draw per token): a guess is accepted while it equals
the token chosen at its place, and the first token that differs ends the step. Greedy and
sampled answers are therefore the tokens plain decode gives; for sampling this is the
rejection rule of speculative sampling with a point-mass draft (accept draft d with
probability p(d), else draw from p without d, renormalised).

The drafter is prompt lookup: the most recent earlier occurrence of the last n tokens (n from
MAX_NGRAM down to MIN_NGRAM) in the prompt and the answer so far proposes the tokens that
followed it. It costs no model call. `auto` sizes K by the acceptance rate seen so far and
the measured cost of a wider step, and stops guessing while guesses do not pay.

Pure torch on the host; rank 0 only."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

SPECULATE_MODES = ("auto", "off", "ngram")
DEFAULT_DRAFT_TOKENS = 4   # ngram without :K
MAX_DRAFT_TOKENS = 16      # what auto may grow to, and the most ngram:K takes
MAX_NGRAM, MIN_NGRAM = 4, 2
PROBE_EVERY = 16           # auto: steps between tries while guessing does not pay
MIN_GAIN = 1.05            # auto: what one more guess a step must win (tokens a step per cost), or none is made
_SPEC = re.compile(r"^(auto|off|ngram)(?::(\d+))?$")
SPECULATE_HELP = "auto, off, ngram or ngram:K (K guessed tokens a step, 1 to 16)"


@dataclass(frozen=True)
class Speculation:
    mode: str = "off"  # off | auto | ngram
    k: int = 0         # drafts a step: ngram's fixed number, auto's most

    @property
    def on(self) -> bool:
        return self.mode != "off"


def speculate_problem(text) -> str | None:
    """Why `text` is no --speculate value (None when it is one)."""
    match = _SPEC.match(text) if isinstance(text, str) else None
    if match is None or (match.group(2) is not None and (match.group(1) != "ngram"
                                                         or not 1 <= int(match.group(2)) <= MAX_DRAFT_TOKENS)):
        return f"{text!r} is not allowed; allowed values: {SPECULATE_HELP}"
    return None


def parse_speculate(text) -> Speculation:
    if isinstance(text, Speculation):
        return text
    problem = speculate_problem(text)
    if problem:
        raise ValueError(f"speculate: {problem}")
    mode, k = _SPEC.match(text).groups()
    if mode == "off":
        return Speculation()
    return Speculation(mode, int(k) if k else DEFAULT_DRAFT_TOKENS if mode == "ngram" else MAX_DRAFT_TOKENS)


def prompt_lookup(tokens: torch.Tensor, k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """tokens [N] (int64, host) -> up to k tokens that followed an earlier occurrence of the tail:
    the longest tail (max_ngram down to min_ngram tokens) whose latest occurrence has k tokens after
    it; else the occurrence with the most after it; [] when no tail recurs."""
    n_total, best = tokens.numel(), []
    for n in range(max_ngram, min_ngram - 1, -1):
        if n_total <= n:
            continue
        windows = tokens[:-1].unfold(0, n, 1)                    # [N-n, n]: windows with a token after them
        hits = (windows == tokens[-n:]).all(dim=1).nonzero().flatten() + n  # where each continuation starts
        if not hits.numel():
            continue
        whole = hits[hits + k <= n_total]
        if whole.numel():
            return tokens[int(whole[-1]) : int(whole[-1]) + k].tolist()
        if n_total - int(hits[0]) > len(best):
            best = tokens[int(hits[0]) :].tolist()
    return best


class Drafter:
    """One request's guesses and what came of them (rank 0)."""

    def __init__(self, spec: Speculation, prompt: list[int]):
        self.spec = spec
        self._tokens = torch.empty(max(2 * len(prompt), 64), dtype=torch.long)
        self._tokens[: len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self._n = len(prompt)
        self.k = spec.k if spec.mode == "ngram" else 2  # auto starts small and grows with what is accepted
        self.drafted = self.accepted = self.verify_steps = 0
        self._kept = self._missed = 0.0  # auto: decayed counts of accepted guesses and of wrong ones
        self._wait = 0

    def add(self, token: int) -> None:
        if self._n == self._tokens.numel():
            grown = torch.empty(2 * self._n, dtype=torch.long)
            grown[: self._n] = self._tokens
            self._tokens = grown
        self._tokens[self._n] = token
        self._n += 1

    def propose(self, room: int, step_cost: float) -> list[int]:
        """Guesses for the next step, at most `room`; step_cost: the measured cost of one more
        query row in a step, relative to a plain decode step (auto weighs it against acceptance)."""
        k = min(self.k if self.spec.mode == "ngram" else self._auto_k(step_cost), room)
        if k <= 0:
            return []
        return prompt_lookup(self._tokens[: self._n], k)

    def _auto_k(self, step_cost: float) -> int:
        if self._wait > 0:
            self._wait -= 1
            return 1 if self._wait == 0 else 0  # a probe: one guess tells whether guessing pays again
        rate = (self._kept + 1.0) / (self._kept + self._missed + 2.0)  # per guess; one of each seen at first
        best, gain = 0, 1.0
        for k in range(1, self.spec.k + 1):  # tokens a step would give / what it would cost
            expected = (1 - rate ** (k + 1)) / (1 - rate) if rate < 1 else k + 1.0
            if expected / (1 + step_cost * k) > gain * MIN_GAIN:
                best, gain = k, expected / (1 + step_cost * k)
        if best == 0:
            self._wait = PROBE_EVERY  # not worth it now
        return best

    def verified(self, drafted: int, accepted: int) -> None:
        """A step checked `drafted` guesses and kept `accepted` of them."""
        if not drafted:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.verify_steps += 1
        self._kept = 0.9 * self._kept + accepted
        self._missed = 0.9 * self._missed + (accepted < drafted)

    def stats(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "verify_steps": self.verify_steps}
