"""Choosing workers from live registry data.

The router reads the registry at most every `refresh_s` and adds to each worker's published load what
it sent that worker since that load was sampled (prompt tokens to a prefill worker, a request to a
decode or colocated worker, with the prompt tokens it is to prefill itself: `Sent`), so a
burst of requests spreads over the pool instead of piling onto whichever worker looked idlest at the
last read; between equally loaded workers the choice is random. A decode or colocated worker's load
is its open requests (decoding, waiting to prefill, or waiting for their KV), not only its running
batch: a colocated worker with a queue of prompts is not as idle as one without.
With KV-aware routing (the default) a prefill worker is chosen by the tokens it must compute before
the prompt's first token, its queue plus the part of the prompt it has not cached
(services/router/prefix_index.py states and tests that cost); least-loaded routing ignores caches.
Draining workers get nothing new; workers the outlier ejector holds out, and those a request
already failed on, get nothing new while anyone else can take it.

Given a channel pool, the picker also watches each registered worker's gRPC health (one
`grpc.health.v1.Health/Watch` stream per worker): a worker that turns NOT_SERVING (it drains on
SIGTERM) or whose stream breaks (it died) is left out at once, without waiting for the next registry
read or for its entry to expire; it comes back when its health says SERVING again. Watches end when the
worker leaves the registry, and all of them on `close()`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distserve.errors import DistserveError, ResourceExhausted, Unavailable
from distserve.metrics import Metrics
from distserve.rpc.channels import ChannelPool
from distserve.state.registry import Registry, WorkerView
from services.router.ejection import OutlierEjector
from services.router.prefix_index import PrefixIndex, prefill_cost

ROUTING = ("kv", "load")  # KV-aware (prefix cache against load) or least-loaded

log = logging.getLogger(__name__)

WATCH_RETRY_S = 0.5  # pause before watching a worker's health again after its stream broke
SENT_SLACK_S = 0.25  # a send this long before a worker's sample may not have reached it then (a loaded host): still counted
SENT_MAX_S = 2.0  # a send is forgotten this long after, whatever the samples say (hosts' clocks may disagree)


def least(views: list[WorkerView], key) -> WorkerView:
    """The view with the smallest key; among equals, one at random, so idle or equally loaded workers
    share the traffic instead of the first in the registry taking all of it."""
    keys = [key(v) for v in views]
    low = min(keys)
    return random.choice([v for v, k in zip(views, keys) if k == low])


class Sent:
    """What this router sent each worker that the worker's last published load may not show yet.

    A worker publishes its load every heartbeat (0.5 s by default) and the router reads the registry
    every `refresh_s` (0.2 s): forgetting its sends at every read, as the router once did, hid each one
    until the worker's next heartbeat, and at 2 requests a second two colocated workers ended with one
    at 0.95 cores and a queue of prompts, the other at 0.63. A send is forgotten once a sample of the
    worker's taken after it (less `SENT_SLACK_S`, for a call still on its way) has been read, and in any
    case after `SENT_MAX_S`."""

    def __init__(self) -> None:
        self._log: dict[str, deque[tuple[float, int, int]]] = {}  # worker id -> (unix time, prompt tokens to compute, requests)

    def add(self, worker_id: str, *, tokens: int = 0, requests: int = 0, now: float | None = None) -> None:
        t = time.time() if now is None else now
        log_ = self._log.setdefault(worker_id, deque())
        _forget_before(log_, t - SENT_MAX_S)  # bounded while the registry is unreadable (no reads prune)
        log_.append((t, tokens, requests))

    def seen(self, views: list[WorkerView], now: float | None = None) -> None:
        """A registry read: drops the sends each worker's sample covers, and workers no longer listed."""
        now = time.time() if now is None else now
        sampled_at = {v.worker_id: v.load.updated_at for v in views}
        for wid in list(self._log):
            if wid not in sampled_at:
                del self._log[wid]
                continue
            sampled = sampled_at[wid]
            _forget_before(self._log[wid], max(sampled - SENT_SLACK_S if sampled else now, now - SENT_MAX_S))

    def clear(self) -> None:
        self._log.clear()

    def _sum(self, worker_id: str, k: int) -> int:
        return sum(e[k] for e in self._log.get(worker_id, ()))

    def tokens(self, worker_id: str) -> int:
        return self._sum(worker_id, 1)

    def requests(self, worker_id: str) -> int:
        return self._sum(worker_id, 2)


def _forget_before(log_: deque[tuple[float, int, int]], cut: float) -> None:
    while log_ and log_[0][0] < cut:
        log_.popleft()


class WorkerPicker:
    def __init__(self, registry: Registry, model: str, refresh_s: float = 0.2,
                 pool: ChannelPool | None = None, metrics: Metrics | None = None, ejector: OutlierEjector | None = None,
                 routing: str = "kv"):
        if routing not in ROUTING:
            raise ValueError(f"routing must be one of {', '.join(ROUTING)}, got {routing!r}")
        self.routing = routing
        self.prefixes = PrefixIndex()  # the workers' published prefix caches (KV-aware routing)
        self.registry = registry
        self.model = model
        self.refresh_s = refresh_s
        self.pool = pool  # when given, workers' health is watched
        self.metrics = metrics  # when given, pool gauges are set at every read
        self._views: list[WorkerView] = []
        self._read_at = 0.0
        self.sent = Sent()  # what this router sent since each worker's last sample
        self._watches: dict[str, tuple[str, asyncio.Task]] = {}  # worker id -> (address, its health watch)
        self._down: set[str] = set()  # registered, but its health is not SERVING
        self._outage_since: float | None = None  # monotonic time the registry became unreadable
        self._reread: asyncio.Task | None = None  # background re-read of the registry during an outage
        self._refresher: asyncio.Task | None = None  # periodic re-read while idle (start_refresher)
        self.ejector = ejector or OutlierEjector()  # workers that keep failing sit out a cool-down

    async def workers(self, force: bool = False) -> list[WorkerView]:
        """Live, non-draining workers of the model, less those whose health is not SERVING.

        While Redis is unreachable the last views are kept (the health watches still drop workers
        that die or drain) and the registry is re-read every `refresh_s` in the background, so no
        request waits on a dead Redis; with no views yet the outage raises `Unavailable`."""
        now = time.monotonic()
        if force or now - self._read_at > self.refresh_s:
            if self._outage_since is None or not self._views:
                await self._read(now)
            elif self._reread is None or self._reread.done():
                self._read_at = now  # one background try per refresh_s
                self._reread = asyncio.create_task(self._read(now), name="registry-reread")
        if self._down:
            return [v for v in self._views if v.worker_id not in self._down]
        return self._views

    async def _read(self, now: float) -> None:
        try:
            views = await self.registry.live_workers(model=self.model)
        except Unavailable as exc:
            self._read_at = now  # the next try after refresh_s, not at every call
            if self._outage_since is None:
                self._outage_since = now
                log.warning("worker registry unreadable; routing to the %d workers last seen until Redis is back: %s",
                            len(self._views), exc)
                if self.metrics is not None:
                    self.metrics.registry_up.set(0)
            if not self._views:
                raise
            return
        if self._outage_since is not None:
            log.info("worker registry readable again after %.1fs", now - self._outage_since)
            self._outage_since = None
        if self.metrics is not None:
            self.metrics.registry_up.set(1)
        self._views = [v for v in views if not v.load.draining]
        self._read_at = now
        if self.routing == "kv":
            await self._read_prefixes()
        self.sent.seen(views)
        if self.pool is not None:
            self._watch(self._views)
        if self.metrics is not None:
            self.metrics.observe_pool(v for v in self._views if v.worker_id not in self._down)

    async def _read_prefixes(self) -> None:
        """Fetches the prefix filters of workers whose published version moved (none when quiet)."""
        stale = self.prefixes.stale(self._views)
        filters = {}
        if stale:
            try:
                filters = await self.registry.prefixes(stale)
            except Unavailable as exc:  # routing goes on with the filters held; the next read retries
                log.debug("prefix filters unreadable: %s", exc)
        self.prefixes.update(self._views, filters)

    # -- health watches ----------------------------------------------------------------------
    def _watch(self, views: list[WorkerView]) -> None:
        live = {v.worker_id: v.info.address for v in views}
        for wid, (address, task) in list(self._watches.items()):
            if live.get(wid) != address:  # left, or came back elsewhere under the same id
                task.cancel()
                del self._watches[wid]
                self._down.discard(wid)
        for wid, address in live.items():
            if wid not in self._watches:
                self._watches[wid] = (address, asyncio.create_task(self._watch_one(wid, address), name=f"health-{wid}"))

    async def _watch_one(self, worker_id: str, address: str) -> None:
        stub = health_pb2_grpc.HealthStub(self.pool.get(address))
        while True:
            try:
                async for resp in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        self._down.discard(worker_id)
                    elif worker_id not in self._down:
                        self._down.add(worker_id)
                        log.info("worker %s at %s is %s: no new requests go to it", worker_id, address,
                                 health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
            except grpc.aio.AioRpcError as exc:
                if worker_id not in self._down:
                    log.info("health watch of %s at %s broke (%s): no new requests go to it", worker_id, address, exc.code().name)
            self._down.add(worker_id)
            await asyncio.sleep(WATCH_RETRY_S)

    def start_refresher(self, interval_s: float = 1.0) -> None:
        """Reads the registry every `interval_s` even without traffic, so the pool gauges (and the view
        the next request meets) stay current while the router is idle; otherwise they keep whatever
        the last request saw (a request long finished still "running")."""
        async def refresh() -> None:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.workers()
                except DistserveError:  # Redis away with no view yet: logged where it is read
                    pass

        self._refresher = asyncio.create_task(refresh(), name="registry-refresher")

    async def close(self) -> None:
        watches, self._watches = [task for _, task in self._watches.values()], {}
        if self._refresher is not None:
            watches.append(self._refresher)
            self._refresher = None
        if self._reread is not None:
            watches.append(self._reread)
            self._reread = None
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)

    async def by_role(self, role: str) -> list[WorkerView]:
        return [v for v in await self.workers() if v.info.role == role]

    async def max_model_len(self) -> int | None:
        views = await self.workers()
        return min((v.info.max_model_len for v in views), default=None)

    async def _candidates(self, role: str, exclude: set[str]) -> list[WorkerView]:
        """Healthy workers of a role, less the ejected ones and `exclude` (workers this request already
        failed on). Both are preferences: when they would leave nobody, the ejected workers are tried
        again, then the excluded ones, as a worker on probation beats refusing the request."""
        views = await self.by_role(role)
        if not views and self.registry is not None:  # the last read may predate a worker's registration (up to refresh_s old): read once more
            views = [v for v in await self.workers(force=True) if v.info.role == role]
        if not views:
            raise Unavailable(f"no {role} worker is available")
        ejected = self.ejector.ejected()
        for avoid in (ejected | set(exclude), set(exclude)):
            kept = [v for v in views if v.worker_id not in avoid]
            if kept:
                return kept
        return views

    async def pick_prefill(self, prompt: int | list[int], exclude: set[str] = frozenset()) -> WorkerView:
        """The prefill worker for a prompt (its token ids; a count: no prefix is weighed), counted as sent."""
        tokens = prompt if isinstance(prompt, list) else None
        n = len(tokens) if tokens is not None else prompt
        views = await self._candidates("prefill", exclude)
        memo: dict = {}
        cached = self._cached(views, tokens, memo)
        best = least(views, key=lambda v: prefill_cost(self.queued_tokens(v), n, cached.get(v.worker_id, 0)))
        self.sent.add(best.worker_id, tokens=n - cached.get(best.worker_id, 0))
        if tokens is not None and self.routing == "kv":
            self.prefixes.routed(best, tokens, memo)
        return best

    def _cached(self, views: list[WorkerView], prompt: list[int] | None, memo: dict) -> dict[str, int]:
        """Worker id -> tokens of the prompt's prefix it holds (KV-aware routing with a prompt; else empty)."""
        if self.routing != "kv" or not prompt:
            return {}
        return {v.worker_id: self.prefixes.cached_tokens(v, prompt, memo) for v in views}

    def cached_tokens(self, view: WorkerView, prompt: list[int]) -> int:
        """Tokens of the prompt's prefix this worker holds, as far as this router knows (0 with least-loaded routing)."""
        return self.prefixes.cached_tokens(view, prompt) if self.routing == "kv" else 0

    async def peek_prefill(self, exclude: set[str] = frozenset(), prompt: list[int] | None = None) -> WorkerView:
        """The prefill worker `pick_prefill` would choose now, nothing sent yet."""
        views = await self._candidates("prefill", exclude)
        if prompt is None:
            return least(views, key=self.queued_tokens)
        cached = self._cached(views, prompt, {})
        return least(views, key=lambda v: prefill_cost(self.queued_tokens(v), len(prompt), cached.get(v.worker_id, 0)))

    def queued_tokens(self, view: WorkerView) -> int:
        """Prompt tokens waiting on a worker: its last published queue plus what this router sent it since."""
        wid = view.worker_id
        return view.load.queued_tokens + self.sent.tokens(wid)

    def running(self, view: WorkerView) -> int:
        """Requests running on a decode worker, with those this router sent it since its last publish."""
        return view.load.running_requests + self.sent.requests(view.worker_id)

    def assigned(self, view: WorkerView) -> int:
        """Requests a decode or colocated worker holds, running or not yet (a worker that does not publish
        its open requests: running and queued), with those this router sent it since its last publish."""
        ld = view.load
        return max(ld.open_requests, ld.running_requests + ld.queued_requests) + self.sent.requests(view.worker_id)

    async def pick_decode(self, blocks_needed_by, role: str = "decode", exclude: set[str] = frozenset(),
                          prompt: list[int] | None = None) -> WorkerView:
        """Among workers with room for the request, the one holding the fewest requests (among equals,
        the one holding the longest prefix of `prompt`, when it prefills there).
        `blocks_needed_by(block_size)` gives the request's blocks for a worker's block size."""
        best = await self.peek_decode(blocks_needed_by, role, exclude, prompt)
        self.claim_decode(best)
        return best

    def claim_decode(self, view: WorkerView, local_prompt_tokens: int = 0) -> None:
        """Counts a request sent to a decode worker (with the prompt tokens it is to prefill itself)."""
        self.sent.add(view.worker_id, requests=1, tokens=local_prompt_tokens)

    async def peek_decode(self, blocks_needed_by, role: str = "decode", exclude: set[str] = frozenset(),
                          prompt: list[int] | None = None) -> WorkerView:
        """The decode worker `pick_decode` would choose now, not yet counted as sent."""
        views = await self._candidates(role, exclude)
        fits = [v for v in views if blocks_needed_by(v.info.block_size) <= v.info.total_blocks]
        if not fits:
            raise ResourceExhausted("the request needs more KV blocks than any decode worker has")

        cached = self._cached(fits, prompt, {})

        def load(v: WorkerView) -> tuple:
            has_room = blocks_needed_by(v.info.block_size) <= v.load.free_blocks
            return (not has_room, self.assigned(v), -cached.get(v.worker_id, 0), -v.load.free_blocks)

        return least(fits, key=load)
