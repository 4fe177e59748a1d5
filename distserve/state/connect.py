"""The one way services open Redis, and the one place Redis outages become domain errors.

Lifecycle: a service calls `connect(url, role=...)` once at start and `aclose()`s the client at the
end of its shutdown. The client owns a bounded `BlockingConnectionPool`: at most `max_connections`
sockets; a call that finds them all busy waits up to `timeout_s` for one and then fails. Connecting,
reading a reply and waiting for a pooled connection each give up after about `timeout_s`
(connecting after `connect_timeout_s`), and a failed call is retried `retries` times after a short
backoff, which also re-dials the sockets a Redis restart left dead. So a dead or hung Redis costs a
caller about (retries + 1) x timeout_s at most, never a hung request.

The state layer (registry, request state, router presence) wraps its Redis calls in
`unavailable_on_outage(what)`: connection errors, timeouts, an exhausted pool and a Redis that is
loading, read-only or out of memory raise `Unavailable` (gRPC UNAVAILABLE at the service boundary),
so callers handle one domain error instead of redis-py's exception tree. Other Redis errors (a wrong
type, a bad script) are bugs and pass through untouched.

The URL carries everything else: `redis://user:password@host:port/0` for an ACL user
(`distserve.state.acl`), `rediss://` for TLS, with redis-py's options in the query string, e.g.
`rediss://router:PASSWORD@redis:6379/0?ssl_ca_certs=/etc/distserve/redis-ca.pem` (the server's
certificate must chain to that CA and name the host; `ssl_cert_reqs=required` is the default) and
`&ssl_certfile=...&ssl_keyfile=...` when Redis asks clients for certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError as RedisConnectionError,
    ReadOnlyError,
    ResponseError,
    TimeoutError as RedisTimeoutError,
    TryAgainError,
)
from redis.maint_notifications import MaintNotificationsConfig

from distserve.errors import Unavailable

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_TIMEOUT_S = 0.5
DEFAULT_CONNECT_TIMEOUT_S = 0.5
DEFAULT_RETRIES = 1

# Errors that mean "Redis is not there (or not usable) right now", not "this call is wrong".
# BusyLoadingError is a ConnectionError; the pool's "No connection available." is one too.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,  # a replica promoted late, or a failover in progress
    TryAgainError,
    asyncio.TimeoutError,
    OSError,
)


def connect(
    url: str,
    *,
    role: str,  # who connects (router, prefill, decode, colocated, bench): the Redis client name
    max_connections: int = DEFAULT_MAX_CONNECTIONS,  # pool bound: sockets this process opens at most
    timeout_s: float = DEFAULT_TIMEOUT_S,  # reply and pool-wait timeout of one call
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,  # TCP / unix socket connect timeout
    retries: int = DEFAULT_RETRIES,  # extra attempts after a connection error or timeout
) -> aioredis.Redis:
    """A Redis client on a bounded pool with short timeouts; `aclose()` it on shutdown."""
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    if timeout_s <= 0 or connect_timeout_s <= 0:
        raise ValueError(f"timeouts must be > 0, got {timeout_s} and {connect_timeout_s}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), retries, supported_errors=(RedisConnectionError, RedisTimeoutError))
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,  # wait for a free connection this long, then ConnectionError
        socket_timeout=timeout_s,
        socket_connect_timeout=connect_timeout_s,
        socket_keepalive=True,
        retry=retry,
        client_name=f"distserve-{role}",
        # no CLIENT SETINFO and no CLIENT MAINT_NOTIFICATIONS handshake (a Redis Enterprise feature):
        # each role's ACL user may send only what its code needs (distserve.state.acl)
        driver_info=None,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it


def is_outage(exc: BaseException) -> bool:
    """True for errors that mean Redis is unreachable or not usable now (see OUTAGE_ERRORS)."""
    if isinstance(exc, OUTAGE_ERRORS) or isinstance(exc, BusyLoadingError):
        return True
    # "OOM command not allowed when used memory > 'maxmemory'": Redis is full, not the call wrong
    return isinstance(exc, ResponseError) and str(exc).startswith(("OOM", "MASTERDOWN", "LOADING"))


@contextlib.contextmanager
def unavailable_on_outage(what: str) -> Iterator[None]:
    """Turn a Redis outage inside the block into `Unavailable("Redis unavailable while <what>: ...")`."""
    try:
        yield
    except Exception as exc:
        if not is_outage(exc):
            raise
        raise Unavailable(f"Redis unavailable while {what}: {exc or type(exc).__name__}") from exc
