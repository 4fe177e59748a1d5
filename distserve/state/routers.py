"""Routers in Redis: each live router keeps a presence key alive, and every router closes the request
state that dead routers left open.

Lifecycle: a router starts a `RouterHeartbeat` once its server serves. It writes the presence key
with a TTL of `ttl_s`, adds the router id to the index, and rewrites both every `interval_s` (so a
Redis that restarted empty learns of the router at the next beat). `stop()` on shutdown deletes the
presence key but leaves the id in the index, so what the router could not finish is closed by another
router's next reap instead of after the TTL.

Every router also runs a `Reaper`, which calls `reap_orphans` every `interval_s`: one Lua script
(atomic on a single Redis, so two routers reaping at once close each request once) that, for each
id in the index whose presence key is gone, marks EXPIRED (with `t_expired` and an `error`) every
request of that router's in-flight set that is not terminal and whose `router` field names that
router, then drops the in-flight set and the id from the index. Finished requests are not touched.
A Redis outage never ends either task: each tick logs (once per outage) and tries again.

Keys (prefix `distserve` by default):
  {prefix}:router:{id}      string: JSON RouterInfo, with a TTL
  {prefix}:routers          set of router ids, dead ones included until reaped
  {prefix}:inflight:{id}    set of request ids the router has not finished (RequestStateStore)
  {prefix}:request:{rid}    request state hash (distserve.state.requests)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from distserve.errors import InvalidRequest, Unavailable
from distserve.state.connect import unavailable_on_outage
from distserve.state.requests import TERMINAL_PHASES, RequestPhase

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouterInfo:
    """What a router publishes about itself."""

    router_id: str  # unique per router process (a restarted router gets a new one)
    address: str  # host:port of its public gRPC API
    started_at: float  # unix time the router started


@dataclass(frozen=True, slots=True)
class Orphan:
    """A request closed as EXPIRED because its router died."""

    router_id: str  # the dead router
    request_id: str


def presence_key(prefix: str, router_id: str) -> str:
    return f"{prefix}:router:{router_id}"


def index_key(prefix: str) -> str:
    return f"{prefix}:routers"


# KEYS[1] = router index; ARGV[1] = key prefix, ARGV[2] = now (unix time), ARGV[3] = request TTL (ms).
# Returns [router, request, ...] for the requests it marked EXPIRED.
_REAP_SCRIPT = """
local terminal = {%s}
local out = {}
for _, router in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. ':router:' .. router) == 0 then
    local set = ARGV[1] .. ':inflight:' .. router
    for _, rid in ipairs(redis.call('SMEMBERS', set)) do
      local key = ARGV[1] .. ':request:' .. rid
      local v = redis.call('HMGET', key, 'phase', 'router')
      if v[1] and not terminal[v[1]] and (not v[2] or v[2] == router) then
        redis.call('HSET', key, 'phase', '%s', 't_expired', ARGV[2],
                   'error', 'router ' .. router .. ' died before the request finished')
        redis.call('PEXPIRE', key, ARGV[3])
        table.insert(out, router)
        table.insert(out, rid)
      end
    end
    redis.call('DEL', set)
    redis.call('SREM', KEYS[1], router)
  end
end
return out
""" % (", ".join(f"{p.value}=true" for p in sorted(TERMINAL_PHASES, key=lambda p: p.value)), RequestPhase.EXPIRED.value)


async def reap_orphans(redis_client: aioredis.Redis, prefix: str = "distserve", state_ttl_s: float = 3600.0) -> list[Orphan]:
    """Close the open requests of routers whose presence key is gone (see the module docstring)."""
    script = redis_client.register_script(_REAP_SCRIPT)  # cheap: EVALSHA, with SCRIPT LOAD on NOSCRIPT
    with unavailable_on_outage("reaping the requests of dead routers"):
        flat = await script(keys=[index_key(prefix)], args=[prefix, repr(time.time()), max(1, int(state_ttl_s * 1000))])
    text = [x.decode() if isinstance(x, bytes) else x for x in flat]
    return [Orphan(text[i], text[i + 1]) for i in range(0, len(text), 2)]


class _Loop:
    """A task that runs `tick()` every interval until stopped, logging Redis outages once each."""

    def __init__(self, name: str, tick: Callable[[], Awaitable[None]], interval_s: float):
        self._name = name
        self._tick = tick
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.failures = 0  # consecutive failed ticks

    async def run_once(self) -> bool:
        try:
            await self._tick()
        except Unavailable as exc:
            self.failures += 1
            if self.failures == 1:
                logger.warning("%s failed (will retry every %.1fs): %s", self._name, self._interval_s, exc)
            return False
        except Exception:
            self.failures += 1
            logger.exception("%s raised", self._name)
            return False
        if self.failures:
            logger.info("%s recovered after %d failed tries", self._name, self.failures)
        self.failures = 0
        return True

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self._name} already started")
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.run_once()


class RouterHeartbeat:
    """Keeps this router's presence key alive in Redis while it serves."""

    def __init__(
        self,
        redis_client: aioredis.Redis,
        info: RouterInfo,
        *,
        prefix: str = "distserve",
        interval_s: float = 2.0,  # how often the key is rewritten
        ttl_s: float = 10.0,  # presence key lifetime without a beat; other routers reap after it
    ):
        if ttl_s <= interval_s:
            raise InvalidRequest("ttl_s", f"must exceed interval_s ({interval_s}), got {ttl_s}")
        self._redis = redis_client
        self.info = info
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._value = json.dumps(dataclasses.asdict(info), separators=(",", ":"))
        self._loop = _Loop(f"heartbeat of router {info.router_id}", self.beat, interval_s)

    async def beat(self) -> None:
        """Write the presence key with its TTL and the index entry (raises Unavailable)."""
        with unavailable_on_outage(f"publishing router {self.info.router_id}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(presence_key(self._prefix, self.info.router_id), self._value, px=self._ttl_ms)
                pipe.sadd(index_key(self._prefix), self.info.router_id)
                await pipe.execute()

    async def start(self) -> bool:
        """Beat once now, then every interval. Returns False if the first beat failed (retried)."""
        ok = await self._loop.run_once()
        self._loop.start()
        if ok:
            logger.info("router %s registered", self.info.router_id)
        return ok

    async def stop(self, leave: bool = True) -> None:
        """Stop beating; with `leave`, delete the presence key so others reap what is left at once."""
        await self._loop.stop()
        if not leave:
            return
        try:
            with unavailable_on_outage(f"removing router {self.info.router_id}"):
                await self._redis.delete(presence_key(self._prefix, self.info.router_id))
        except Unavailable as exc:
            logger.warning("could not remove router %s (its key expires on its own): %s", self.info.router_id, exc)


class Reaper:
    """Closes, every interval, the requests that dead routers left open (`reap_orphans`)."""

    def __init__(
        self,
        redis_client: aioredis.Redis,
        *,
        prefix: str = "distserve",
        interval_s: float = 5.0,  # how often dead routers are looked for
        state_ttl_s: float = 3600.0,  # how long an EXPIRED request stays readable
        on_reaped: Callable[[list[Orphan]], None] | None = None,  # e.g. a metrics counter
    ):
        self._redis = redis_client
        self._prefix = prefix
        self._state_ttl_s = state_ttl_s
        self._on_reaped = on_reaped
        self._loop = _Loop("reaper of dead routers' requests", self._tick, interval_s)
        self.reaped = 0  # requests this reaper marked EXPIRED

    async def reap(self) -> list[Orphan]:
        """One reap now (raises Unavailable)."""
        orphans = await reap_orphans(self._redis, self._prefix, self._state_ttl_s)
        if orphans:
            self.reaped += len(orphans)
            routers = sorted({o.router_id for o in orphans})
            logger.warning("closed %d requests of dead router(s) %s as EXPIRED", len(orphans), ", ".join(routers))
            if self._on_reaped is not None:
                self._on_reaped(orphans)
        return orphans

    async def _tick(self) -> None:
        await self.reap()

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
