"""KV over a chunked gRPC stream: the holder's KvTransfer servicer and the puller's transport.

Lifecycle: a prefill worker registers `KvTransferServicer(lease_table)` (or a subclass) with
`add_to_server`. A decode worker's `GrpcKvTransport.borrow(handle)` calls Pull: the holder pins the
lease, runs the export function in a thread, and streams the tensor's bytes in chunks of at most
chunk_bytes (the first chunk also carries shape, dtype and total size); the puller writes each chunk
straight into a warm receive buffer from its pool, checking offsets, size, shape and dtype, and the
buffer goes back to the pool when the KV is loaded (`Pulled.release()`). The Release RPC
(`kv.release.LeaseClient`) then frees the holder's KV; pulling after that is NOT_FOUND.

Why the chunks bypass protobuf objects: a 4 MiB `bytes` field costs a copy into the message, another
on serialising and two more on parsing and reading it back. The holder therefore writes each KvChunk
on the wire itself (the small fields through protobuf, then the data field's tag, length and bytes:
one copy of the KV), and the puller finds the data field in the received bytes and copies it once
into its buffer. The bytes on the wire are an ordinary KvChunk; any gRPC client can read them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
import torch

from distserve.errors import Unavailable
from distserve.kv.buffers import BufferPool, cpu_buffer
from distserve.kv.compression import decode, normalize, wire_nbytes
from distserve.engine.kv_cache import dtype_name
from distserve.kv.handle import KvHandle
from distserve.kv.lease import LeaseTable
from distserve.kv.transport import KvTransport, Pulled
from distserve.rpc.channels import ChannelPool
from distserve.rpc.errors import error_from_rpc
from distserve.v1 import kv_pb2, kv_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
SERVICE = "distserve.v1.KvTransfer"
_DATA_KEY = b"\x12"  # KvChunk field 2 (data), wire type 2 (length-delimited)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """A flat, writable byte view of a contiguous CPU tensor's storage (no copy)."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise Unavailable("malformed KvChunk from the holder (truncated varint)")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def encode_chunks(data: memoryview, chunk_bytes: int, shape, dtype: str, wire_dtype: str = "") -> Iterator[bytes]:
    """Serialised KvChunk messages covering `data`, each holding at most chunk_bytes of it."""
    total = len(data)
    offset = 0
    while True:
        end = min(offset + chunk_bytes, total)
        head = kv_pb2.KvChunk(offset=offset, total_bytes=total)
        if offset == 0:
            head.shape.extend(shape)
            head.dtype = dtype
            head.wire_dtype = wire_dtype
        yield b"".join((head.SerializeToString(), _DATA_KEY, _varint(end - offset), data[offset:end]))
        offset = end
        if offset >= total:
            return


def split_chunk(raw: bytes) -> tuple[kv_pb2.KvChunk, memoryview]:
    """A serialised KvChunk as (its fields other than data, a view of data inside `raw`)."""
    buf = memoryview(raw)
    head: list[memoryview] = []
    data = buf[0:0]
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        kind = key & 7
        if kind == 0:
            _, pos = _read_varint(buf, pos)
        elif kind == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > len(buf):
                raise Unavailable("malformed KvChunk from the holder (field runs past the message)")
            if key >> 3 == 2:
                data = buf[pos : pos + n]  # the last occurrence wins, as in protobuf
                pos += n
                continue
            pos += n
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        else:
            raise Unavailable(f"malformed KvChunk from the holder (wire type {kind})")
        head.append(buf[start:pos])
    return kv_pb2.KvChunk.FromString(b"".join(head)), data


def _serialize(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(servicer: kv_pb2_grpc.KvTransferServicer, server) -> None:
    """Register a KvTransfer servicer whose Pull yields pre-serialised chunks (`encode_chunks`).

    The same RPCs and messages as `kv_pb2_grpc.add_KvTransferServicer_to_server`; only Pull's
    response serialiser passes bytes through."""
    methods = {}
    for method in kv_pb2.DESCRIPTOR.services_by_name["KvTransfer"].methods:
        request = getattr(kv_pb2, method.input_type.name)
        handler = getattr(servicer, method.name)
        if method.server_streaming:
            methods[method.name] = grpc.unary_stream_rpc_method_handler(
                handler, request_deserializer=request.FromString, response_serializer=_serialize)
        else:
            methods[method.name] = grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=request.FromString, response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))


class KvTransferServicer(kv_pb2_grpc.KvTransferServicer):
    """Serves held KV from a LeaseTable. Register it with `add_to_server`."""

    def __init__(self, lease_table: LeaseTable, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self._leases = lease_table
        self._chunk_bytes = chunk_bytes

    def _payload(self, export_fn, wire_dtype: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(the KV as exported, the bytes to send, the wire dtype): runs in a worker thread."""
        tensor = export_fn()
        return tensor, tensor, ""

    async def Pull(self, request: kv_pb2.PullKvRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        chunk = min(request.chunk_bytes or self._chunk_bytes, self._chunk_bytes)
        with self._leases.pinned(request.request_id, request.transfer_token) as export_fn:
            kv, payload, wire = await asyncio.to_thread(self._payload, export_fn, request.wire_dtype)
            if payload.device.type != "cpu":
                payload = await asyncio.to_thread(payload.cpu)
            data = _byte_view(payload.contiguous())
            for message in encode_chunks(data, chunk, kv.shape, dtype_name(kv.dtype), wire):
                yield message
        logger.debug("streamed KV of %r: %d bytes in chunks of %d", request.request_id, len(data), chunk)

    async def Release(self, request: kv_pb2.ReleaseKvRequest, context: grpc.aio.ServicerContext) -> kv_pb2.ReleaseKvResponse:
        released = self._leases.release(request.request_id, request.transfer_token)
        return kv_pb2.ReleaseKvResponse(released=released)


class GrpcKvTransport(KvTransport):
    """Pulls KV over KvTransfer.Pull from the handle's kv_address into pooled receive buffers."""

    name = "grpc"

    def __init__(self, channel_pool: ChannelPool, *, timeout_s: float = 30.0, chunk_bytes: int = 0, wire_dtype: str = "",
                 max_idle_bytes: int = 1 << 30, idle_s: float = 60.0):
        self._pool = channel_pool
        self._timeout_s = timeout_s  # deadline of one whole pull
        self._chunk_bytes = chunk_bytes  # asked of the holder; 0 = its default
        self.wire_dtype = wire_dtype  # "" = as held; "float16"/"int8" ask the holder to compress
        self.buffers: BufferPool[torch.Tensor] = BufferPool(cpu_buffer, max_idle_bytes=max_idle_bytes, idle_s=idle_s)

    async def borrow(self, handle: KvHandle, timeout_s: float | None = None) -> Pulled:
        """The KV as a `Pulled` whose tensor lives in a pooled buffer until `release()`."""
        wire = normalize(self.wire_dtype, handle.layout.dtype_name)
        need = wire_nbytes(handle.layout, handle.num_tokens, wire)
        self.buffers.evict_idle()
        buf = self.buffers.acquire(need)
        try:
            await self._receive(handle, wire, _byte_view(buf)[:need], timeout_s)
        except BaseException:
            self.buffers.discard(buf)  # the stream may have stopped mid-write; nothing reads it
            raise
        if wire:  # decoded into a new tensor: the buffer is free again
            tensor = decode(buf[:need], handle.layout, handle.num_tokens, wire)
            self.buffers.release(buf)
            return Pulled(tensor, need, wire)
        tensor = buf[:need].view(handle.layout.dtype).view(handle.shape)
        return Pulled(tensor, need, wire, lambda reuse: self.buffers.release(buf) if reuse else self.buffers.discard(buf))

    async def _receive(self, handle: KvHandle, wire: str, view: memoryview, timeout_s: float | None) -> None:
        expected = len(view)
        request = kv_pb2.PullKvRequest(
            request_id=handle.request_id, transfer_token=handle.transfer_token, chunk_bytes=self._chunk_bytes,
            wire_dtype=wire,
        )
        pull = self._pool.get(handle.kv_address).unary_stream(
            f"/{SERVICE}/Pull", request_serializer=kv_pb2.PullKvRequest.SerializeToString, response_deserializer=None)
        call = pull(request, timeout=timeout_s or self._timeout_s)
        received = 0
        try:
            async for raw in call:
                head, data = split_chunk(raw)
                if received == 0:
                    _check_header(handle, head, expected, wire)
                n = len(data)
                if head.offset != received or received + n > expected:
                    raise Unavailable(
                        f"KV of {handle.request_id}: chunk at {head.offset}+{n} does not follow {received} of {expected}"
                    )
                view[received : received + n] = data
                received += n
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            call.cancel()  # no-op when the stream ended; stops the holder when we bail out
        if received != expected:
            raise Unavailable(f"KV of {handle.request_id}: stream ended after {received} of {expected} bytes")

    async def close(self) -> None:
        self.buffers.clear()


def _check_header(handle: KvHandle, chunk: kv_pb2.KvChunk, expected: int, wire: str = "") -> None:
    if tuple(chunk.shape) != handle.shape or chunk.dtype != handle.layout.dtype_name or chunk.total_bytes != expected or chunk.wire_dtype != wire:
        raise Unavailable(
            f"KV of {handle.request_id}: holder sent shape {tuple(chunk.shape)} {chunk.dtype} "
            f"({chunk.total_bytes} bytes of {chunk.wire_dtype or 'raw'}), handle says {handle.shape} "
            f"{handle.layout.dtype_name} ({expected} bytes of {wire or 'raw'})"
        )
