"""The latency model of one engine step, in the form of the DistServe paper (appendix A), and its fit.

A step runs prompt pieces (chunks) and decode tokens together; its time in seconds is

    prefill part:  a_p + b_p * sum(chunk tokens) + c_p * sum(end^2 - start^2) + d_p * chunks
    decode part:   a_d + b_d * sum(context) + c_d * batch        (batch >= large_batch: the large set)

A prefill-only step is the prefill part, a decode-only step the decode part. A full prompt of l tokens
is the chunk (0, l), so sum(end^2 - start^2) is the paper's sum(l^2): attention over a prompt grows
with its square, the linear layers with its tokens. `d_p` is one term beyond the paper's: each prompt
samples a token through the LM head, which on a CPU with a 49k-token vocabulary is a cost per prompt,
not per token. The decode part is the reference fit's own form (a + b * sum(n_i) + c * B, where n_i is
the context a request's new token attends to), so the authors' A100 coefficients load as they are.
A mixed step (chunked prefill) is the prefill part plus the decode part without its intercept: one
forward pass, one fixed cost. Where one set of coefficients cannot fit a phase, the fit splits it in
two at a threshold, as the reference fit does for decode batch sizes: decode by batch size, prefill by
the prompt tokens in the step. Pipeline parallelism divides a step's time among its stages
(`StepModel.pp`), as the paper's simulator does; the simulator pipelines the stages.

`fit_phase` fits one phase's coefficients by least squares on relative error (every coefficient >= 0)
and reports its mean and max relative error on the points it was fitted to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

PREFILL_TERMS = ("fixed", "tokens", "squared_tokens", "prompts")
DECODE_TERMS = ("fixed", "context_tokens", "batch")


@dataclass(frozen=True, slots=True)
class StepModel:
    """Seconds per engine step of one instance (one worker, or one tensor-parallel group)."""

    prefill: tuple[float, ...]  # a_p, b_p, c_p[, d_p]: see PREFILL_TERMS
    decode: tuple[float, float, float]  # a_d, b_d, c_d below large_batch: see DECODE_TERMS
    decode_large: tuple[float, float, float] | None = None  # the same from large_batch up (None: one set)
    large_batch: int = 1 << 30  # batch size from which decode_large applies
    pp: int = 1  # pipeline stages: each runs 1/pp of a step
    prefill_large: tuple[float, ...] | None = None  # the prefill set from large_tokens prompt tokens in a step up
    large_tokens: int = 1 << 30

    def _prefill_coef(self, tokens: int) -> tuple[float, ...]:
        if self.prefill_large is not None and tokens >= self.large_tokens:
            return self.prefill_large
        return self.prefill

    def _prefill(self, chunks: Sequence[tuple[int, int]]) -> tuple[float, float]:
        """(intercept, the rest) of a step's prefill part."""
        tokens = sum(e - s for s, e in chunks)
        p = self._prefill_coef(tokens)
        squares = sum(e * e - s * s for s, e in chunks)
        t = p[1] * tokens + p[2] * squares
        if len(p) > 3:
            t += p[3] * len(chunks)
        return p[0], t

    def _decode_coef(self, batch: int) -> tuple[float, float, float]:
        if self.decode_large is not None and batch >= self.large_batch:
            return self.decode_large
        return self.decode

    def prefill_s(self, chunks: Sequence[tuple[int, int]]) -> float:
        """A step of prompt chunks (start, end) alone."""
        return sum(self._prefill(chunks)) / self.pp

    def decode_s(self, batch: int, context_tokens: int) -> float:
        """A step of `batch` decode tokens attending to `context_tokens` in all (each its whole context)."""
        a, b, c = self._decode_coef(batch)
        return (a + b * context_tokens + c * batch) / self.pp

    def step_s(self, chunks: Sequence[tuple[int, int]], batch: int, context_tokens: int) -> float:
        """Any step: prompt chunks and decode tokens together."""
        if not chunks:
            return self.decode_s(batch, context_tokens) if batch else 0.0
        t = sum(self._prefill(chunks))
        if batch:
            _, b, c = self._decode_coef(batch)
            t += b * context_tokens + c * batch
        return t / self.pp

    def scaled(self, prefill: float = 1.0, decode: float = 1.0) -> StepModel:
        """Every prefill coefficient times `prefill`, every decode one times `decode`."""
        times = lambda f, xs: tuple(f * x for x in xs) if xs is not None else None  # noqa: E731
        return replace(self, prefill=times(prefill, self.prefill), decode=times(decode, self.decode),
                       decode_large=times(decode, self.decode_large), prefill_large=times(prefill, self.prefill_large))

    def with_pp(self, pp: int) -> StepModel:
        return replace(self, pp=pp)

    def to_dict(self) -> dict:
        d = {"prefill": list(self.prefill), "decode": list(self.decode)}
        if self.decode_large is not None:
            d |= {"decode_large": list(self.decode_large), "large_batch": self.large_batch}
        if self.prefill_large is not None:
            d |= {"prefill_large": list(self.prefill_large), "large_tokens": self.large_tokens}
        return d

    @classmethod
    def from_dict(cls, d: dict, scale: float = 1.0) -> StepModel:
        """From `to_dict`'s form; `scale` converts units (0.001 for coefficients in milliseconds)."""
        large, plarge = d.get("decode_large"), d.get("prefill_large")
        return cls(
            tuple(scale * x for x in d["prefill"]),
            tuple(scale * x for x in d["decode"]),
            tuple(scale * x for x in large) if large is not None else None,
            int(d.get("large_batch", 1 << 30)),
            prefill_large=tuple(scale * x for x in plarge) if plarge is not None else None,
            large_tokens=int(d.get("large_tokens", 1 << 30)),
        )


# -- fitting ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrefillPoint:
    """One measured prefill step: the prompt lengths it ran and its median time."""

    lengths: tuple[int, ...]
    seconds: float

    def features(self) -> list[float]:
        return [1.0, float(sum(self.lengths)), float(sum(x * x for x in self.lengths)), float(len(self.lengths))]


@dataclass(frozen=True, slots=True)
class DecodePoint:
    """One measured decode step: batch size, total context and its median time."""

    batch: int
    context_tokens: int
    seconds: float

    def features(self) -> list[float]:
        return [1.0, float(self.context_tokens), float(self.batch)]


@dataclass(frozen=True, slots=True)
class MixedPoint:
    """One measured mixed step (chunked prefill): a prompt chunk beside a decode batch."""

    chunks: tuple[tuple[int, int], ...]
    batch: int
    context_tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class FitError:
    mean_rel: float  # mean |predicted - measured| / measured
    max_rel: float  # the largest of them
    points: int

    def to_dict(self) -> dict:
        return {"mean_rel_err": round(self.mean_rel, 4), "max_rel_err": round(self.max_rel, 4), "points": self.points}


def rel_errors(predicted: Sequence[float], measured: Sequence[float]) -> FitError:
    errs = [abs(p - m) / m for p, m in zip(predicted, measured) if m > 0]
    if not errs:
        return FitError(math.nan, math.nan, 0)
    return FitError(sum(errs) / len(errs), max(errs), len(errs))


def nonneg_lstsq_rel(x: np.ndarray, y: np.ndarray, keep: Sequence[int] = (0,)) -> np.ndarray:
    """Coefficients >= 0 minimising the squared relative error sum(((x @ w) - y) / y)^2.

    Terms whose unconstrained fit comes out negative are dropped (set to 0) one at a time, the most
    negative first, and the rest refitted; the terms in `keep` are dropped last."""
    weights = 1.0 / y
    xw, yw = x * weights[:, None], y * weights
    active = list(range(x.shape[1]))
    while True:
        w = np.zeros(x.shape[1])
        sol, *_ = np.linalg.lstsq(xw[:, active], yw, rcond=None)
        w[active] = sol
        neg = [i for i in active if w[i] < 0]
        if not neg:
            return w
        droppable = [i for i in neg if i not in keep] or neg
        active.remove(min(droppable, key=lambda i: w[i]))
        if not active:
            return np.zeros(x.shape[1])


@dataclass(slots=True)
class PhaseFit:
    """Fitted coefficients of one phase with their error on the measured points."""

    coef: tuple[float, ...]
    error: FitError
    large: tuple[float, ...] | None = None  # the second set (decode: large batches; prefill: many tokens)
    large_batch: int = 1 << 30  # where it starts (decode: batch size; prefill: prompt tokens in the step)
    note: str = ""
    predicted: list[float] = field(default_factory=list)


def fit_prefill(points: Sequence[PrefillPoint], per_prompt_term: bool = True, split_if_max_err_over: float = 0.15) -> PhaseFit:
    """One coefficient set, or two (below / from a threshold of prompt tokens per step) when one set's
    max relative error exceeds `split_if_max_err_over` and a split lowers it: an engine whose kernels
    change regime with the step's size (int8 on CPU slows per token from ~512 tokens a step)."""
    x = np.array([p.features() for p in points])
    y = np.array([p.seconds for p in points])
    if not per_prompt_term:
        x = x[:, :3]
    w = nonneg_lstsq_rel(x, y)
    pred = x @ w
    best = PhaseFit(tuple(float(v) for v in w), rel_errors(list(pred), list(y)), predicted=list(pred))
    if best.error.max_rel <= split_if_max_err_over:
        return best
    totals = np.array([sum(p.lengths) for p in points])
    for threshold in sorted(set(totals.tolist()))[2:]:
        lo = totals < threshold
        if lo.sum() < 4 or (~lo).sum() < 4:
            continue
        w_lo = nonneg_lstsq_rel(x[lo], y[lo])
        w_hi = nonneg_lstsq_rel(x[~lo], y[~lo])
        pred = np.where(lo, x @ w_lo, x @ w_hi)
        err = rel_errors(list(pred), list(y))
        if err.max_rel < best.error.max_rel * 0.8:
            best = PhaseFit(tuple(float(v) for v in w_lo), err, tuple(float(v) for v in w_hi), int(threshold),
                            note=f"two sets, split at {int(threshold)} prompt tokens per step", predicted=list(pred))
    return best


def fit_decode(points: Sequence[DecodePoint], split_if_max_err_over: float = 0.15) -> PhaseFit:
    """One coefficient set, or two (below / from a batch-size threshold, as the reference fit has)
    when one set's max relative error exceeds `split_if_max_err_over` and a split lowers it."""
    x = np.array([p.features() for p in points])
    y = np.array([p.seconds for p in points])
    w = nonneg_lstsq_rel(x, y)
    pred = x @ w
    best = PhaseFit(tuple(float(v) for v in w), rel_errors(list(pred), list(y)), predicted=list(pred))
    if best.error.max_rel <= split_if_max_err_over:
        return best
    batches = sorted({p.batch for p in points})
    for threshold in batches[2:-1]:  # at least two batch sizes on each side
        lo = np.array([p.batch < threshold for p in points])
        if lo.sum() < 3 or (~lo).sum() < 3:
            continue
        w_lo = nonneg_lstsq_rel(x[lo], y[lo])
        w_hi = nonneg_lstsq_rel(x[~lo], y[~lo])
        pred = np.where(lo, x @ w_lo, x @ w_hi)
        err = rel_errors(list(pred), list(y))
        if err.max_rel < best.error.max_rel:
            best = PhaseFit(tuple(float(v) for v in w_lo), err, tuple(float(v) for v in w_hi), threshold,
                            note=f"two sets, split at batch {threshold}", predicted=list(pred))
    return best


def step_model(prefill: PhaseFit, decode: PhaseFit) -> StepModel:
    return StepModel(prefill.coef, decode.coef, decode.large, decode.large_batch,  # type: ignore[arg-type]
                     prefill_large=prefill.large, large_tokens=prefill.large_batch)


def mixed_error(model: StepModel, points: Sequence[MixedPoint]) -> FitError:
    """How well the composed model (not fitted to these) predicts measured mixed steps."""
    pred = [model.step_s(p.chunks, p.batch, p.context_tokens) for p in points]
    return rel_errors(pred, [p.seconds for p in points])
