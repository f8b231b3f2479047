"""Guesses from a small draft model (--draft-model PATH, --speculate draft[:K]): any causal LM with
the same vocabulary, run on rank 0 only (its guesses travel in the step's plan like every other
guess). Its cache keeps a few sink tokens and a recent window, re-read from the tokens when the
window is full, so a guess costs the same after a million tokens as after a thousand.

Each guess is the draft's most likely token: a draft that is one token, so a sampled request keeps
a guess by the one-token rule (toolkit.engine.speculation) and its tokens are plain sampling's.
(Drafting by sampling the draft's own distribution, then keeping a guess with min(1, p/q), would
keep more guesses when the model is unsure; it is not done.)"""
from __future__ import annotations

import torch

DRAFT_SINK, DRAFT_WINDOW = 4, 1024  # tokens the draft model keeps: the first few, and the latest


class DraftModelDrafter:
    """One request's draft-model guesses (rank 0)."""

    def __init__(self, spec, prompt: list[int], model, sink: int = DRAFT_SINK, window: int = DRAFT_WINDOW):
        self.spec, self.model, self.sink, self.window = spec, model, sink, window
        self.tokens = list(prompt)
        self.drafted = self.accepted = self.verify_steps = 0
        self._cache = None
        self._read = 0      # tokens of self.tokens the cache has read
        self._logits = None  # the draft's logits after the last token read

    def add(self, token: int) -> None:
        self.tokens.append(token)

    @torch.no_grad()
    def _forward(self, ids: list[int], start: int) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = self.model(input_ids=torch.tensor([ids], device=device), cache=self._cache, use_cache=True,
                         position_ids=torch.arange(start, start + len(ids), device=device)[None], logits_to_keep=1)
        self._cache = out["cache"]
        return out.logits[0, -1].float()

    def _catch_up(self) -> None:
        """Read the tokens chosen since the last guess; past the window, start again from the sink
        tokens and the latest window (positions renumbered from 0, as a streaming cache does)."""
        new = self.tokens[self._read :]
        if self._cache is None or self._cache.get_seq_length() + len(new) > self.sink + self.window:
            # half a window kept: the next rebuild is half a window of tokens away
            kept = self.tokens[: self.sink] + self.tokens[max(self.sink, len(self.tokens) - self.window // 2) :]
            self._cache = None
            self._logits = self._forward(kept, 0)
        elif new:
            self._logits = self._forward(new, self._cache.get_seq_length())
        self._read = len(self.tokens)

    def propose(self, room: int, step_cost=None) -> list[int]:
        k = min(self.spec.k, room)
        if k <= 0:
            return []
        self._catch_up()
        length, logits, guesses = self._cache.get_seq_length(), self._logits, []
        for i in range(k):
            guesses.append(int(logits.argmax()))
            if i + 1 < k:
                logits = self._forward(guesses[-1:], length + i)
        extra = self._cache.get_seq_length() - length
        if extra:  # the guesses leave the draft's cache (a negative crop: that many off its end)
            self._cache.crop(-extra)
        return guesses

    def verified(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.drafted, self.accepted, self.verify_steps = (self.drafted + drafted, self.accepted + accepted,
                                                              self.verify_steps + 1)

    def stats(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "verify_steps": self.verify_steps}
