"""Choosing workers from live registry data.

The router reads the registry at most every `refresh_s` and between reads adds what it sent itself
(prompt tokens to a prefill worker, a running request to a decode worker), so a burst of requests
spreads over the pool instead of piling onto whichever worker looked idlest at the last read.
Draining workers get nothing new.
"""

from __future__ import annotations

import time

from distserve.engine.errors import ResourceExhausted, Unavailable
from distserve.state.registry import Registry, WorkerView


class WorkerPicker:
    def __init__(self, registry: Registry, model: str, refresh_s: float = 0.2):
        self.registry = registry
        self.model = model
        self.refresh_s = refresh_s
        self._views: list[WorkerView] = []
        self._read_at = 0.0
        self._pending_tokens: dict[str, int] = {}  # sent since the last read
        self._pending_running: dict[str, int] = {}

    async def workers(self, force: bool = False) -> list[WorkerView]:
        now = time.monotonic()
        if force or now - self._read_at > self.refresh_s:
            self._views = [v for v in await self.registry.live_workers(model=self.model) if not v.load.draining]
            self._read_at = now
            self._pending_tokens.clear()
            self._pending_running.clear()
        return self._views

    async def by_role(self, role: str) -> list[WorkerView]:
        return [v for v in await self.workers() if v.info.role == role]

    async def max_model_len(self) -> int | None:
        views = await self.workers()
        return min((v.info.max_model_len for v in views), default=None)

    async def pick_prefill(self, prompt_tokens: int, exclude: set[str] = frozenset()) -> WorkerView:
        views = [v for v in await self.by_role("prefill") if v.worker_id not in exclude]
        if not views:
            raise Unavailable("no prefill worker is available")
        best = min(views, key=lambda v: v.load.queued_tokens + self._pending_tokens.get(v.worker_id, 0))
        self._pending_tokens[best.worker_id] = self._pending_tokens.get(best.worker_id, 0) + prompt_tokens
        return best

    async def pick_decode(self, blocks_needed_by, role: str = "decode", exclude: set[str] = frozenset()) -> WorkerView:
        """Among workers with room for the request, the one with the least running load.
        `blocks_needed_by(block_size)` gives the request's blocks for a worker's block size."""
        views = [v for v in await self.by_role(role) if v.worker_id not in exclude]
        if not views:
            raise Unavailable(f"no {role} worker is available")
        fits = [v for v in views if blocks_needed_by(v.info.block_size) <= v.info.total_blocks]
        if not fits:
            raise ResourceExhausted("the request needs more KV blocks than any decode worker has")

        def load(v: WorkerView) -> tuple:
            running = v.load.running_requests + self._pending_running.get(v.worker_id, 0)
            has_room = blocks_needed_by(v.info.block_size) <= v.load.free_blocks
            return (not has_room, running, -v.load.free_blocks)

        best = min(fits, key=load)
        self._pending_running[best.worker_id] = self._pending_running.get(best.worker_id, 0) + 1
        return best
