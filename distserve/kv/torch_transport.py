"""KV over torch.distributed point-to-point, in pairwise process groups made on demand.

One code path, two backends: "gloo" when KV lives on the CPU, "nccl" when both sides hold it on CUDA.
No global process group: each (puller, holder) pair gets its own 2-rank group (holder rank 0, puller
rank 1), built directly from a store, cached, and dropped when idle, so a worker never holds more
groups than peers it talks to recently (the peers that keep one NCCL group per pair forever leak).

Lifecycle of a pair:
  puller: first pull from a holder -> new channel id and a `PairStore` of its own (a TCPStore on this
          worker's data-plane host only, with a per-pair secret; see `distserve.kv.rendezvous`) ->
          build rank 1 of the group over it while KvTransfer.Connect (carrying the store's address
          and secret) has the holder join and build rank 0 -> close the store (gloo: at once; nccl:
          after the first transfer) -> cache the pair
  holder: `TorchKvSender` runs no listener of its own; gloo's pair sockets of either side bind
          that side's data-plane host
  each pull (serialized per pair): post receives of the payload in chunks (tags from a per-pair
          counter) -> Push (the holder sends each chunk and waits) -> wait for the receives
  a failed pull, or a pair idle for idle_s: abort the group (both ends: Disconnect is sent when
          idle; a holder also drops pairs idle for 2 * idle_s + 10, or unknown to it after a failure)
Receive buffers come from a `BufferPool` (warm memory) and return there when the KV is loaded.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distserve.errors import InvalidRequest, Unavailable
from distserve.kv.buffers import BufferPool, cpu_buffer
from distserve.kv.handle import KvHandle
from distserve.kv.push import Channel, KvSender, PushKvTransport
from distserve.kv.rendezvous import SECRET_BYTES, PairStore
from distserve.rpc.channels import ChannelPool
from distserve.v1 import kv_pb2

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
DEFAULT_CHUNK_BYTES = 64 << 20  # largest single send; a payload goes in ceil(n / chunk) messages


def available_backends(device: torch.device) -> tuple[str, ...]:
    """Backends this process can offer for KV on `device`."""
    if not dist.is_available():
        return ()
    out = []
    if device.type == "cuda" and dist.is_nccl_available() and torch.cuda.is_available():
        out.append("nccl")
    if device.type == "cpu" and dist.is_gloo_available():
        out.append("gloo")
    return tuple(out)


def make_group(store: dist.Store, rank: int, backend: str, timeout_s: float, device: torch.device, host: str = ""):
    """A 2-rank process group of `backend` over `store` (blocks until the peer joins); gloo's pair
    sockets listen on `host` (default: the address this machine's hostname resolves to)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host) if host else dist.ProcessGroupGloo.create_default_device()]
        return dist.ProcessGroupGloo(store, rank, 2, opts)
    if backend == "nccl":
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    raise Unavailable(f"unknown torch.distributed backend {backend!r}")


def _chunks(nbytes: int, chunk: int) -> list[tuple[int, int]]:
    return [(o, min(chunk, nbytes - o)) for o in range(0, nbytes, chunk)] or [(0, 0)]


def _drop_group(pg) -> None:
    try:
        pg.abort()
    except Exception as exc:  # already broken: nothing more to free
        logger.debug("aborting a process group failed: %s", exc)


def _close_store_early(backend: str) -> bool:
    """gloo needs the store only to build the group; NCCL also at the first send/recv (its unique id)."""
    return backend != "nccl"


# -- the holder's end ---------------------------------------------------------------------------
@dataclass(slots=True)
class _HolderPair:
    pg: object
    peer: str
    last_used: float
    store: PairStore | None = None  # the puller's rendezvous store, until the group no longer needs it
    lock: threading.Lock = field(default_factory=threading.Lock)


class TorchKvSender(KvSender):
    def __init__(self, backend: str, host: str, *, device: torch.device | str = "cpu",
                 idle_s: float = 60.0, timeout_s: float = 60.0, max_pairs: int = 256):
        self.name = backend
        self.host = host  # the data-plane interface: gloo's pair sockets listen there
        self.device = torch.device(device)
        self.idle_s = 2 * idle_s + 10  # outlives the puller's idle time, so the puller closes first
        self.timeout_s = timeout_s
        self.max_pairs = max_pairs
        self._pairs: dict[str, _HolderPair] = {}
        self._lock = threading.Lock()

    def pairs(self) -> int:
        with self._lock:
            return len(self._pairs)

    async def connect(self, request: kv_pb2.ConnectKvRequest) -> None:
        channel = request.channel
        if not channel or "/" in channel:
            raise Unavailable(f"bad channel id {channel!r}")
        try:
            address, secret = request.params["store"], bytes.fromhex(request.params["secret"])
        except (KeyError, ValueError):
            raise InvalidRequest("params", f"{self.name} Connect needs the pair's rendezvous store and secret") from None
        if len(secret) != SECRET_BYTES:
            raise InvalidRequest("params", f"a pair secret has {SECRET_BYTES} bytes")
        store = None
        try:
            store = await asyncio.to_thread(PairStore.join, address, secret, self.timeout_s)
            pg = await asyncio.to_thread(make_group, store, 0, self.name, self.timeout_s, self.device, self.host)
        except Exception as exc:
            if store is not None:
                store.close()
            raise Unavailable(f"{self.name} rendezvous with {request.peer_id} failed: {exc}") from None
        if _close_store_early(self.name):
            store.close()
        with self._lock:
            self._pairs[channel] = _HolderPair(pg, request.peer_id, time.monotonic(), None if store.closed else store)
            extra = sorted(self._pairs.items(), key=lambda kv: kv[1].last_used)[: max(0, len(self._pairs) - self.max_pairs)]
            for key, _ in extra:
                del self._pairs[key]
        for _, pair in extra:
            _drop_group(pair.pg)
        logger.info("%s pair %r with %r open (%d pairs)", self.name, channel, request.peer_id, self.pairs())

    async def push(self, request: kv_pb2.PushKvRequest, payload: torch.Tensor) -> bool:
        with self._lock:
            pair = self._pairs.get(request.channel)
        if pair is None:
            return False
        tag = int(request.params.get("tag", "0"))
        chunk = int(request.params.get("chunk", DEFAULT_CHUNK_BYTES))
        payload = payload.to(self.device)
        try:
            await asyncio.to_thread(self._send_all, pair, payload, tag, chunk)
        except Exception as exc:
            self._forget(request.channel)
            raise Unavailable(f"{self.name} send to {pair.peer} failed: {exc}") from None
        return True

    def _send_all(self, pair: _HolderPair, payload: torch.Tensor, tag: int, chunk: int) -> None:
        with pair.lock:
            pair.last_used = time.monotonic()
            for i, (offset, n) in enumerate(_chunks(payload.numel(), chunk)):
                self._send_chunk(pair, payload[offset : offset + n], tag + i)
            pair.last_used = time.monotonic()
            if pair.store is not None:  # nccl: its communicator exists now
                pair.store.close()
                pair.store = None

    def _send_chunk(self, pair: _HolderPair, data: torch.Tensor, tag: int) -> None:
        pair.pg.send([data], 1, tag).wait(datetime.timedelta(seconds=self.timeout_s))

    async def disconnect(self, request: kv_pb2.DisconnectKvRequest) -> bool:
        return self._forget(request.channel)

    def _forget(self, channel: str) -> bool:
        with self._lock:
            pair = self._pairs.pop(channel, None)
        if pair is not None:
            _drop_group(pair.pg)
            if pair.store is not None:
                pair.store.close()
        return pair is not None

    def evict_idle(self) -> int:
        cutoff = time.monotonic() - self.idle_s
        with self._lock:
            idle = [k for k, p in self._pairs.items() if p.last_used <= cutoff and not p.lock.locked()]
        return sum(self._forget(k) for k in idle)

    async def close(self) -> None:
        with self._lock:
            keys = list(self._pairs)
        for key in keys:
            self._forget(key)


# -- the puller's end ---------------------------------------------------------------------------
@dataclass(slots=True)
class _PullerPair:
    pg: object
    store: PairStore | None  # the rendezvous store, until the group no longer needs it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_tag: int = 0
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0


class TorchKvTransport(PushKvTransport):
    def __init__(self, backend: str, channel_pool: ChannelPool, *, host: str = "127.0.0.1", worker_id: str = "",
                 device: torch.device | str = "cpu", wire_dtype: str = "", idle_s: float = 60.0, timeout_s: float = 60.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_idle_bytes: int = 1 << 30):
        super().__init__(channel_pool, wire_dtype=wire_dtype, timeout_s=timeout_s)
        self.name = backend
        self.host = host  # the data-plane interface: each pair's rendezvous store and gloo's sockets listen there
        self.worker_id = worker_id or f"puller-{uuid.uuid4().hex[:6]}"
        self.device = torch.device(device)
        self.idle_s = idle_s
        self.chunk_bytes = chunk_bytes
        make = cpu_buffer if self.device.type == "cpu" else (lambda n: torch.empty(n, dtype=torch.uint8, device=self.device))
        self.buffers: BufferPool[torch.Tensor] = BufferPool(make, max_idle_bytes=max_idle_bytes, idle_s=idle_s)
        self._pairs: dict[str, Channel] = {}  # by holder worker id
        self._opening: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task | None = None

    def pairs(self) -> int:
        return len(self._pairs)

    async def _pair(self, handle: KvHandle) -> Channel:
        key = handle.worker_id
        lock = self._opening.setdefault(key, asyncio.Lock())
        async with lock:
            channel = self._pairs.get(key)
            if channel is not None:
                return channel
            channel = await self._connect(handle)
            self._pairs[key] = channel
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())
        return channel

    async def _connect(self, handle: KvHandle) -> Channel:
        channel_id = uuid.uuid4().hex
        try:
            store = await asyncio.to_thread(PairStore.serve, self.host, self.timeout_s)
        except Exception as exc:
            raise Unavailable(f"{self.name} rendezvous store on {self.host} failed: {exc}") from None
        building = asyncio.ensure_future(asyncio.to_thread(make_group, store, 1, self.name, self.timeout_s, self.device, self.host))
        request = kv_pb2.ConnectKvRequest(transport=self.name, channel=channel_id, peer_id=self.worker_id, params=store.params())
        try:
            await self.stub(handle.kv_address).Connect(request, timeout=self.timeout_s)
            pg = await building
        except BaseException as exc:
            store.close()  # a rank still waiting in it fails at its timeout
            building.add_done_callback(lambda f: f.exception() is None and _drop_group(f.result()))
            raise Unavailable(f"{self.name} rendezvous with {handle.worker_id} failed: {exc}") from None
        if _close_store_early(self.name):
            store.close()
        logger.info("%s pair %r with %r open", self.name, channel_id, handle.worker_id)
        return Channel(self.name, handle.worker_id, handle.kv_address, channel_id, _PullerPair(pg, None if store.closed else store))

    async def _open(self, handle: KvHandle, nbytes: int):
        channel = await self._pair(handle)
        pair: _PullerPair = channel.state
        await pair.lock.acquire()  # one transfer at a time per pair: released in _done
        pair.busy += 1
        try:
            if self._pairs.get(channel.holder) is not channel:
                raise Unavailable(f"{self.name} pair with {channel.holder} closed meanwhile")
            buf = self.buffers.acquire(nbytes)
            tag = pair.next_tag
            chunks = _chunks(nbytes, self.chunk_bytes)
            pair.next_tag += len(chunks)
            works = [pair.pg.recv([buf[o : o + n]], 0, tag + i) for i, (o, n) in enumerate(chunks)]
        except BaseException:
            pair.busy -= 1
            pair.lock.release()
            raise
        return channel, buf, works, {"tag": str(tag), "chunk": str(self.chunk_bytes)}

    async def _finish(self, channel: Channel, recv) -> None:
        timeout = datetime.timedelta(seconds=self.timeout_s)
        await asyncio.to_thread(lambda: [w.wait(timeout) for w in recv])

    def _end(self, channel: Channel, ok: bool) -> None:
        pair: _PullerPair = channel.state
        pair.busy -= 1
        pair.last_used = time.monotonic()
        if ok and pair.store is not None:  # nccl: its communicator exists now
            pair.store.close()
            pair.store = None
        pair.lock.release()
        if not ok:
            self._drop(channel)

    def _return(self, channel: Channel, buf: torch.Tensor, reuse: bool) -> None:
        if reuse:
            self.buffers.release(buf)
        else:
            self.buffers.discard(buf)

    def _gone(self, channel: Channel) -> None:
        self._drop(channel)

    def _drop(self, channel: Channel) -> None:
        if self._pairs.get(channel.holder) is channel:
            del self._pairs[channel.holder]
        _drop_group(channel.state.pg)
        if channel.state.store is not None:
            channel.state.store.close()
        logger.info("%s pair %s with %s dropped", self.name, channel.channel_id, channel.holder)

    async def _reap(self) -> None:
        while self._pairs:
            await asyncio.sleep(max(0.05, self.idle_s / 4))
            self.buffers.evict_idle()
            cutoff = time.monotonic() - self.idle_s
            for channel in [c for c in self._pairs.values() if c.state.last_used <= cutoff and not c.state.lock.locked()]:
                await self._close_pair(channel)

    async def _close_pair(self, channel: Channel) -> None:
        self._drop(channel)
        try:
            await self.stub(channel.address).Disconnect(kv_pb2.DisconnectKvRequest(transport=self.name, channel=channel.channel_id), timeout=5)
        except Exception as exc:  # the holder drops it on its own when idle
            logger.debug("disconnect of %s pair %s failed: %s", self.name, channel.channel_id, exc)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for channel in list(self._pairs.values()):
            await self._close_pair(channel)
        self.buffers.clear()
