"""The holder's KvTransfer service with every transport: gRPC Pull (optionally compressed) and Push
over the side channels of the registered `KvSender`s.

Lifecycle: a prefill worker builds `KvTransferServer(leases, senders)`, adds it to its gRPC server and
runs `run_reaper()` as a task (drops channels idle too long); `close()` at shutdown drops them all.
Pull streams the KV (compressed when asked) as in `grpc_transport`.
Push: validate and pin the lease -> export the KV (a worker thread) -> encode it for the wire -> the
sender writes it into the puller's buffer -> unpin. Pinning defers a release or expiry that lands
meanwhile until the write ends, so the KV is never freed under a transfer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable, Mapping

import grpc
import torch

from distserve.errors import InvalidRequest, PermissionDenied, Unavailable
from distserve.kv.compression import encode, normalize
from distserve.kv.grpc_transport import KvTransferServicer
from distserve.engine.kv_cache import dtype_name
from distserve.kv.lease import LeaseTable
from distserve.kv.push import KvSender
from distserve.v1 import kv_pb2

logger = logging.getLogger(__name__)


class KvTransferServer(KvTransferServicer):
    def __init__(self, lease_table: LeaseTable, senders: Iterable[KvSender] = (), *, block_size: int = 16, **kw):
        super().__init__(lease_table, **kw)
        self.senders = {s.name: s for s in senders}
        self.block_size = block_size  # tokens per scale block of int8 KV on the wire

    def transport_params(self) -> dict[str, str]:
        """What KvHandles carry so pullers can reach each sender."""
        params: dict[str, str] = {}
        for sender in self.senders.values():
            params.update(sender.params())
        return params

    def _payload(self, export_fn, wire_dtype: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        kv = export_fn()
        wire = normalize(wire_dtype, dtype_name(kv.dtype))
        return kv, (encode(kv, wire, self.block_size) if wire else kv), wire

    async def Push(self, request: kv_pb2.PushKvRequest, context: grpc.aio.ServicerContext) -> kv_pb2.PushKvResponse:
        sender = self._sender(request.transport)
        with self._leases.pinned(request.request_id, request.transfer_token) as export_fn:
            kv = await asyncio.to_thread(export_fn)
            wire = normalize(request.wire_dtype, dtype_name(kv.dtype))
            payload = await asyncio.to_thread(encode, kv, wire, self.block_size)
            if payload.numel() > request.capacity:
                raise InvalidRequest("capacity", f"{payload.numel()} bytes of KV do not fit the puller's {request.capacity}")
            if not await sender.push(request, payload):
                return kv_pb2.PushKvResponse(channel_gone=True)
        return kv_pb2.PushKvResponse(wire_bytes=payload.numel(), shape=list(kv.shape), dtype=dtype_name(kv.dtype), wire_dtype=wire)

    async def Connect(self, request: kv_pb2.ConnectKvRequest, context: grpc.aio.ServicerContext) -> kv_pb2.ConnectKvResponse:
        await _endpoints_on_caller(request.params, context.peer())
        await self._sender(request.transport).connect(request)
        return kv_pb2.ConnectKvResponse()

    async def Disconnect(self, request: kv_pb2.DisconnectKvRequest, context: grpc.aio.ServicerContext) -> kv_pb2.DisconnectKvResponse:
        return kv_pb2.DisconnectKvResponse(dropped=await self._sender(request.transport).disconnect(request))

    def _sender(self, name: str) -> KvSender:
        try:
            return self.senders[name]
        except KeyError:
            raise Unavailable(f"transport {name!r} is not served here (serving: grpc, {', '.join(self.senders)})") from None

    async def run_reaper(self, interval_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            for sender in self.senders.values():
                try:
                    sender.evict_idle()
                except Exception:
                    logger.exception("evicting idle %s channels failed; continuing", sender.name)

    async def close(self) -> None:
        for sender in self.senders.values():
            try:
                await sender.close()
            except Exception:
                logger.exception("closing KV sender %s failed", sender.name)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


async def _endpoints_on_caller(params: Mapping[str, str], peer: str) -> None:
    """A Connect may name only endpoints (host:port values, e.g. the pair's rendezvous store) on the
    caller's own host: the holder dials them, and must not be pointed at a third machine."""
    kind, _, rest = peer.partition(":")
    caller = _ip(rest.rpartition(":")[0]) if kind in ("ipv4", "ipv6") else None
    loop = asyncio.get_running_loop()
    for name, value in dict(params).items():
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not host:
            continue
        ip = _ip(host)
        ips = {ip} if ip is not None else set()
        if ip is None:
            try:
                ips = {_ip(info[4][0]) for info in await loop.getaddrinfo(host.strip("[]"), None)}
            except OSError:
                raise PermissionDenied(f"params.{name}: cannot resolve {host!r}") from None
        if caller is None or caller not in ips:
            raise PermissionDenied(f"params.{name}: endpoint {value!r} is not on the caller's host ({peer})")
