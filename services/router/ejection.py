"""Outlier ejection: workers that keep failing are left out of the picker for a cool-down.

Lifecycle: every leg reports its worker's outcome. `failure(worker_id)` counts consecutive
failures that are the worker's fault (transport errors, broken or stalled streams, INTERNAL-like
statuses; never a client's INVALID_ARGUMENT nor an overload's RESOURCE_EXHAUSTED, which the caller
does not report); `success(worker_id)` clears the count. After `threshold` failures in a row the
worker is ejected for `base_s`, doubled for each ejection that follows within `base_s * 8` of the last
one (capped at `max_s`), as Envoy's outlier detection does. `ejected()` is what the picker leaves out;
an ejected worker comes back by itself when its time is up, on probation: one more failure ejects it
again. Health watches catch dead and draining workers; this catches live ones that misbehave
(hung engine, broken transport, flapping network).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Record:
    failures: int = 0  # consecutive failures since the last success
    ejections: int = 0  # ejections in the current streak
    until: float = 0.0  # monotonic time the current ejection ends (0 = not ejected)
    last_ejected: float = 0.0


class OutlierEjector:
    def __init__(self, threshold: int = 3, base_s: float = 10.0, max_s: float = 120.0, clock=time.monotonic):
        if threshold < 1 or base_s <= 0 or max_s < base_s:
            raise ValueError("threshold must be >= 1 and 0 < base_s <= max_s")
        self.threshold = threshold
        self.base_s = base_s
        self.max_s = max_s
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def failure(self, worker_id: str) -> bool:
        """Counts a failure; True when it ejected the worker."""
        now = self._clock()
        r = self._records.setdefault(worker_id, _Record())
        r.failures += 1
        if r.until > now:
            return False  # already out
        on_probation = r.ejections > 0 and now - r.last_ejected < self.base_s * 8
        if r.failures < self.threshold and not on_probation:
            return False
        r.ejections = r.ejections + 1 if on_probation else 1
        r.last_ejected = now
        cool = min(self.max_s, self.base_s * 2 ** (r.ejections - 1))
        r.until = now + cool
        r.failures = 0
        log.warning("worker %s ejected for %.0fs after repeated failures (ejection %d in a row)", worker_id, cool, r.ejections)
        return True

    def success(self, worker_id: str) -> None:
        r = self._records.get(worker_id)
        if r is not None:
            r.failures = 0
            if r.until <= self._clock() and self._clock() - r.last_ejected >= self.base_s * 8:
                del self._records[worker_id]  # a clean record again

    def ejected(self) -> set[str]:
        now = self._clock()
        return {wid for wid, r in self._records.items() if r.until > now}
