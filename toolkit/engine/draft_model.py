"""Guesses from a small draft model (--draft-model PATH, --speculate draft[:K]): any causal LM with
the same vocabulary, run on rank 0 only (its guesses travel in the step's plan like every other
guess). It reads a few sink tokens and a recent window, so a guess costs the same after a million
tokens as after a thousand.

Greedy requests: each guess is the draft's most likely token (a one-token draft), kept while it is
the model's. Sampled requests: speculative sampling. The draft draws each guess from its own
distribution q (the request's processors applied to its logits); the model keeps a guess d with
probability min(1, p(d)/q(d)), else draws from max(0, p - q) normalised; its tokens follow p.
Every token of such a request, the first and the one after a step's last guess included, is chosen
by that rule, with draws seeded by (seed, position) and a window that depends on the position only:
so a seed gives the same answer whatever the number of guesses, the step budget or the company."""
from __future__ import annotations

import torch

DRAFT_SINK, DRAFT_WINDOW = 4, 1024  # tokens the draft model reads: the first few, and at most a window more
PROPOSE, CHECK = 0, 1               # the two draws made at each position of a sampled request


def position_generator(seed: int, position: int, draw: int) -> torch.Generator:
    """A generator for one draw of one position: the draw a seed makes there never depends on how
    many tokens the steps before it chose."""
    x = (seed * 0x9E3779B97F4A7C15 + 2 * position + draw) % 2**64  # splitmix64: every bit of the
    for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):  # seed reaches the low ones,
        x = ((x ^ (x >> shift)) * mul) % 2**64                              # which are all the generator keeps
    return torch.Generator().manual_seed((x ^ (x >> 31)) % 2**63)


def keep_or_redraw(p: torch.Tensor, q: torch.Tensor, guess: int, generator: torch.Generator) -> int:
    """Speculative sampling at one position: p, q [V] the model's and the draft's probabilities, guess
    drawn from q -> the token: guess with probability min(1, p/q), else a draw from max(0, p - q)
    normalised. The token follows p whatever q is."""
    if float(torch.rand((), generator=generator)) * float(q[guess]) < float(p[guess]):
        return guess
    rest = (p - q).clamp_min(0)
    if float(rest.sum()) <= 0:  # p equals q to rounding: a rejection has no mass left, so draw from p
        rest = p
    return int(torch.multinomial(rest, 1, generator=generator))


class DraftModelDrafter:
    """One request's draft-model guesses (rank 0)."""

    def __init__(self, spec, prompt: list[int], model, sampling=None, sink: int = DRAFT_SINK,
                 window: int = DRAFT_WINDOW):
        self.spec, self.model, self.sink, self.window = spec, model, sink, window
        self.sampled = sampling is not None and sampling.do_sample
        self.seed = sampling.seed if sampling is not None else 0
        self.processors = sampling.processors() if self.sampled else None
        self.tokens = list(prompt)
        self.drafted = self.accepted = self.verify_steps = 0
        self._cache, self._start, self._read = None, 0, 0  # what the cache holds: sink, then tokens[start:read]
        self._logits = None  # the draft's logits after the last token read
        self._proposals: dict[int, tuple[int, torch.Tensor]] = {}  # sampled: position -> (guess, q [V])

    def add(self, token: int) -> None:
        self.tokens.append(token)

    def _window_start(self, position: int) -> int:
        """Where, after the sink, the tokens the draft reads to guess `position` begin: it moves half a
        window at a time, so it depends on the position alone."""
        past = position - self.sink - self.window
        half = max(self.window // 2, 1)
        return self.sink if past <= 0 else self.sink + -(-past // half) * half

    @torch.no_grad()
    def _forward(self, ids: list[int], start: int) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = self.model(input_ids=torch.tensor([ids], device=device), cache=self._cache, use_cache=True,
                         position_ids=torch.arange(start, start + len(ids), device=device)[None], logits_to_keep=1)
        self._cache = out["cache"]
        return out.logits[0, -1].float()

    def _logits_after(self, seq: list[int]) -> torch.Tensor:
        """The draft's logits for the token after seq (self.tokens, then guesses): read what is new;
        where the window has moved, read the sink and the window again (positions from 0, as a
        streaming cache numbers them)."""
        start = self._window_start(len(seq))
        if self._cache is None or start != self._start or self._read > len(seq):
            self._cache, self._start = None, start
            self._logits = self._forward(seq[: self.sink] + seq[start:], 0)
        elif len(seq) > self._read:
            self._logits = self._forward(seq[self._read :], self._cache.get_seq_length())
        self._read = len(seq)
        return self._logits

    def _guess(self, seq: list[int]) -> int:
        """The draft's guess of the token after seq (sampled: drawn from q, which is kept for the check)."""
        logits = self._logits_after(seq)
        if not self.sampled:
            return int(logits.argmax())
        ids = torch.tensor([seq], device=logits.device)
        q = torch.softmax(self.processors(ids, logits[None]).float(), dim=-1)[0].cpu()
        guess = int(torch.multinomial(q, 1, generator=position_generator(self.seed, len(seq), PROPOSE)))
        self._proposals[len(seq)] = (guess, q)
        return guess

    def propose(self, room: int, step_cost=None) -> list[int]:
        """Up to min(k, room) guesses (sampled: and the draft's draw for the position after them, which
        the step's last token is checked against)."""
        k = max(min(self.spec.k, room), 0)
        if k == 0 and not self.sampled:
            return []
        self._proposals = {}
        seq, known = list(self.tokens), len(self.tokens)
        guesses = [self._guess(seq)]
        logits, start = self._logits, self._start  # the draft's state after the known tokens
        while len(guesses) < k + self.sampled:
            seq.append(guesses[-1])
            guesses.append(self._guess(seq))
        if self._start != start:  # the window moved among the guesses: read it again when next asked
            self._cache = None
        elif self._read > known:  # the guesses leave the draft's cache (a negative crop: that many off its end)
            self._cache.crop(known - self._read)
            self._read, self._logits = known, logits
        return guesses[:k]

    def choose(self, request, logits: torch.Tensor) -> int:
        """Sampled: the request's next token from the model's logits [V], by speculative sampling's rule
        against the draft's draw for this position (made now if no step drew one: the first token)."""
        position = request.length
        if position not in self._proposals:
            self._proposals = {}
            self._guess(self.tokens)
        guess, q = self._proposals.pop(position)
        p = torch.softmax(request.scores(logits).float(), dim=-1)[0].cpu()
        token = keep_or_redraw(p, q, guess, position_generator(self.seed, position, CHECK))
        if token != guess:  # the draws made after this guess assumed it
            self._proposals = {}
        return token

    def verified(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.drafted, self.accepted, self.verify_steps = (self.drafted + drafted, self.accepted + accepted,
                                                              self.verify_steps + 1)

    def stats(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "verify_steps": self.verify_steps}
