"""Worker registry in Redis: who is alive, where to reach it, and how loaded it is.

Lifecycle: a worker calls `Registry.register(info, load, ttl_s)` once it serves, then a `Heartbeat`
republishes its load every `interval_s` and pushes the key's TTL forward. If the worker dies the key
expires after `ttl_s` and routers stop seeing it; if Redis loses the key (restart, FLUSHALL) the next
heartbeat writes it back from the info the registry remembers. `deregister` (on clean shutdown)
removes it at once. While Redis is unreachable every call raises `Unavailable` (within the client's
timeouts, see `distserve.state.connect`); the heartbeat logs and retries, the worker keeps serving,
and the first heartbeat after Redis returns writes the entry back.

Keys (prefix `distserve` by default):
  {prefix}:worker:{id}  hash {info: JSON WorkerInfo, load: JSON WorkerLoad, want_role: a role change asked
                        of an elastic worker (`request_role`; gone with the entry when it re-registers),
                        prefix: the Bloom filter of the block hashes its prefix cache holds (raw bytes,
                        distserve.engine.prefix.BlockBloom; written in the heartbeat that follows a change,
                        whose load carries the matching `prefix_version`; routers read it with `prefixes`
                        only when that version moved)}, with a TTL
  {prefix}:workers      set of worker ids; ids whose hash has expired are dropped lazily by
                        `live_workers` (a Lua script: one round trip, single Redis instance)

Compatibility: fields are only ever added, each with a default, so an entry written by an older
worker reads with the defaults; fields a reader does not know (a newer worker's) are ignored. Readers
before the step-time and KV-estimate fields of `WorkerLoad` did not ignore them and skip such
entries: upgrade routers before workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from distserve.errors import InvalidRequest, NotFound, Unavailable
from distserve.state.connect import unavailable_on_outage

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")
WANT_ROLE = "want_role"  # the registry entry's field that asks an elastic worker to change role


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What does not change while a worker lives."""

    worker_id: str
    role: str  # one of ROLES
    address: str  # host:port of its main gRPC service (Prefill or Decode)
    kv_address: str  # host:port of its KvTransfer service (may equal address)
    model: str  # model name it serves
    host_id: str  # identity of its host, for same-host transports
    transports: tuple[str, ...]  # KV transports it offers, best first
    total_blocks: int  # KV cache capacity in blocks
    block_size: int  # tokens per KV block
    max_model_len: int  # longest sequence (prompt + output) it accepts
    started_at: float  # unix time the worker started
    prefix_root: str = ""  # hex root of its block-hash chain (distserve.engine.prefix); empty: no prefix caching
    elastic: bool = False  # serves either role and changes role when asked (`request_role`)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidRequest("role", f"must be one of {', '.join(ROLES)}, got {self.role!r}")


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What a worker publishes at every heartbeat."""

    queued_requests: int = 0  # waiting for admission
    queued_tokens: int = 0  # prompt tokens to compute before a new prompt's turn: waiting, and in the step in flight
    running_requests: int = 0  # in the running batch
    open_requests: int = 0  # with a call open here: running, waiting to prefill, or waiting for their KV (0: not published)
    free_blocks: int = 0  # free KV blocks
    total_blocks: int = 0  # KV blocks in all
    held_requests: int = 0  # prefilled KV held under a lease, waiting for a decode worker
    draining: bool = False  # shutting down: take no new work
    updated_at: float = 0.0  # unix time of this sample; 0 = stamp at publish
    # how fast its engine steps run: the online fit step_s = step_fixed_s + step_decode_s * decodes + step_token_s * prompt tokens
    step_fixed_s: float = 0.0  # 0 (and the others 0): not measured, or a worker that does not publish it
    step_token_s: float = 0.0  # per prompt token
    step_decode_s: float = 0.0  # per running sequence's decode token
    max_step_tokens: int = 0  # token budget of one step (0 = unknown)
    step_elapsed_s: float = 0.0  # seconds the step in flight had run at updated_at (0 = between steps)
    step_period_s: float = 0.0  # recent seconds from one step's start to the next's while busy: the TPOT its running sequences see (0 = none yet)
    prefill_budget_tokens: int = 0  # decode: prompt tokens one step may carry now within its TPOT target (0 = none now, or it does not prefill in chunks)
    kv_bytes_per_s: float = 0.0  # decode: bandwidth of its recent KV pulls (0 = none yet)
    kv_bytes_per_token: float = 0.0  # decode: KV wire bytes per prompt token of its recent pulls
    prefix_version: int = 0  # version of the prefix-cache filter in the entry's `prefix` field (0: none published)
    prefix_blocks: int = 0  # blocks its prefix cache holds


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A live worker as a router sees it."""

    info: WorkerInfo
    load: WorkerLoad

    @property
    def worker_id(self) -> str:
        return self.info.worker_id


def _encode(obj: WorkerInfo | WorkerLoad) -> str:
    return json.dumps(dataclasses.asdict(obj), separators=(",", ":"))


_INFO_FIELDS = frozenset(f.name for f in dataclasses.fields(WorkerInfo))
_LOAD_FIELDS = frozenset(f.name for f in dataclasses.fields(WorkerLoad))


def _decode_info(raw: str | bytes) -> WorkerInfo:
    data = json.loads(raw)
    data["transports"] = tuple(data["transports"])
    return WorkerInfo(**{k: v for k, v in data.items() if k in _INFO_FIELDS})  # a newer writer's fields are ignored


def _decode_load(raw: str | bytes) -> WorkerLoad:
    return WorkerLoad(**{k: v for k, v in json.loads(raw).items() if k in _LOAD_FIELDS})


# KEYS[1] = index set, ARGV[1] = worker key prefix. Returns [id, info, load, ...] of live workers
# and drops from the index ids whose hash is gone.
_LIVE_SCRIPT = """
local ids = redis.call('SMEMBERS', KEYS[1])
local out = {}
for _, id in ipairs(ids) do
  local v = redis.call('HMGET', ARGV[1] .. id, 'info', 'load')
  if v[1] and v[2] then
    table.insert(out, id); table.insert(out, v[1]); table.insert(out, v[2])
  elseif not v[1] and not v[2] then
    redis.call('SREM', KEYS[1], id)
  end
end
return out
"""


class Registry:
    """Registration, heartbeats and discovery of workers; safe to share within one event loop."""

    def __init__(self, redis_client: aioredis.Redis, prefix: str = "distserve"):
        self._redis = redis_client
        self._prefix = prefix
        self._index = f"{prefix}:workers"
        self._worker_prefix = f"{prefix}:worker:"
        self._known: dict[str, WorkerInfo] = {}  # registered through this instance
        self._live_script = redis_client.register_script(_LIVE_SCRIPT)

    def _key(self, worker_id: str) -> str:
        return self._worker_prefix + worker_id

    async def register(self, info: WorkerInfo, load: WorkerLoad, ttl_s: float = 3.0, extra: dict[str, bytes] | None = None) -> None:
        """Publish info and load with a TTL; remembered so heartbeats can re-register. `extra`: more
        fields of the entry (the prefix filter)."""
        self._known[info.worker_id] = info
        await self._publish(info, load, ttl_s, extra)
        logger.info("registered %s worker %s at %s", info.role, info.worker_id, info.address)

    async def heartbeat(self, worker_id: str, load: WorkerLoad, ttl_s: float = 3.0, extra: dict[str, bytes] | None = None) -> bool:
        """Publish load (and `extra` fields) and refresh the TTL. Returns True if the key had vanished
        and was rewritten."""
        info = self._known.get(worker_id)
        if info is None:
            raise NotFound(f"worker {worker_id} was not registered through this registry")
        existed = await self._publish(info, load, ttl_s, extra)
        if not existed:
            logger.warning("worker %s was missing from Redis; re-registered", worker_id)
        return not existed

    async def _publish(self, info: WorkerInfo, load: WorkerLoad, ttl_s: float, extra: dict[str, bytes] | None = None) -> bool:
        if load.updated_at == 0.0:
            load = dataclasses.replace(load, updated_at=time.time())
        key = self._key(info.worker_id)
        with unavailable_on_outage(f"publishing worker {info.worker_id}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.exists(key)
                pipe.hset(key, mapping={"info": _encode(info), "load": _encode(load), **(extra or {})})
                pipe.pexpire(key, max(1, int(ttl_s * 1000)))
                pipe.sadd(self._index, info.worker_id)
                existed, *_ = await pipe.execute()
        return bool(existed)

    async def deregister(self, worker_id: str) -> None:
        """Remove a worker at once (clean shutdown)."""
        self._known.pop(worker_id, None)
        with unavailable_on_outage(f"deregistering worker {worker_id}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(worker_id))
                pipe.srem(self._index, worker_id)
                await pipe.execute()
        logger.info("deregistered worker %s", worker_id)

    async def request_role(self, worker_id: str, role: str) -> bool:
        """Asks a registered worker to serve `role` (an elastic worker acts on it at its next
        heartbeat; others ignore it). False when no such worker is registered."""
        if role not in ROLES:
            raise InvalidRequest("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        key = self._key(worker_id)
        with unavailable_on_outage(f"asking worker {worker_id} to serve {role}"):
            if not await self._redis.exists(key):
                return False
            await self._redis.hset(key, WANT_ROLE, role)
        return True

    async def requested_role(self, worker_id: str) -> str | None:
        """The role asked of this worker, if any (HMGET: what a decode worker's Redis user may read)."""
        with unavailable_on_outage(f"reading the role asked of {worker_id}"):
            (raw,) = await self._redis.hmget(self._key(worker_id), [WANT_ROLE])
        if raw is None:
            return None
        return (raw.decode() if isinstance(raw, bytes) else raw) or None

    async def prefixes(self, worker_ids: list[str]) -> dict[str, bytes]:
        """The prefix-cache filters these workers published (one round trip; a worker without one is left out)."""
        if not worker_ids:
            return {}
        with unavailable_on_outage("reading prefix-cache filters"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for wid in worker_ids:
                    pipe.hmget(self._key(wid), ["prefix"])
                rows = await pipe.execute()
        return {wid: row[0] for wid, row in zip(worker_ids, rows) if row[0] is not None}

    async def live_workers(self, role: str | None = None, model: str | None = None) -> list[WorkerView]:
        """Workers whose key has not expired, optionally of one role and model, sorted by id."""
        with unavailable_on_outage("reading the worker registry"):
            flat = await self._live_script(keys=[self._index], args=[self._worker_prefix])
        views = []
        for i in range(0, len(flat), 3):
            try:
                view = WorkerView(_decode_info(flat[i + 1]), _decode_load(flat[i + 2]))
            except (ValueError, TypeError, KeyError) as exc:
                logger.warning("skipping unreadable registry entry %r: %s", flat[i], exc)
                continue
            if role is not None and view.info.role != role:
                continue
            if model is not None and view.info.model != model:
                continue
            views.append(view)
        views.sort(key=lambda v: v.info.worker_id)
        return views


LoadFn = Callable[[], WorkerLoad | Awaitable[WorkerLoad]]
ExtraFn = Callable[[bool], Awaitable[dict[str, bytes]]]


class Heartbeat:
    """Registers a worker, then publishes `load_fn()` every interval until stopped.

    Redis errors and load_fn errors are logged and retried at the next tick; they never end the task.
    """

    def __init__(
        self,
        registry: Registry,
        info: WorkerInfo,
        load_fn: LoadFn,  # sync or async; called once per tick
        *,
        interval_s: float = 0.5,
        ttl_s: float = 3.0,
        extra_fn: ExtraFn | None = None,
    ):
        if ttl_s <= interval_s:
            raise InvalidRequest("ttl_s", f"must exceed interval_s ({interval_s}), got {ttl_s}")
        self._registry = registry
        self._info = info
        self._load_fn = load_fn
        self._extra_fn = extra_fn  # async (force) -> entry fields to write besides info and load ({}: none now)
        self._force_extra = True  # the entry is new (or was lost): extra_fn must write everything
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = False  # set by stop(): the loop ends even if a cancel got lost
        self._registered = False
        self.failures = 0  # consecutive failed ticks
        self.last_ok: float = 0.0  # unix time of the last successful publish

    async def start(self) -> bool:
        """Register (once) and start the loop. Returns False if the first publish failed (retried)."""
        if self._task is not None:
            raise RuntimeError("heartbeat already started")
        ok = await self._tick()
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self._info.worker_id}")
        return ok

    async def stop(self, deregister: bool = True) -> None:
        """Stop the loop; remove the worker from Redis unless deregister is False."""
        task, self._task = self._task, None
        self._stopping = True
        if task is not None:
            # A cancel that lands while a Redis call's own timeout fires can come back as that timeout,
            # which _tick logs and survives: ask until the task is over (the flag ends it at its next tick).
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.5)
            if not task.cancelled() and task.exception() is not None:
                logger.warning("heartbeat of %s ended with %r", self._info.worker_id, task.exception())
        if deregister:
            try:
                await self._registry.deregister(self._info.worker_id)
            except (Unavailable, RedisError) as exc:
                logger.warning("could not deregister %s: %s", self._info.worker_id, exc)

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._interval_s)
            if not self._stopping:
                await self._tick()

    async def _tick(self) -> bool:
        try:
            async with asyncio.timeout(self._ttl_s):  # a hung Redis must not stall the loop forever
                extra = await self._extra_fn(self._force_extra) if self._extra_fn is not None else None
                load = self._load_fn()  # after extra_fn: the load may name what extra holds (its version)
                if inspect.isawaitable(load):
                    load = await load
                if self._registered:
                    lost = await self._registry.heartbeat(self._info.worker_id, load, self._ttl_s, extra)
                else:
                    await self._registry.register(self._info, load, self._ttl_s, extra)
                    self._registered = True
                    lost = False
                # a rewritten entry lost the fields written before: the next tick writes them all again
                self._force_extra = lost
        except (Unavailable, RedisError, OSError, asyncio.TimeoutError) as exc:
            self.failures += 1
            self._force_extra = True  # what extra_fn gave may not have been written
            # once per outage at WARNING (and every 100th tick), not twice a second while Redis is down
            level = logging.WARNING if self.failures % 100 == 1 else logging.DEBUG
            logger.log(level, "heartbeat of %s failed (%d in a row; serving goes on): %s", self._info.worker_id, self.failures, exc)
            return False
        except Exception:
            self.failures += 1
            self._force_extra = True
            logger.exception("heartbeat of %s: load_fn or publish raised", self._info.worker_id)
            return False
        if self.failures:
            logger.info("heartbeat of %s recovered after %d failures", self._info.worker_id, self.failures)
        self.failures = 0
        self.last_ok = time.time()
        return True
