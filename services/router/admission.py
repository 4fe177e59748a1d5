"""Admission control at the router: bounded work in flight, the excess refused at once.

Lifecycle of one request here: `Generate` calls `admit_call()` first thing (refused when
`max_inflight` requests are already in flight) and gets a `Ticket`; once the prompt is tokenized,
`ticket.queue(prompt_tokens, ...)` counts its tokens as queued for prefill (refused when they would
push the router's queued prompt tokens past `max_queued_tokens`, or when the expected queueing delay
already exceeds the request's deadline); `ticket.prefilled()` takes them off the queue once its first
token is back; `ticket.close()` (in the request's `finally`) gives back whatever it still holds.
A refusal raises `Shed` (a `ResourceExhausted`) carrying a retry-after hint in milliseconds, which the
servicer sends as the `retry-after-ms` trailing metadata.

The decisions are pure functions (`decide`, `expected_wait_s`) so unit tests drive them without a
server; `Admission` only keeps the counts.

Deadline rule: a prefill worker serves its queue at some rate R tokens/s (an exponentially weighted
average of what this router has seen: prompt tokens / prefill compute seconds of finished prefill
legs). A new prompt of P tokens, sent to the least-loaded prefill worker with Q tokens queued,
should get its first token after about (Q + P) / R seconds. When that exceeds the time left before
the request's deadline, it cannot meet it: refused at once. With no rate measured yet, or no
deadline, the rule refuses nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distserve.errors import ResourceExhausted
from distserve.rpc.errors import RETRY_AFTER_KEY  # noqa: F401  (re-exported: the refusal's trailing metadata)

RATE_ALPHA = 0.2  # weight of the newest observation in the prefill rate's average


class Shed(ResourceExhausted):
    """A request refused by admission control; `retry_after_ms` is the hint sent to the client."""

    def __init__(self, reason: str, retry_after_ms: int):
        super().__init__(f"router overloaded: {reason}; retry after {retry_after_ms} ms")
        self.reason = reason
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True, slots=True)
class Decision:
    admit: bool
    reason: str = ""  # why it was refused
    retry_after_ms: int = 0  # hint for the refused client


def expected_wait_s(queued_tokens: int, prompt_tokens: int, tokens_per_s: float | None) -> float | None:
    """Expected seconds until a prompt of `prompt_tokens` is prefilled behind `queued_tokens`, at
    `tokens_per_s`; None when the rate is unknown."""
    if not tokens_per_s or tokens_per_s <= 0 or not math.isfinite(tokens_per_s):
        return None
    return (queued_tokens + prompt_tokens) / tokens_per_s


def decide(inflight: int, queued_tokens: int, prompt_tokens: int, *, max_inflight: int, max_queued_tokens: int,
           retry_after_ms: int, wait_s: float | None = None, deadline_left_s: float | None = None) -> Decision:
    """Whether one more request may enter, given what is already in flight (`inflight` requests,
    not counting this one; `queued_tokens` prompt tokens waiting for prefill) and this request's
    `prompt_tokens` (0 when not tokenized yet). A prompt larger than `max_queued_tokens` on its own is
    admitted when nothing else is queued, so it is never refused forever."""
    if inflight >= max_inflight:
        return Decision(False, f"{inflight} requests in flight (max_inflight {max_inflight})", retry_after_ms)
    if prompt_tokens and queued_tokens and queued_tokens + prompt_tokens > max_queued_tokens:
        return Decision(False, f"{queued_tokens} prompt tokens queued, {prompt_tokens} more would pass "
                               f"max_queued_tokens {max_queued_tokens}", retry_after_ms)
    if wait_s is not None and deadline_left_s is not None and wait_s > deadline_left_s:
        return Decision(False, f"expected queueing delay {wait_s:.2f}s exceeds the {deadline_left_s:.2f}s left "
                               "before the deadline", max(retry_after_ms, int(1000 * (wait_s - deadline_left_s))))
    return Decision(True)


class Admission:
    """Counts of this router's admitted work; hands out `Ticket`s."""

    def __init__(self, max_inflight: int, max_queued_tokens: int, retry_after_ms: int = 500):
        self.max_inflight = max_inflight
        self.max_queued_tokens = max_queued_tokens
        self.retry_after_ms = retry_after_ms
        self.inflight = 0  # admitted requests not yet ended
        self.queued_tokens = 0  # prompt tokens of admitted requests not yet prefilled
        self.prefill_rate: float | None = None  # tokens/s, averaged over observed prefill legs

    def _check(self, d: Decision) -> None:
        if not d.admit:
            raise Shed(d.reason, d.retry_after_ms)

    def admit_call(self) -> "Ticket":
        """A slot for a new call, or `Shed` when `max_inflight` are in flight."""
        self._check(decide(self.inflight, self.queued_tokens, 0, max_inflight=self.max_inflight,
                           max_queued_tokens=self.max_queued_tokens, retry_after_ms=self.retry_after_ms))
        self.inflight += 1
        return Ticket(self)

    def observe_prefill(self, tokens: int, compute_s: float) -> None:
        """Feeds the prefill rate with one finished prefill leg."""
        if tokens <= 0 or not compute_s or compute_s <= 0 or not math.isfinite(compute_s):
            return
        rate = tokens / compute_s
        self.prefill_rate = rate if self.prefill_rate is None else (1 - RATE_ALPHA) * self.prefill_rate + RATE_ALPHA * rate


class Ticket:
    """One admitted call's share of the counts; `close()` is idempotent."""

    def __init__(self, owner: Admission):
        self.owner = owner
        self.tokens = 0
        self.open = True

    def queue(self, prompt_tokens: int, pool_queued_tokens: int | None = None, deadline_left_s: float | None = None) -> None:
        """Counts this request's prompt as queued, or raises `Shed` (the ticket then holds nothing
        more than its call slot, which `close()` gives back). `pool_queued_tokens`: tokens queued at
        the least-loaded prefill worker, as the registry last said."""
        a = self.owner
        wait = expected_wait_s(pool_queued_tokens or 0, prompt_tokens, a.prefill_rate) if pool_queued_tokens is not None else None
        a._check(decide(a.inflight - 1, a.queued_tokens, prompt_tokens, max_inflight=a.max_inflight,
                        max_queued_tokens=a.max_queued_tokens, retry_after_ms=a.retry_after_ms,
                        wait_s=wait, deadline_left_s=deadline_left_s))
        self.tokens = prompt_tokens
        a.queued_tokens += prompt_tokens

    def prefilled(self) -> None:
        self.owner.queued_tokens -= self.tokens
        self.tokens = 0

    def close(self) -> None:
        if self.open:
            self.open = False
            self.prefilled()
            self.owner.inflight -= 1
