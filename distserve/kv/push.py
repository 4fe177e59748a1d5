"""What the side-channel transports (torch.distributed, shared memory, Mooncake) share.

The puller owns the destination: it takes a warm buffer, readies its side of the channel (posts
receives, picks a segment), then calls KvTransfer.Push on the holder, which exports the leased KV,
encodes it for the wire (`distserve.kv.compression`) and writes it into that buffer over the channel.
Push returns once the bytes are there; the puller decodes them into the KV tensor.

Lifecycle on the puller: `borrow(handle)` -> `Pulled` (tensor valid until `release()`; the buffer goes
back to the pool for the next pull) -> `release()`. A Push that fails leaves the channel in an unknown
state: the transport drops the channel and the buffer and raises Unavailable (NotFound when the lease
is gone). `channel_gone` in the reply (the holder evicted its end) reopens the channel once.
On the holder, `KvSender` is one transport's end; `distserve.kv.server` dispatches Push to it.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass

import grpc
import torch

from distserve.errors import NotFound, Unavailable
from distserve.kv.compression import decode, normalize, wire_nbytes
from distserve.kv.handle import KvHandle
from distserve.kv.transport import KvTransport, Pulled
from distserve.rpc.channels import ChannelPool
from distserve.rpc.errors import error_from_rpc
from distserve.v1 import kv_pb2, kv_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Channel:
    """The puller's end of one channel to one holder."""

    transport: str
    holder: str  # holder's worker id
    address: str  # holder's KvTransfer address
    channel_id: str  # what Push names it by
    state: object = None  # the transport's own (process group, segment pool, ...)


class PushKvTransport(KvTransport):
    """Base of pullers that receive through KvTransfer.Push into their own buffers."""

    def __init__(self, channel_pool: ChannelPool, *, wire_dtype: str = "", timeout_s: float = 60.0):
        self.pool = channel_pool
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s

    def stub(self, address: str) -> kv_pb2_grpc.KvTransferStub:
        return kv_pb2_grpc.KvTransferStub(self.pool.get(address))

    # -- what each transport provides ---------------------------------------------------------
    @abc.abstractmethod
    async def _open(self, handle: KvHandle, nbytes: int) -> tuple[Channel, torch.Tensor, object, dict[str, str]]:
        """(channel, receive buffer of >= nbytes, receive state, Push params); receives are posted."""

    async def _finish(self, channel: Channel, recv: object) -> None:
        """Waits until the bytes Push reported are in the buffer (default: they already are)."""

    def _end(self, channel: Channel, ok: bool) -> None:
        """The transfer on `channel` is over (once per `_open`); ok=False drops the channel (state unknown)."""

    @abc.abstractmethod
    def _return(self, channel: Channel, buf: torch.Tensor, reuse: bool) -> None:
        """The buffer is free again (reuse) or must be forgotten (a failed transfer may still write into it)."""

    def _gone(self, channel: Channel) -> None:
        """The holder forgot the channel: forget it here too."""

    # -- the pull -----------------------------------------------------------------------------
    async def borrow(self, handle: KvHandle) -> Pulled:
        wire = normalize(self.wire_dtype, handle.layout.dtype_name)
        need = wire_nbytes(handle.layout, handle.num_tokens, wire)
        for _ in range(2):
            channel, buf, recv, params = await self._open(handle, need)
            request = kv_pb2.PushKvRequest(
                request_id=handle.request_id, transfer_token=handle.transfer_token, transport=self.name,
                channel=channel.channel_id, capacity=buf.numel(), wire_dtype=wire, params=params,
            )
            try:
                resp = await self.stub(handle.kv_address).Push(request, timeout=self.timeout_s)
                if not resp.channel_gone:
                    _check(handle, resp, need, wire)
                    await self._finish(channel, recv)
            except BaseException as exc:
                self._end(channel, ok=False)
                self._return(channel, buf, reuse=False)
                if isinstance(exc, grpc.RpcError):
                    err = error_from_rpc(exc)
                    if isinstance(err, NotFound):
                        raise err from None
                    raise Unavailable(f"{self.name} push of {handle.request_id} failed: {err}") from None
                raise
            if resp.channel_gone:
                self._end(channel, ok=True)
                self._gone(channel)
                self._return(channel, buf, reuse=True)
                logger.info("%s channel %s to %s was gone; reopening", self.name, channel.channel_id, channel.holder)
                continue
            self._end(channel, ok=True)
            tensor = decode(buf[:need], handle.layout, handle.num_tokens, wire)
            if wire:  # decoded into a new tensor: the buffer is free again
                self._return(channel, buf, reuse=True)
                return Pulled(tensor, need, wire)
            return Pulled(tensor, need, wire, lambda reuse: self._return(channel, buf, reuse))
        raise Unavailable(f"{self.name} channel to {handle.worker_id} vanished twice")



def _check(handle: KvHandle, resp: kv_pb2.PushKvResponse, need: int, wire: str) -> None:
    if tuple(resp.shape) != handle.shape or resp.dtype != handle.layout.dtype_name or resp.wire_bytes != need or resp.wire_dtype != wire:
        raise Unavailable(
            f"KV of {handle.request_id}: holder pushed {tuple(resp.shape)} {resp.dtype} as {resp.wire_bytes} bytes "
            f"of {resp.wire_dtype or 'raw'}, handle says {handle.shape} {handle.layout.dtype_name} ({need} bytes of {wire or 'raw'})"
        )


class KvSender(abc.ABC):
    """The holder's end of one side-channel transport."""

    name: str

    def params(self) -> dict[str, str]:
        """Endpoint details put into every KvHandle's transport_params (default: none)."""
        return {}

    @abc.abstractmethod
    async def push(self, request: kv_pb2.PushKvRequest, payload: torch.Tensor) -> bool:
        """Writes the flat uint8 payload into the puller's buffer. False: the channel is unknown here."""

    async def connect(self, request: kv_pb2.ConnectKvRequest) -> None:
        raise Unavailable(f"transport {self.name} has no pairwise channels")

    async def disconnect(self, request: kv_pb2.DisconnectKvRequest) -> bool:
        return False

    def evict_idle(self) -> int:
        """Drops channels idle too long; returns how many (called periodically)."""
        return 0

    async def close(self) -> None:
        """Drops every channel (shutdown)."""
