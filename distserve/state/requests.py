"""Per-request state in Redis, written by routers for operators and for other routers to read.

Lifecycle: QUEUED (router accepted it) -> PREFILLING -> PREFILLED (first token out) -> DECODING ->
one of FINISHED / FAILED / CANCELLED, or EXPIRED when the router serving it died first. Each
`update(..., phase=P)` records `phase` and, the first time the request enters P, a unix timestamp
`t_<p>` (e.g. `t_queued`, `t_prefilled`). Every update is one pipelined MULTI round trip that also
pushes the key's TTL forward, so a forgotten request disappears `ttl_s` after its last update.

A store made with a `router_id` also keeps, in the same round trip, that router's in-flight set:
a request enters it with any non-terminal phase (QUEUED first) and leaves it with a terminal one, and
its hash records `router` (the last router to move it on, so a request another router resumed is
not that router's to close). When the router dies its presence key expires and another router's
reaper (`distserve.state.routers`) marks what is left in the set EXPIRED and drops the set.

While Redis is unreachable every call raises `Unavailable` (`distserve.state.connect`).

Keys: {prefix}:request:{request_id}  hash of the fields below (values stored as strings; `get`
                                     turns them back into int / float / RequestPhase)
      {prefix}:inflight:{router_id}  set of request ids that router has not finished; its TTL is
                                     pushed forward like the requests'
"""

from __future__ import annotations

import enum
import logging
import re
import time
from typing import Any

import redis.asyncio as aioredis

from distserve.errors import InvalidRequest
from distserve.state.connect import unavailable_on_outage

logger = logging.getLogger(__name__)


class RequestPhase(enum.Enum):
    QUEUED = "QUEUED"
    PREFILLING = "PREFILLING"
    PREFILLED = "PREFILLED"
    DECODING = "DECODING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"  # its router died before it finished; closed by another router's reaper

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_PHASES

    @property
    def timestamp_field(self) -> str:
        return "t_" + self.value.lower()


TERMINAL_PHASES = frozenset(
    {RequestPhase.FINISHED, RequestPhase.FAILED, RequestPhase.CANCELLED, RequestPhase.EXPIRED}
)

# Fields with a known type; any other lowercase identifier is accepted and kept as a string.
INT_FIELDS = frozenset({"prompt_tokens", "tokens_emitted", "max_tokens", "kv_bytes"})
STR_FIELDS = frozenset(
    {"prefill_worker", "decode_worker", "finish_reason", "error", "router", "model", "kv_transport"}
)
_FIELD_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse(name: str, raw: str) -> Any:
    if name == "phase":
        return RequestPhase(raw)
    if name in INT_FIELDS:
        return int(raw)
    if name.startswith("t_") or name.endswith("_s"):
        return float(raw)
    return raw


class RequestStateStore:
    """Writes and reads request state hashes; safe to share within one event loop."""

    def __init__(
        self,
        redis_client: aioredis.Redis,
        prefix: str = "distserve",
        ttl_s: float = 3600.0,
        router_id: str | None = None,  # the router writing; None = no in-flight tracking (tools, tests)
    ):
        self._redis = redis_client
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self.router_id = router_id
        self._inflight = inflight_key(prefix, router_id) if router_id else None

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def ttl_ms(self) -> int:
        return self._ttl_ms

    def _key(self, request_id: str) -> str:
        return request_key(self._prefix, request_id)

    async def update(self, request_id: str, phase: RequestPhase | None = None, **fields: Any) -> None:
        """Set fields (None values are skipped); on a phase, record it and its first-entry time.

        Field names: prefill_worker, decode_worker, prompt_tokens, tokens_emitted, finish_reason,
        error, t_* timestamps, *_s durations, or any other lowercase identifier (kept as string).
        """
        mapping: dict[str, str] = {}
        for name, value in fields.items():
            if name == "phase" or not _FIELD_RE.match(name):
                raise InvalidRequest(name, "not a request state field")
            if value is None:
                continue
            if isinstance(value, enum.Enum):
                value = value.value
            if isinstance(value, bool):
                value = int(value)
            mapping[name] = repr(value) if isinstance(value, float) else str(value)
        key = self._key(request_id)
        with unavailable_on_outage(f"writing the state of request {request_id}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                if phase is not None:
                    mapping["phase"] = phase.value
                    if phase.timestamp_field not in mapping:
                        pipe.hsetnx(key, phase.timestamp_field, repr(time.time()))
                    if self._inflight is not None:
                        if phase.terminal:
                            pipe.srem(self._inflight, request_id)
                        else:
                            mapping["router"] = self.router_id  # the store owns this field
                            pipe.sadd(self._inflight, request_id)
                            pipe.pexpire(self._inflight, self._ttl_ms)
                if mapping:
                    pipe.hset(key, mapping=mapping)
                pipe.pexpire(key, self._ttl_ms)
                await pipe.execute()

    async def inflight(self) -> set[str]:
        """Ids of the requests this store's router has in flight (empty without a router id)."""
        if self._inflight is None:
            return set()
        with unavailable_on_outage("reading the in-flight requests"):
            members = await self._redis.smembers(self._inflight)
        return {_text(m) for m in members}

    async def get(self, request_id: str) -> dict[str, Any] | None:
        """All fields of a request (typed), or None if unknown or expired."""
        with unavailable_on_outage(f"reading the state of request {request_id}"):
            raw = await self._redis.hgetall(self._key(request_id))
        if not raw:
            return None
        out: dict[str, Any] = {}
        for name, value in raw.items():
            name, value = _text(name), _text(value)
            try:
                out[name] = _parse(name, value)
            except ValueError:
                logger.warning("request %s: unreadable field %s=%r", request_id, name, value)
                out[name] = value
        return out

    async def delete(self, request_id: str) -> None:
        with unavailable_on_outage(f"deleting the state of request {request_id}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(request_id))
                if self._inflight is not None:
                    pipe.srem(self._inflight, request_id)
                await pipe.execute()


def request_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:request:{request_id}"


def inflight_key(prefix: str, router_id: str) -> str:
    return f"{prefix}:inflight:{router_id}"
