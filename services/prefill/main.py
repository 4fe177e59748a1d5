"""`distserve serve prefill`: one prefill worker (Prefill + KvTransfer services)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from distserve.kv import factory
from distserve.kv.grpc_transport import add_to_server as add_kv_transfer
from distserve.kv.lease import LeaseTable
from distserve.kv.server import KvTransferServer
from distserve.runtime import WorkerSettings
from services.worker.runtime import WorkerRuntime
from distserve.v1 import prefill_pb2_grpc
from services.prefill.servicer import PrefillServicer

SERVICES = ("distserve.v1.Prefill", "distserve.v1.KvTransfer")


@dataclass(slots=True)
class PrefillRole:
    """The prefill services on a runtime's server, and what they run beside it."""

    transports: tuple[str, ...]  # KV transports it offers, best first
    kv: KvTransferServer
    tasks: tuple[asyncio.Task, ...]  # lease and KV-channel reapers

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await self.kv.close()


def attach(rt: WorkerRuntime, settings: WorkerSettings) -> PrefillRole:
    """Adds the Prefill and KvTransfer servicers to the runtime's (not yet started) server."""
    leases = LeaseTable(default_ttl_s=settings.lease_s)
    device = rt.engine.cache.data.device
    offers = factory.available(device, settings.kv_transport)
    senders = factory.build_senders(offers, rt.advertise().rpartition(":")[0], device, settings.kv_idle_s, bind_host=settings.host)
    kv = KvTransferServer(leases, senders, block_size=settings.block_size)
    transports = ("grpc", *(s.name for s in senders))
    transports = tuple(n for n in offers if n in transports)
    prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(rt, leases, transports, kv.transport_params()), rt.built.handlers)
    add_kv_transfer(kv, rt.built.handlers)
    tasks = (asyncio.create_task(leases.run_reaper(0.5)), asyncio.create_task(kv.run_reaper(min(5.0, settings.kv_idle_s / 2))))
    rt.on_stop = leases.release_all
    orig = rt.load_now

    def load_with_leases():
        rt.metrics.kv_leases.set(len(leases))
        return orig()

    rt.load_now = load_with_leases
    return PrefillRole(transports, kv, tasks)


async def run(settings: WorkerSettings) -> None:
    rt = WorkerRuntime(settings, SERVICES)
    await rt.start()
    role = attach(rt, settings)
    try:
        await rt.serve(role.transports)
    finally:
        await role.close()
