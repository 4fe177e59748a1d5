"""`distserve serve prefill`: one prefill worker (Prefill + KvTransfer services)."""

from __future__ import annotations

import asyncio

from distserve.kv import factory
from distserve.kv.grpc_transport import add_to_server as add_kv_transfer
from distserve.kv.lease import LeaseTable
from distserve.kv.server import KvTransferServer
from distserve.runtime import WorkerRuntime, WorkerSettings
from distserve.v1 import prefill_pb2_grpc
from services.prefill.servicer import PrefillServicer

SERVICES = ("distserve.v1.Prefill", "distserve.v1.KvTransfer")


async def run(settings: WorkerSettings) -> None:
    rt = WorkerRuntime(settings, SERVICES)
    await rt.start()
    leases = LeaseTable(default_ttl_s=settings.lease_s)
    device = rt.engine.cache.data.device
    offers = factory.available(device, settings.kv_transport)
    senders = factory.build_senders(offers, rt.advertise().rpartition(":")[0], device, settings.kv_idle_s, bind_host=settings.host)
    kv = KvTransferServer(leases, senders, block_size=settings.block_size)
    transports = ("grpc", *(s.name for s in senders))
    transports = tuple(n for n in offers if n in transports)
    prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(rt, leases, transports, kv.transport_params()), rt.built.server)
    add_kv_transfer(kv, rt.built.server)
    reaper = asyncio.create_task(leases.run_reaper(0.5))
    kv_reaper = asyncio.create_task(kv.run_reaper(min(5.0, settings.kv_idle_s / 2)))
    rt.on_stop = leases.release_all
    orig = rt.load_now

    def load_with_leases():
        rt.metrics.kv_leases.set(len(leases))
        return orig()

    rt.load_now = load_with_leases
    try:
        await rt.serve(transports)
    finally:
        reaper.cancel()
        kv_reaper.cancel()
        await kv.close()
