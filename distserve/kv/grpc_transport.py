"""KV over a chunked gRPC stream: the holder's KvTransfer servicer and the puller's transport.

Lifecycle: a prefill worker adds `KvTransferServicer(lease_table)` to its server. A decode worker's
`GrpcKvTransport.pull(handle)` calls Pull: the holder pins the lease, runs the export function in a
thread, and streams the tensor's bytes in chunks of at most chunk_bytes (the first chunk also carries
shape, dtype and total size); the puller writes each chunk straight into a tensor it preallocated from
the handle, checking offsets, size, shape and dtype. `release(handle)` (Release RPC) then frees the
holder's KV; pulling after that is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import torch

from distserve.engine.errors import Unavailable
from distserve.kv.handle import KvHandle, dtype_name
from distserve.kv.lease import LeaseTable
from distserve.kv.transport import KvTransport
from distserve.rpc.channels import ChannelPool
from distserve.rpc.errors import error_from_rpc, grpc_errors
from distserve.v1 import kv_pb2, kv_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """A flat, writable byte view of a contiguous CPU tensor's storage (no copy)."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


class KvTransferServicer(kv_pb2_grpc.KvTransferServicer):
    """Serves held KV from a LeaseTable."""

    def __init__(self, lease_table: LeaseTable, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self._leases = lease_table
        self._chunk_bytes = chunk_bytes

    @grpc_errors
    async def Pull(self, request: kv_pb2.PullKvRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[kv_pb2.KvChunk]:
        chunk = min(request.chunk_bytes or self._chunk_bytes, self._chunk_bytes)
        with self._leases.pinned(request.request_id, request.transfer_token) as export_fn:
            tensor = await asyncio.to_thread(export_fn)
            if tensor.device.type != "cpu":
                tensor = await asyncio.to_thread(tensor.cpu)
            if not tensor.is_contiguous():
                tensor = tensor.contiguous()
            data = _byte_view(tensor)
            total = len(data)
            shape = list(tensor.shape)
            dtype = dtype_name(tensor.dtype)
            offset = 0
            while True:
                end = min(offset + chunk, total)
                msg = kv_pb2.KvChunk(offset=offset, data=bytes(data[offset:end]), total_bytes=total)
                if offset == 0:
                    msg.shape.extend(shape)
                    msg.dtype = dtype
                yield msg
                offset = end
                if offset >= total:
                    break
        logger.debug("streamed KV of %s: %d bytes in chunks of %d", request.request_id, total, chunk)

    @grpc_errors
    async def Release(self, request: kv_pb2.ReleaseKvRequest, context: grpc.aio.ServicerContext) -> kv_pb2.ReleaseKvResponse:
        released = self._leases.release(request.request_id, request.transfer_token)
        return kv_pb2.ReleaseKvResponse(released=released)


class GrpcKvTransport(KvTransport):
    """Pulls KV over KvTransfer.Pull from the handle's kv_address."""

    name = "grpc"

    def __init__(self, channel_pool: ChannelPool, *, timeout_s: float = 30.0, chunk_bytes: int = 0, wire_dtype: str = ""):
        self._pool = channel_pool
        self._timeout_s = timeout_s  # deadline of one whole pull
        self._chunk_bytes = chunk_bytes  # asked of the holder; 0 = its default
        self.wire_dtype = wire_dtype  # "" = as held; "float16"/"int8" ask the holder to compress

    def _stub(self, address: str) -> kv_pb2_grpc.KvTransferStub:
        return kv_pb2_grpc.KvTransferStub(self._pool.get(address))

    async def borrow(self, handle: KvHandle):
        """The KV as a `distserve.kv.push.Pulled` (owned memory; release() is a no-op)."""
        from distserve.kv.compression import normalize, wire_nbytes
        from distserve.kv.push import Pulled

        tensor = await self.pull(handle)
        wire = normalize(self.wire_dtype, handle.layout.dtype)
        return Pulled(tensor, wire_nbytes(handle.layout, handle.num_tokens, wire), wire)

    async def pull(self, handle: KvHandle, timeout_s: float | None = None) -> torch.Tensor:
        from distserve.kv.compression import decode, normalize, wire_nbytes

        wire = normalize(self.wire_dtype, handle.layout.dtype)
        if wire:
            dst = torch.empty(wire_nbytes(handle.layout, handle.num_tokens, wire), dtype=torch.uint8)
        else:
            dst = torch.empty(handle.shape, dtype=handle.layout.torch_dtype)
        view = _byte_view(dst)
        expected = len(view)
        request = kv_pb2.PullKvRequest(
            request_id=handle.request_id, transfer_token=handle.transfer_token, chunk_bytes=self._chunk_bytes,
            wire_dtype=wire,
        )
        call = self._stub(handle.kv_address).Pull(request, timeout=timeout_s or self._timeout_s)
        received = 0
        first = True
        try:
            async for chunk in call:
                if first:
                    _check_header(handle, chunk, expected, wire)
                    first = False
                n = len(chunk.data)
                if chunk.offset != received or received + n > expected:
                    raise Unavailable(
                        f"KV of {handle.request_id}: chunk at {chunk.offset}+{n} does not follow {received} of {expected}"
                    )
                view[received : received + n] = chunk.data
                received += n
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            call.cancel()  # no-op when the stream ended; stops the holder when we bail out
        if received != expected:
            raise Unavailable(f"KV of {handle.request_id}: stream ended after {received} of {expected} bytes")
        return decode(dst, handle.layout, handle.num_tokens, wire) if wire else dst

    async def release(self, handle: KvHandle, timeout_s: float = 5.0) -> bool:
        """Tell the holder to free the KV; False if it was already gone."""
        request = kv_pb2.ReleaseKvRequest(request_id=handle.request_id, transfer_token=handle.transfer_token)
        try:
            response = await self._stub(handle.kv_address).Release(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return response.released


def _check_header(handle: KvHandle, chunk: kv_pb2.KvChunk, expected: int, wire: str = "") -> None:
    if tuple(chunk.shape) != handle.shape or chunk.dtype != handle.layout.dtype or chunk.total_bytes != expected or chunk.wire_dtype != wire:
        raise Unavailable(
            f"KV of {handle.request_id}: holder sent shape {tuple(chunk.shape)} {chunk.dtype} "
            f"({chunk.total_bytes} bytes), handle says {handle.shape} {handle.layout.dtype} ({expected} bytes)"
        )
