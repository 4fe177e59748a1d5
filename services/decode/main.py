"""`distserve serve decode` (and `serve colocated`): one decode worker (Decode service)."""

from __future__ import annotations

from dataclasses import dataclass

from distserve.kv import factory
from distserve.kv.puller import KvPuller
from distserve.kv.release import LeaseClient
from distserve.kv.transport import KvTransports
from distserve.rpc.channels import ChannelPool
from distserve.runtime import WorkerSettings, host_id
from services.worker.runtime import WorkerRuntime
from distserve.v1 import decode_pb2_grpc
from services.decode.peers import KnownHolders
from services.decode.servicer import DecodeServicer

SERVICES = ("distserve.v1.Decode",)


@dataclass(slots=True)
class DecodeRole:
    """The Decode service on a runtime's server, and the KV pullers and channels it uses."""

    transports: tuple[str, ...]  # KV transports it can pull over, best first
    pullers: KvTransports
    pool: ChannelPool

    async def close(self) -> None:
        await self.pullers.close()
        await self.pool.close_all()


def attach(rt: WorkerRuntime, settings: WorkerSettings) -> DecodeRole:
    """Adds the Decode servicer to the runtime's (not yet started) server."""
    pool = ChannelPool(tls=rt.tls)
    device = rt.engine.cache.data.device
    offers = factory.available(device, settings.kv_transport)
    transports = factory.build_pullers(offers, pool, worker_id=rt.worker_id, device=device, wire_dtype=settings.kv_wire_dtype,
                                       idle_s=settings.kv_idle_s, buffer_bytes=settings.kv_buffer_bytes,
                                       advertise_host=rt.advertise().rpartition(":")[0], bind_host=settings.host)
    puller = KvPuller(transports, rt.metrics, host_id(), forced=settings.kv_transport)
    decode_pb2_grpc.add_DecodeServicer_to_server(DecodeServicer(rt, LeaseClient(pool), puller, KnownHolders(rt.registry, settings.model)), rt.built.handlers)
    return DecodeRole(transports.names(), transports, pool)


async def run(settings: WorkerSettings) -> None:
    rt = WorkerRuntime(settings, SERVICES)
    await rt.start()
    role = attach(rt, settings)
    try:
        await rt.serve(role.transports)
    finally:
        await role.close()
