"""How long an engine step takes for the tokens in it, measured online, and the prompt-chunk budget a
TPOT target leaves in a step of running decodes.

Lifecycle: the engine calls `StepTimes.observe(decodes, prompt_tokens, seconds)` after every step it
runs (decodes: running sequences that got one token each; prompt_tokens: the prompt-chunk tokens of
the step and its speculative draft rows, which cost what a chunk's token does; seconds: schedule to
sampled tokens), and `chunk_budget` before every chunked step that
carries running decodes. A worker publishes the fit (`StepFit`) in its registry load, so routers can
predict how long a prompt takes there. The engine also adds each step to a `StepAccount`, where its
time went by what the steps carried, which workers export (`distserve_engine_busy_seconds_total`).

The model is step_s = a + b_d * decodes + b_p * prompt_tokens. Decode and prompt tokens are apart
because they cost differently, and not in one direction everywhere: a decode token attends to its
whole context and samples through the LM head, a prompt token runs in a GEMM that batches better but
(on some CPUs, int8) through a slower kernel path; on the 2-core EPYC of 2026-12-03 with SmolLM2 int8
a prompt token cost about 2 ms and a decode token in a batch of 8 to 16 about 1 to 3 ms.

The fit is a weighted least squares on relative error over size buckets: steps are grouped by the bit
lengths of their decodes and prompt tokens (1, 2-3, 4-7, ...), each bucket keeps the running mean of
its first samples, then an exponentially weighted mean, of decodes, prompt tokens and seconds, and the
plane goes through the buckets' means (weight: the bucket's samples, capped, so a bucket seen once
counts less than one seen often, and the size a busy worker runs thousands of times does not pin the
fit to one point). Relative error keeps the rare long steps (a 2048-token chunk, whose attention grows
with the square of its length) from bending the fit where budgets are decided, at tens of tokens.
Coefficients are never negative: the fit with the least error among those without a negative one wins
(a dropped coefficient is 0); a kind of token never seen costs what the other kind does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

CREDIT_STEPS = 4  # BlockCredit: a prompt advances by a block at least every this many steps
ALPHA = 0.2  # weight of a new step in its bucket's means, once the bucket has 1/ALPHA samples
MAX_WEIGHT = 20  # a bucket's weight in the fit: its samples, at most this
REFIT_STEPS = 8  # the fit is recomputed at most every this many observed steps (and when first read)

STEP_KINDS = ("decode", "mixed", "prefill")  # what a step carried: running decodes only, both, prompt chunks only

# (running decodes, tokens of their contexts in all, prompt-chunk tokens) -> predicted step seconds;
# None when nothing is known yet
StepPredictor = Callable[[int, int, int], "float | None"]


@dataclass(frozen=True, slots=True)
class StepFit:
    """step_s = fixed_s + decode_s * decodes + token_s * prompt tokens."""

    fixed_s: float  # a: what a step costs whatever its size (scheduling, sampling set-up, Python)
    token_s: float  # b_p: what each prompt token in it adds
    decode_s: float  # b_d: what each running sequence's decode token adds

    def seconds(self, decodes: int, prompt_tokens: int) -> float:
        return self.fixed_s + self.decode_s * decodes + self.token_s * prompt_tokens


class StepAccount:
    """Where an engine's time went since it started: seconds and steps by STEP_KINDS, and the prompt
    tokens its steps computed (prefix-cache hits excluded). Written by the engine thread; `snapshot`
    gives immutable copies for any other."""

    __slots__ = ("seconds", "steps", "prompt_tokens")

    def __init__(self):
        self.seconds = [0.0] * len(STEP_KINDS)
        self.steps = [0] * len(STEP_KINDS)
        self.prompt_tokens = 0

    def add(self, decodes: int, prompt_tokens: int, seconds: float) -> None:
        if decodes + prompt_tokens <= 0 or not seconds >= 0:
            return
        kind = 0 if not prompt_tokens else 1 if decodes else 2
        self.seconds[kind] += seconds
        self.steps[kind] += 1
        self.prompt_tokens += prompt_tokens

    def snapshot(self) -> tuple[tuple[float, ...], tuple[int, ...], int]:
        return tuple(self.seconds), tuple(self.steps), self.prompt_tokens


class StepTimes:
    """The online fit of one engine's step times; written by the engine thread, read from any."""

    def __init__(self, alpha: float = ALPHA):
        self.alpha = alpha
        # (bit length of decodes, of prompt tokens) -> [mean decodes, mean prompt tokens, mean seconds, samples]
        self._buckets: dict[tuple[int, int], list[float]] = {}
        self._fit: StepFit | None = None
        self._stale = 0  # steps observed since the last fit
        self.steps = 0

    def observe(self, decodes: int, prompt_tokens: int, seconds: float) -> None:
        if decodes < 0 or prompt_tokens < 0 or decodes + prompt_tokens == 0 or not seconds > 0 or not math.isfinite(seconds):
            return
        self.steps += 1
        key = (decodes.bit_length(), prompt_tokens.bit_length())
        b = self._buckets.get(key)
        if b is None:
            self._buckets[key] = [float(decodes), float(prompt_tokens), seconds, 1]
        else:
            b[3] += 1
            w = max(self.alpha, 1.0 / b[3])  # a plain mean of the first samples, then recent ones weigh more
            b[0] += w * (decodes - b[0])
            b[1] += w * (prompt_tokens - b[1])
            b[2] += w * (seconds - b[2])
        self._stale += 1
        if self._fit is None or self._stale >= REFIT_STEPS:
            self.refit()

    def reset(self) -> None:
        """Forgets every step (after a first pass of calibration, whose steps pay one-time costs)."""
        self._buckets.clear()
        self._fit = None
        self._stale = 0

    def refit(self) -> None:
        self._stale = 0
        self._fit = fit_plane([(d, p, s, min(n, MAX_WEIGHT)) for d, p, s, n in self._buckets.values()])

    @property
    def fit(self) -> StepFit | None:
        if self._stale:
            self.refit()
        return self._fit

    def predict(self, decodes: int, context_tokens: int, chunk_tokens: int) -> float | None:
        """A `StepPredictor` (context is not in the model)."""
        fit = self._fit  # the engine thread calls this between refits: the last fit is recent enough
        return None if fit is None else fit.seconds(decodes, chunk_tokens)


def _solve(rows: list[tuple[list[float], float]], cols: tuple[int, ...]) -> list[float] | None:
    """Weighted least squares of y on the chosen columns of x, by the normal equations; None when singular."""
    k = len(cols)
    m = [[0.0] * (k + 1) for _ in range(k)]
    for x, w in rows:
        for i, ci in enumerate(cols):
            for j, cj in enumerate(cols):
                m[i][j] += w * x[ci] * x[cj]
            m[i][k] += w * x[ci]  # y = 1: relative error
    for c in range(k):  # Gauss-Jordan with partial pivoting
        piv = max(range(c, k), key=lambda r: abs(m[r][c]))
        scale = max(abs(m[r][c]) for r in range(k)) or 1.0
        if abs(m[piv][c]) <= 1e-12 * scale:
            return None
        m[c], m[piv] = m[piv], m[c]
        for r in range(k):
            if r != c:
                f = m[r][c] / m[c][c]
                for j in range(c, k + 1):
                    m[r][j] -= f * m[c][j]
    return [m[i][k] / m[i][i] for i in range(k)]


def fit_plane(points: list[tuple[float, float, float, float]]) -> StepFit | None:
    """The non-negative least-squares fit, on relative error, of seconds = a + b_d * decodes + b_p *
    prompt_tokens over (decodes, prompt_tokens, seconds, weight) points."""
    points = [p for p in points if p[2] > 0 and p[3] > 0]
    if not points:
        return None
    seen_d = any(p[0] > 0 for p in points)
    seen_p = any(p[1] > 0 for p in points)
    # each row x / s against 1: minimises sum w * ((a + b_d d + b_p p - s) / s)^2
    rows = [([1 / s, d / s, p / s], w) for d, p, s, w in points]
    usable = [0] + ([1] if seen_d else []) + ([2] if seen_p else [])
    best, best_err = None, math.inf
    for k in range(len(usable), 0, -1):
        for cols in itertools.combinations(usable, k):
            if cols == (0,):
                continue  # a constant alone says nothing about tokens
            coef = _solve(rows, cols)
            if coef is None or any(c < 0 for c in coef):
                continue
            full = [0.0, 0.0, 0.0]
            for c, v in zip(cols, coef):
                full[c] = v
            err = sum(w * (x[0] * full[0] + x[1] * full[1] + x[2] * full[2] - 1) ** 2 for x, w in rows)
            if err < best_err * (1 - 1e-9):
                best, best_err = full, err
    if best is None:
        return None
    a, b_d, b_p = best
    if not seen_d or (b_d == 0 and 1 not in usable):
        b_d = b_p
    if not seen_p:
        b_p = b_d
    return StepFit(a, b_p, b_d)


def chunk_budget(predict: StepPredictor, target_s: float, decodes: int, context_tokens: int, max_chunk: int) -> int:
    """The most prompt tokens (0 to `max_chunk`) a step of `decodes` running sequences may carry with
    its predicted time within `target_s`: 0 when the decodes alone (and one prompt token) pass it.
    Unknown predictions (nothing measured yet) cap nothing."""
    if max_chunk <= 0:
        return 0
    top = predict(decodes, context_tokens, max_chunk)
    if top is None or top <= target_s:
        return max_chunk
    lo, hi = 0, max_chunk  # predict is non-decreasing in chunk tokens: bisect for the last that fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if predict(decodes, context_tokens, mid) <= target_s:
            lo = mid
        else:
            hi = mid
    return lo


class BlockCredit:
    """A step's prompt-token cap from its budget under a TPOT target (`chunk_budget`), where chunks
    come in blocks: the budget when it holds a block; else 0 until the budgets of the steps since the
    last block add up to one (at least block / CREDIT_STEPS a step, so a prompt never stalls), then a
    block. One per engine (and per simulated engine in the planner), called once a step."""

    __slots__ = ("tokens",)

    def __init__(self):
        self.tokens = 0.0  # budgets of the steps since the last block carried below the budget

    def cap(self, budget: int, block: int) -> int:
        if budget >= block:
            self.tokens = 0.0
            return budget
        self.tokens += max(budget, block / CREDIT_STEPS)
        if self.tokens >= block:
            self.tokens -= block
            return block
        return 0
