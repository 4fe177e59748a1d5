"""A decode worker's KV pulls: pick the transport per pair, fall back to gRPC, count everything.

Per handle: `best` = the best transport both sides advertise (shm only on one host) -> `wanted` =
the operator's forced transport when the holder offers it, else `best` -> pull over `wanted`.
When `wanted` cannot be used (the holder does not offer the forced one) or breaks mid-way, the pull
is retried once over gRPC; that is a fallback: logged at WARNING and counted in
`distserve_kv_transport_fallbacks{wanted,used,reason}`. A gRPC pull that fails is retried once over
gRPC; a second failure is Unavailable (UNAVAILABLE to the router). NotFound (the lease is gone)
is never retried. Seconds and bytes on the wire go to `distserve_kv_transfer_seconds/_bytes` under
the transport that moved them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prometheus_client import Counter

from distserve.errors import DistserveError, NotFound, Unavailable
from distserve.kv.handle import KvHandle
from distserve.kv.transport import PREFERENCE, KvTransports, Pulled, choose_transport

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PullResult:
    pulled: Pulled  # the KV; release() once it is loaded
    transport: str  # what moved it
    seconds: float  # wall time of the pull, retries included
    wanted: str  # what negotiation picked


class KvPuller:
    def __init__(self, transports: KvTransports, metrics, host_id: str, forced: str | None = None):
        self.transports = transports
        self.metrics = metrics
        self.host_id = host_id
        self.forced = forced if forced not in (None, "", "auto") else None
        self.fallbacks = Counter(
            "distserve_kv_transport_fallbacks", "KV pulls that ended on a slower transport than negotiated",
            ["wanted", "used", "reason"], registry=metrics.registry,
        )

    def negotiate(self, handle: KvHandle) -> tuple[str, str | None]:
        """(transport to try, reason it is not the one wanted) for this handle."""
        ours = self.transports.names()
        same_host = bool(handle.host_id) and handle.host_id == self.host_id
        if self.forced is not None:
            try:
                return choose_transport(ours, handle.transports, same_host, forced=self.forced), None
            except Unavailable:
                return "grpc", "forced transport not shared"
        return choose_transport(ours, handle.transports, same_host), None

    async def pull(self, handle: KvHandle) -> PullResult:
        wanted, why = self.negotiate(handle)
        t0 = time.monotonic()
        if why is not None:
            self._fallback(handle, self.forced or wanted, "grpc", why)
        try:
            pulled = await self._once(wanted, handle)
            return PullResult(pulled, wanted, time.monotonic() - t0, wanted)
        except NotFound:
            raise
        except DistserveError as exc:
            first = exc
        self.metrics.retries.labels("kv_pull").inc()
        if wanted != "grpc":
            self._fallback(handle, wanted, "grpc", type(first).__name__, first)
        else:
            logger.warning("KV pull of %r over grpc failed once (%s); retrying over grpc", handle.request_id, first)
        try:
            pulled = await self._once("grpc", handle)
        except NotFound:
            raise
        except DistserveError as exc:
            raise Unavailable(f"KV pull of {handle.request_id} failed over {wanted} ({first}) and then over grpc ({exc})") from exc
        return PullResult(pulled, "grpc", time.monotonic() - t0, wanted)

    async def _once(self, name: str, handle: KvHandle) -> Pulled:
        transport = self.transports.get(name)
        t = time.monotonic()
        pulled = await transport.borrow(handle)
        self.metrics.transfer_seconds.labels(name).observe(time.monotonic() - t)
        self.metrics.transfer_bytes.labels(name).inc(pulled.wire_bytes)
        return pulled

    def _fallback(self, handle: KvHandle, wanted: str, used: str, reason: str, exc: Exception | None = None) -> None:
        self.fallbacks.labels(wanted, used, reason).inc()
        logger.warning("KV of %r from %r: falling back from %s to %s (%s%s)", handle.request_id, handle.worker_id, wanted, used,
                       reason, f": {exc}" if exc else "")


def offered(available: tuple[str, ...], forced: str | None) -> tuple[str, ...]:
    """What a worker advertises: everything available, or the forced one (and grpc, always), best first."""
    if forced in (None, "", "auto"):
        names = set(available) | {"grpc"}
    else:
        names = {forced, "grpc"} & (set(available) | {"grpc"})
    return tuple(n for n in PREFERENCE if n in names)
