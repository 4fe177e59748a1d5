"""Long-lived gRPC channels to peers, one per address.

Lifecycle: a service makes one `ChannelPool` at start (inside its event loop); `get(address)` opens
the channel to a peer on first use and returns the same channel afterwards (gRPC reconnects it by
itself); `close(address)` drops a peer that left the registry; `close_all()` at shutdown. Every
channel carries the retry policy (UNAVAILABLE only, with backoff), keepalive and 64 MiB message limits,
and, when the pool has TLS (rpc.tls), presents this process's certificate and checks the peer's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from distserve.rpc.tls import Tls

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
INTERNAL_NAME = "distserve.internal"  # with TLS, the name internal channels verify: every certificate carries it
KEEPALIVE_TIME_MS = 5_000  # rpc.server accepts pings this often (its minimum interval is below it)

# Retries apply to calls that failed before any response came back; a started stream is not retried.
RETRY_SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{}],  # every method of every service
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options every internal client channel uses."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG)),
        # Ping every connection so a dead or frozen peer (a host gone, a SIGSTOPped process: the kernel
        # still ACKs TCP, nobody answers HTTP/2 PINGs) fails its calls with UNAVAILABLE within ~8 s
        # instead of hanging them; servers built by rpc.server allow this rate.
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", 3_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A peer that died and came back (a supervisor restarts it on the same port) is reconnected
        # within 2 s; gRPC's default backoff grows to 120 s and kept restarted workers idle.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def internal_options(tls: "Tls | None") -> list[tuple[str, Any]]:
    """With TLS, verify the peer's certificate as `distserve.internal` (workers are dialed by whatever
    address they advertise: pod IPs, service names; which peer to dial comes from the registry)."""
    return [("grpc.ssl_target_name_override", INTERNAL_NAME)] if tls is not None else []


def aio_channel(address: str, tls: "Tls | None", options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=list(options))


def sync_channel(address: str, tls: "Tls | None", options: Sequence[tuple[str, Any]]) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.channel_credentials(), options=list(options))


class ChannelPool:
    """One grpc.aio channel per peer address; use from a single event loop."""

    def __init__(
        self,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        extra_options: Sequence[tuple[str, Any]] = (),
        tls: "Tls | None" = None,
    ):
        self.tls = tls
        self._options = [*channel_options(max_message_bytes), *internal_options(tls), *extra_options]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        """The channel to host:port, opened on first use."""
        channel = self._channels.get(address)
        if channel is None:
            channel = aio_channel(address, self.tls, self._options)
            self._channels[address] = channel
            logger.debug("opened channel to %s", address)
        return channel

    def __contains__(self, address: str) -> bool:
        return address in self._channels

    def __len__(self) -> int:
        return len(self._channels)

    async def close(self, address: str, grace_s: float | None = None) -> None:
        """Close the channel to address, if open (in-flight calls are cancelled after grace_s)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace_s)
            logger.debug("closed channel to %s", address)

    async def close_all(self, grace_s: float | None = None) -> None:
        for address in list(self._channels):
            await self.close(address, grace_s)
