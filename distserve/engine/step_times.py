"""How long an engine step takes for the tokens in it, measured online, and the prompt-chunk budget a
TPOT target leaves in a step of running decodes.

Lifecycle: the engine calls `StepTimes.observe(tokens, seconds)` after every step it runs (tokens: the
decode tokens plus the prompt-chunk tokens of the step; seconds: schedule to sampled tokens), and
`chunk_budget` before every chunked step that carries running decodes. A worker publishes the fit
(`StepFit`) in its registry load, so routers can predict how long a prompt takes there.

The fit is step_s = a + b * tokens, by weighted least squares over size buckets: steps are grouped by
the bit length of their token count (1, 2-3, 4-7, ... tokens), each bucket keeps an exponentially
weighted mean of its tokens and seconds, and the line goes through the buckets' means (weight: the
bucket's sample count, capped, so a bucket seen once counts less than one seen often). Buckets make the
fit robust to what a busy worker sees most: thousands of decode steps of one batch size would
otherwise pin the line to one point and leave its slope to noise; a bucket still holds the last
calibration or chunked steps of other sizes, and each is refreshed as steps of its size run again.
With one bucket only (or a slope that comes out <= 0), the fit is proportional (a = 0), which
over-estimates a prompt token's cost: the budget errs towards protecting TPOT.

Decode tokens cost a little more than prompt tokens (each samples through the LM head and attends to
its whole context), so a line fitted mostly on decode steps over-estimates chunk cost; batched prompt
tokens also use the GEMMs better. Both err on the side of the TPOT target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

ALPHA = 0.2  # weight of a new step in its bucket's means
MAX_WEIGHT = 20  # a bucket's weight in the fit: its samples, at most this

# (running decodes, tokens of their contexts in all, prompt-chunk tokens) -> predicted step seconds;
# None when nothing is known yet
StepPredictor = Callable[[int, int, int], "float | None"]


@dataclass(frozen=True, slots=True)
class StepFit:
    """step_s = fixed_s + token_s * tokens."""

    fixed_s: float  # a: what a step costs whatever its size (scheduling, sampling set-up, Python)
    token_s: float  # b: what each token in it adds

    def seconds(self, tokens: int) -> float:
        return self.fixed_s + self.token_s * tokens


class StepTimes:
    """The online fit of one engine's step times; written by the engine thread, read from any."""

    def __init__(self, alpha: float = ALPHA):
        self.alpha = alpha
        self._buckets: dict[int, list[float]] = {}  # bit length of tokens -> [mean tokens, mean seconds, samples]
        self.fit: StepFit | None = None  # replaced whole after each observation (readers see one or the other)
        self.steps = 0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or not seconds > 0 or not math.isfinite(seconds):
            return
        self.steps += 1
        b = self._buckets.get(tokens.bit_length())
        if b is None:
            self._buckets[tokens.bit_length()] = [float(tokens), seconds, 1]
        else:
            b[0] += self.alpha * (tokens - b[0])
            b[1] += self.alpha * (seconds - b[1])
            b[2] += 1
        self.fit = fit_line([(t, s, min(n, MAX_WEIGHT)) for t, s, n in self._buckets.values()])

    def predict(self, decodes: int, context_tokens: int, chunk_tokens: int) -> float | None:
        """A `StepPredictor`: the line at decodes + chunk tokens (context is not in the line)."""
        fit = self.fit
        return None if fit is None else fit.seconds(decodes + chunk_tokens)


def fit_line(points: list[tuple[float, float, float]]) -> StepFit | None:
    """Weighted least squares of seconds = a + b * tokens over (tokens, seconds, weight), with a, b >= 0."""
    w = sum(p[2] for p in points)
    if not points or w <= 0:
        return None
    sx = sum(p[2] * p[0] for p in points)
    sy = sum(p[2] * p[1] for p in points)
    sxx = sum(p[2] * p[0] * p[0] for p in points)
    sxy = sum(p[2] * p[0] * p[1] for p in points)
    den = w * sxx - sx * sx
    if len(points) >= 2 and den > 1e-12 * w * sxx:
        b = (w * sxy - sx * sy) / den
        a = (sy - b * sx) / w
        if b > 0 and a >= 0:
            return StepFit(a, b)
        if b > 0:  # a negative intercept: the line through the origin instead
            return StepFit(0.0, sxy / sxx)
    return StepFit(0.0, sy / sx)  # one size seen (or no positive slope): proportional, erring high per token


def chunk_budget(predict: StepPredictor, target_s: float, decodes: int, context_tokens: int, max_chunk: int,
                 floor: int) -> int:
    """The most prompt tokens a step of `decodes` running sequences may carry with its predicted time
    within `target_s`: between `floor` (so a prompt always advances, even when the decodes alone take
    longer than the target) and `max_chunk`. Unknown predictions (nothing measured yet) cap nothing."""
    if max_chunk <= floor:
        return max(0, max_chunk)
    if predict(decodes, context_tokens, max_chunk) is None:
        return max_chunk
    lo, hi = floor, max_chunk  # predict is non-decreasing in chunk tokens: bisect for the last that fits
    if predict(decodes, context_tokens, hi) <= target_s:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if predict(decodes, context_tokens, mid) <= target_s:
            lo = mid
        else:
            hi = mid
    return lo
