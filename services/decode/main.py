"""`distserve serve decode` (and `serve colocated`): one decode worker (Decode service)."""

from __future__ import annotations

from distserve.kv.grpc_transport import GrpcKvTransport
from distserve.rpc.channels import ChannelPool
from distserve.runtime import WorkerRuntime, WorkerSettings
from distserve.v1 import decode_pb2_grpc
from services.decode.servicer import DecodeServicer

SERVICES = ("distserve.v1.Decode",)
TRANSPORTS = ("grpc",)


async def run(settings: WorkerSettings) -> None:
    rt = WorkerRuntime(settings, SERVICES)
    await rt.start()
    pool = ChannelPool()
    decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(rt, GrpcKvTransport(pool), TRANSPORTS), rt.built.server)
    try:
        await rt.serve(TRANSPORTS)
    finally:
        await pool.close_all()
