"""Releasing a KV lease at its holder: the one client of `KvTransfer.Release`.

A decode worker releases a lease once it has pulled the KV; a router releases one that no decode
worker took (the request failed, was cancelled, or is replayed from scratch). Neither needs a whole
KV transport for that (receive buffers, torch): `LeaseClient` is one unary call over the caller's
shared channel pool (the pool owns the channels and closes them). A holder that no longer knows the
lease (already released, expired) answers released=False; a failed call raises the domain error of
its status (`rpc.errors.error_from_rpc`). Torch-free, like the router that uses it.
"""

from __future__ import annotations

import grpc

from distserve.rpc.channels import ChannelPool
from distserve.rpc.errors import error_from_rpc
from distserve.v1 import kv_pb2, kv_pb2_grpc


class LeaseClient:
    def __init__(self, pool: ChannelPool, timeout_s: float = 5.0):
        self._pool = pool  # shared: one channel per peer, closed by its owner
        self.timeout_s = timeout_s  # deadline of one Release call

    async def release(self, kv_address: str, request_id: str, transfer_token: bytes, timeout_s: float | None = None) -> bool:
        """Frees the KV held for request_id at kv_address; False when the holder had none (any more)."""
        stub = kv_pb2_grpc.KvTransferStub(self._pool.get(kv_address))
        request = kv_pb2.ReleaseKvRequest(request_id=request_id, transfer_token=transfer_token)
        try:
            response = await stub.Release(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return response.released

    async def release_handle(self, handle, timeout_s: float | None = None) -> bool:
        """The same for a handle (a `kv.handle.KvHandle` or a `common_pb2.KvHandle`: both carry these fields)."""
        return await self.release(handle.kv_address, handle.request_id, handle.transfer_token, timeout_s)
