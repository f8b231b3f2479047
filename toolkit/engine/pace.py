"""Rank 0's measure of what a step costs, so that a latency goal becomes a prefill budget and
guessing is weighed against what it costs here.

A step's prefill part is not proportional to its tokens: a step of prefill alone is a forward,
which reads every weight whatever its length (on 2 CPU cores, tens of milliseconds); beside
decoding requests its chunks share their forward (toolkit.engine.packed), but each chunk's
attention is its own call per layer, and grows with the keys before it. So its time is fit as
    seconds = F * alone + c * chunks + a * tokens + b * pairs,
alone being 1 where the step decoded nothing, pairs the token-key pairs its attention computes
(sum of n * (start + n / 2) over its chunks), by least squares over recent steps, older ones
weighing less. With one rate per token, a budget learnt from long chunks overran the goal by a
quarter on short ones, and one learnt at the start of a long prompt fell behind as its keys grew.

Pure Python: no torch (tests/test_scheduler.py)."""
from __future__ import annotations

MIN_PREFILL_TOKENS = 16
ROW_COST_PRIOR = 0.1  # until measured: a decode step's cost grows by a tenth per guessed token its rows carry
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)  # decode rows of a step, bucketed
WIDTHS = (1, 2, 3, 5, 9, 17)  # step widths (a row's token and its guesses) whose cost is learnt: each up to the next
FORGET = 0.9      # each older step weighs this much less in the prefill fit
PAIRS_UNIT = 1e6  # the fit counts token-key pairs in millions (its terms of like size)
RIDGE = 1e-3      # pull towards one rate per token, relative to each term's weight: few steps stay sane
TERMS = 4         # alone, chunks, tokens, pairs
TOKENS = 2        # the term one rate per token stands for


def _bucket(value: int, buckets) -> int:
    return next((b for b in buckets if b >= value), buckets[-1])


def _solve(m: list[list[float]], y: list[float]) -> list[float] | None:
    """m x = y for a small square m (Gaussian elimination with pivoting); None when singular."""
    n = len(y)
    a = [row[:] + [v] for row, v in zip(m, y)]
    for c in range(n):
        pivot = max(range(c, n), key=lambda r: abs(a[r][c]))
        if abs(a[pivot][c]) < 1e-300:
            return None
        a[c], a[pivot] = a[pivot], a[c]
        for r in range(n):
            if r != c:
                f = a[r][c] / a[c][c]
                a[r] = [x - f * z for x, z in zip(a[r], a[c])]
    return [a[r][n] / a[r][r] for r in range(n)]


class PrefillFit:
    """seconds = F * alone + c * chunks + a * tokens + b * pairs, by exponentially weighted least squares."""

    def __init__(self):
        self.xx = [[0.0] * TERMS for _ in range(TERMS)]
        self.xy = [0.0] * TERMS
        self.rate: float | None = None  # seconds per token, one rate: the prior, and the fit's stand-in

    def add(self, chunks: list[tuple[int, int]], seconds: float, alone: bool = False) -> None:
        """A step's prefill chunks (start, tokens) took `seconds` (alone: a forward of their own)."""
        tokens = sum(n for _, n in chunks)
        x = [float(alone), float(len(chunks)), float(tokens), sum(n * (s + n / 2) for s, n in chunks) / PAIRS_UNIT]
        for i in range(TERMS):
            self.xy[i] = FORGET * self.xy[i] + x[i] * seconds
            for j in range(TERMS):
                self.xx[i][j] = FORGET * self.xx[i][j] + x[i] * x[j]
        rate = max(seconds, 0.0) / tokens
        self.rate = rate if self.rate is None else 0.8 * self.rate + 0.2 * rate

    def coefficients(self) -> tuple[float, ...] | None:
        """(F, c, a, b per pair), none negative; None before any step."""
        if self.rate is None:
            return None
        prior = [self.rate if i == TOKENS else 0.0 for i in range(TERMS)]
        ridge = [RIDGE * self.xx[i][i] + 1e-12 for i in range(TERMS)]  # each term's own scale
        m = [[self.xx[i][j] + (ridge[i] if i == j else 0.0) for j in range(TERMS)] for i in range(TERMS)]
        fit = _solve(m, [self.xy[i] + ridge[i] * prior[i] for i in range(TERMS)])
        if fit is None or fit[TOKENS] <= 0:
            return 0.0, 0.0, self.rate, 0.0
        f, c, a, b = (max(v, 0.0) for v in fit)
        return f, c, a, b / PAIRS_UNIT

    def tokens_within(self, seconds: float, position: int) -> int | None:
        """The most tokens of one chunk starting at `position`, beside decoding requests, that the fit
        says take at most `seconds`."""
        coef = self.coefficients()
        if coef is None:
            return None
        _, c, a, b = coef
        left = seconds - c
        if left <= 0:
            return 0
        linear = a + b * position  # left = (b / 2) n^2 + linear * n, solved in the form that stays exact as b -> 0
        return int(2 * left / max(linear + (linear * linear + 2 * b * left) ** 0.5, 1e-12))


class Pace:
    """Rank 0's step times: the prefill fit above and decode steps' (moving averages, by rows and
    by width: on CPUs a step two tokens wide costs much more than one token, and 9 about as much as 2)."""

    def __init__(self):
        self.prefill = PrefillFit()
        self.decode_s: float | None = None
        self.plain: dict[int, float] = {}              # rows (bucketed) -> seconds of a decode step one token wide
        self.wide: dict[tuple[int, int], float] = {}   # (rows, width), bucketed -> its time over a plain step's

    def measure(self, decoded: int, chunks: list[tuple[int, int]], seconds: float, width: int = 1) -> None:
        """A step's time: `decoded` rows `width` tokens wide, prefill chunks (start, tokens)."""
        if not chunks:
            if decoded:
                rows = _bucket(decoded, ROWS)
                if width == 1:
                    self.decode_s = seconds if self.decode_s is None else 0.8 * self.decode_s + 0.2 * seconds
                    old = self.plain.get(rows)
                    self.plain[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds
                elif rows in self.plain:  # over a plain step's time as it is now: a ratio that stays true
                    key, ratio = (rows, _bucket(width, WIDTHS)), seconds / self.plain[rows]
                    self.wide[key] = ratio if key not in self.wide else 0.8 * self.wide[key] + 0.2 * ratio
            return
        if sum(n for _, n in chunks):
            self.prefill.add(chunks, seconds - (self.decode_s or 0.0) if decoded else seconds, alone=not decoded)

    def width_cost(self, rows: int, width: int) -> float:
        """A decode step of `rows` rows `width` tokens wide over the same rows one token wide: measured
        where it was, else the prior (which makes a width not yet tried worth trying)."""
        ratio = self.wide.get((_bucket(rows, ROWS), _bucket(width, WIDTHS))) if width > 1 else 1.0
        return max(ratio, 1.0) if ratio is not None else 1.0 + ROW_COST_PRIOR * (width - 1)

    def prefill_budget(self, max_itl_ms: float | None, position: int = 0, floor: int = MIN_PREFILL_TOKENS) -> int | None:
        """Prefill tokens that keep a step within max_itl_ms beside the decoding requests, for a chunk
        starting at `position` (at least `floor`: a prompt always progresses, if slowly, whatever the goal)."""
        if max_itl_ms is None:
            return None
        fit = self.prefill.tokens_within(max_itl_ms / 1000.0 - (self.decode_s or 0.0), position)
        return None if fit is None else max(floor, fit)
