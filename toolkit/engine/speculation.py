"""Speculation: guesses of a request's next tokens, checked by the engine's step in one forward.

A decode row carries its token and K guesses (q = K + 1 against the cache). Rank 0 chooses from
the row's logits token by token as plain decode would (the same processors, the same seeded
generator, one draw a token) and keeps a guess while it equals the token chosen in its place:
the answers are plain decode's, greedy or sampled (for sampling, speculative sampling's rule for
a one-token draft: keep guess d with probability p(d), else draw from p without d).

The guesses come from prompt lookup: what followed the latest earlier occurrence of the tail of
the prompt and answer so far. No model call. Rank 0 only. (A draft model's guesses for a sampled
request are drawn from its own distribution and checked by its rule: toolkit.engine.draft_model.)"""
from __future__ import annotations

import torch

from ..options import Speculation
from .draft_model import DraftModelDrafter

MAX_NGRAM, MIN_NGRAM = 4, 2
FORGET = 0.95              # auto: how much of what a kind of match did is kept per step it is not tried
MIN_GAIN = 1.05            # auto: what guessing must win (tokens a step over its cost), or no guess is made
AUTO_GUESSES = (1, 2, 4, 8)  # the numbers of guesses auto chooses between (at most its Speculation.k)


def prompt_lookup(tokens: torch.Tensor, k: int, max_ngram: int = MAX_NGRAM,
                  min_ngram: int = MIN_NGRAM) -> tuple[list[int], int]:
    """tokens [N] (int64, host) -> (up to k tokens that followed an earlier occurrence of the tail,
    what kind of match it was: 0 none, else 2 * the tail's length, plus 1 where the two latest
    occurrences went on alike, as in a loop or a passage quoted twice). The longest tail (max_ngram
    down to min_ngram tokens) whose latest occurrence has k tokens after it; else the occurrence
    with the most after it."""
    n_total, best = tokens.numel(), ([], 0)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n_total <= n:
            continue
        windows = tokens[:-1].unfold(0, n, 1)                    # [N-n, n]: windows with a token after them
        hits = (windows == tokens[-n:]).all(dim=1).nonzero().flatten() + n  # where each continuation starts
        if not hits.numel():
            continue
        whole = hits[hits + k <= n_total]
        if whole.numel():
            at = int(whole[-1])
            alike = len(whole) > 1 and torch.equal(tokens[int(whole[-2]) : int(whole[-2]) + k], tokens[at : at + k])
            return tokens[at : at + k].tolist(), 2 * n + alike
        if n_total - int(hits[0]) > len(best[0]):
            best = tokens[int(hits[0]) :].tolist(), 2 * n
    return best


class Drafter:
    """One request's guesses and what came of them (rank 0). auto keeps an acceptance rate per kind
    of match (a 4-token tail is surer than a 2-token one, one whose last two occurrences agree
    surer still): decayed counts of guesses kept and checked, which drift back to the prior while
    unused, so a kind of match that stopped paying is tried again after a while. A step of K
    guesses is expected to give 1 + share * K tokens: guesses tend to hold all together (a passage
    copied) or fail at once, more than each by its own chance."""

    sampled = False  # its guesses are point masses: a sampled request keeps plain sampling's tokens

    def __init__(self, spec: Speculation, prompt: list[int]):
        self.spec = spec
        self._tokens = torch.empty(max(2 * len(prompt), 64), dtype=torch.long)
        self._tokens[: len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self._n = len(prompt)
        self.drafted = self.accepted = self.verify_steps = 0
        self._kept = [0.0] * (2 * MAX_NGRAM + 2)     # per kind of match: decayed guesses kept
        self._checked = [0.0] * (2 * MAX_NGRAM + 2)  # ... and guesses checked
        self._matched = 0                          # the kind of match of the guesses out for checking

    def add(self, token: int) -> None:
        if self._n == self._tokens.numel():
            grown = torch.empty(2 * self._n, dtype=torch.long)
            grown[: self._n] = self._tokens
            self._tokens = grown
        self._tokens[self._n] = token
        self._n += 1

    def propose(self, room: int, step_cost) -> list[int]:
        """Guesses for the next step, at most `room`; step_cost(width): what a decode step `width`
        tokens wide costs over one a token wide (auto weighs it against what guesses keep)."""
        if room <= 0:
            return []
        guesses, self._matched = prompt_lookup(self._tokens[: self._n], min(self.spec.k, room))
        if self.spec.mode == "auto" and guesses:
            guesses = guesses[: self._auto_k(self._matched, len(guesses), step_cost)]
        return guesses

    def _auto_k(self, matched: int, most: int, step_cost) -> int:
        kept, checked = self._kept[matched], self._checked[matched]
        share = (kept + 1.0) / (checked + 2.0)  # of the guesses checked, those kept; a half at first
        best, gain = 0, MIN_GAIN
        for k in sorted({k for k in AUTO_GUESSES if k < most} | {most}):  # tokens a step gives / its cost
            if (1 + share * k) / step_cost(k + 1) > gain:
                best, gain = k, (1 + share * k) / step_cost(k + 1)
        if best == 0:  # not worth it now: what was seen fades, so this kind of match is tried again later
            self._kept[matched], self._checked[matched] = kept * FORGET, checked * FORGET
        return best

    def verified(self, drafted: int, accepted: int) -> None:
        """A step checked `drafted` guesses and kept `accepted` of them."""
        if not drafted:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.verify_steps += 1
        m = self._matched
        self._kept[m] = 0.9 * self._kept[m] + accepted
        self._checked[m] = 0.9 * self._checked[m] + drafted

    def stats(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "verify_steps": self.verify_steps}


def choose_checked(request, rows: torch.Tensor, guesses: list[int], take) -> int:
    """Rank 0: a decode row's logits [S, V] (after its token, then after each guess) -> its tokens,
    each chosen as plain decode would choose it (a sampled draft's: by its rule) and handed to
    take(token), while the guess in its place was that token -> how many guesses were kept."""
    accepted, drafter = 0, request.drafter
    choose = drafter.choose if drafter is not None and drafter.sampled else lambda _, row: request.choose(row)
    for i in range(rows.shape[0]):
        token = take(choose(request, rows[i]))
        if request.finish_reason is not None or i == len(guesses) or token != guesses[i]:
            break
        accepted += 1
    if drafter is not None:
        drafter.verified(len(guesses), accepted)
    return accepted


def make_drafter(spec: Speculation, prompt: list[int], draft_model=None, sampling=None):
    """The guesser of a request speculating by `spec` (None: it does not guess)."""
    if spec.mode == "draft":
        return DraftModelDrafter(spec, prompt, draft_model, sampling)
    return Drafter(spec, prompt) if spec.on else None
