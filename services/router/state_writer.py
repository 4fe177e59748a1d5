"""Request-state writes to Redis from the router's request path, off its critical path.

A `StateWriter` per request queues each update behind the previous one (so phases land in order) and
never raises: a failed write is reported to the router's `StateOutage`, which logs once per outage, not
at every write; serving goes on without state. `flush()` waits for what was queued.
"""

from __future__ import annotations

import asyncio
import logging

from distserve.state.requests import RequestPhase, RequestStateStore

log = logging.getLogger(__name__)


class StateOutage:
    """Whether request-state writes are failing, so an outage logs once, not at every write."""

    def __init__(self):
        self.failing = False

    def failed(self, rid: str, exc: Exception) -> None:
        if not self.failing:
            log.warning("request state writes fail (first: %s): %s; serving goes on without them", rid, exc)
        self.failing = True

    def ok(self) -> None:
        if self.failing:
            log.info("request state writes work again")
        self.failing = False


class StateWriter:
    """Writes one request's state to Redis off the critical path, in order."""

    def __init__(self, store: RequestStateStore, request_id: str, outage: StateOutage):
        self.store, self.rid, self.outage = store, request_id, outage
        self._last: asyncio.Task | None = None

    def update(self, phase: RequestPhase | None = None, **fields) -> None:
        prev = self._last

        async def write():
            if prev is not None:
                await asyncio.shield(prev)
            try:
                await self.store.update(self.rid, phase, **fields)
            except Exception as exc:  # state is bookkeeping; serving goes on without it
                self.outage.failed(self.rid, exc)
            else:
                self.outage.ok()

        self._last = asyncio.ensure_future(write())

    async def flush(self) -> None:
        if self._last is not None:
            await asyncio.shield(self._last)
