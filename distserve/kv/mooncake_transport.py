"""KV over the Mooncake Transfer Engine (optional extra: `pip install 'distserve[mooncake]'`).

Each side runs one TransferEngine in P2P-handshake mode (no metadata server): protocol "rdma" when
RDMA devices exist, else "tcp". The puller registers its receive buffers (a `BufferPool`, warm and
reused) with its engine and sends Push with its session ("host:rpc_port") and the buffer's address;
the holder copies the encoded KV into a registered staging buffer of its own and writes it into
the puller's buffer with `transfer_sync_write`, then replies. Buffers are unregistered when their
pool evicts them. Nothing is named in the file system, so nothing outlives the two processes.
`status()` says whether the wheel imports here and, if not, exactly why.

Exposure: each engine is given the worker's data-plane host (`factory.data_plane_host`) as the
address it advertises, but Mooncake binds its listeners itself and its API takes no bind address.
Per its upstream source (kvcache-ai/Mooncake common.h, transfer_metadata_plugin.cpp,
tcp_transport.cpp; not checked against the wheel, which does not import on this machine): in
P2P-handshake mode the handshake port (random, 15000-17000) binds INADDR_ANY and the TCP data port
binds [::] dual stack, so every interface; neither authenticates a peer, and the TCP server reads
or writes whatever address a request names. No per-pair secret fits that protocol: whoever reaches
those ports can read and write this process's memory. Mooncake belongs on an isolated network
only; each engine says so at WARNING when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import torch

from distserve.errors import Unavailable
from distserve.kv.buffers import BufferPool, cpu_buffer
from distserve.kv.handle import KvHandle
from distserve.kv.push import Channel, KvSender, PushKvTransport
from distserve.rpc.channels import ChannelPool
from distserve.v1 import kv_pb2

logger = logging.getLogger(__name__)


def status() -> tuple[bool, str]:
    """(usable, reason when not): whether `mooncake.engine` imports in this process."""
    try:
        from mooncake import engine  # noqa: F401
    except Exception as exc:  # ImportError, or a missing shared library behind it
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def rdma_devices() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


class _Engine:
    """One TransferEngine of this process and the buffers registered with it."""

    def __init__(self, host: str):
        from mooncake.engine import TransferEngine

        self.te = TransferEngine()
        protocol = "rdma" if rdma_devices() else "tcp"
        rc = self.te.initialize(host, "P2PHANDSHAKE", protocol, "")
        if rc != 0:
            raise Unavailable(f"Mooncake TransferEngine.initialize({host}, P2PHANDSHAKE, {protocol}) returned {rc}")
        self.session = f"{host}:{self.te.get_rpc_port()}"
        self.protocol = protocol
        logger.warning("Mooncake engine %s (%s) listens on every interface, not only %s, and authenticates no peer "
                       "(its API takes no bind address): keep its network isolated", self.session, protocol, host)

    def buffer(self, nbytes: int) -> torch.Tensor:
        buf = cpu_buffer(nbytes)
        buf.fill_(0)  # fault the pages in before the engine pins them
        rc = self.te.register_memory(buf.data_ptr(), nbytes)
        if rc != 0:
            raise Unavailable(f"Mooncake register_memory of {nbytes} bytes returned {rc}")
        return buf

    def free(self, buf: torch.Tensor) -> None:
        self.te.unregister_memory(buf.data_ptr())


class MooncakeKvTransport(PushKvTransport):
    name = "mooncake"

    def __init__(self, channel_pool: ChannelPool, host: str, *, wire_dtype: str = "", idle_s: float = 60.0,
                 timeout_s: float = 60.0, max_idle_bytes: int = 1 << 30):
        super().__init__(channel_pool, wire_dtype=wire_dtype, timeout_s=timeout_s)
        self.engine = _Engine(host)
        self.buffers: BufferPool[torch.Tensor] = BufferPool(self.engine.buffer, self.engine.free, max_idle_bytes=max_idle_bytes, idle_s=idle_s)

    async def _open(self, handle: KvHandle, nbytes: int):
        buf = await asyncio.to_thread(self.buffers.acquire, nbytes)
        channel = Channel(self.name, handle.worker_id, handle.kv_address, self.engine.session)
        return channel, buf, None, {"addr": str(buf.data_ptr())}

    def _return(self, channel: Channel, buf: torch.Tensor, reuse: bool) -> None:
        if reuse:
            self.buffers.release(buf)
        else:
            self.buffers.discard(buf)

    async def close(self) -> None:
        self.buffers.clear()


class MooncakeKvSender(KvSender):
    name = "mooncake"

    def __init__(self, host: str, *, max_idle_bytes: int = 1 << 30):
        self.engine = _Engine(host)
        self.staging: BufferPool[torch.Tensor] = BufferPool(self.engine.buffer, self.engine.free, max_idle_bytes=max_idle_bytes)
        self._lock = threading.Lock()

    def params(self) -> dict[str, str]:
        return {self.name: self.engine.session}

    async def push(self, request: kv_pb2.PushKvRequest, payload: torch.Tensor) -> bool:
        addr = int(request.params.get("addr", "0"))
        if not addr or not request.channel:
            raise Unavailable("mooncake push without a destination session and address")
        n = payload.numel()
        buf = self.staging.acquire(n)
        try:
            rc = await asyncio.to_thread(self._write, buf, payload, request.channel, addr)
        except BaseException:
            self.staging.discard(buf)
            raise
        self.staging.release(buf)
        if rc != 0:
            raise Unavailable(f"Mooncake transfer_sync_write to {request.channel} returned {rc}")
        return True

    def _write(self, buf: torch.Tensor, payload: torch.Tensor, session: str, addr: int) -> int:
        n = payload.numel()
        buf[:n].copy_(payload.cpu())
        return self.engine.te.transfer_sync_write(session, buf.data_ptr(), addr, n)

    def evict_idle(self) -> int:
        return self.staging.evict_idle()

    async def close(self) -> None:
        self.staging.clear()
