"""`distserve serve prefill`: one prefill worker (Prefill + KvTransfer services)."""

from __future__ import annotations

import asyncio

from distserve.kv.grpc_transport import KvTransferServicer
from distserve.kv.lease import LeaseTable
from distserve.runtime import WorkerRuntime, WorkerSettings
from distserve.v1 import kv_pb2_grpc, prefill_pb2_grpc
from services.prefill.servicer import PrefillServicer

SERVICES = ("distserve.v1.Prefill", "distserve.v1.KvTransfer")
TRANSPORTS = ("grpc",)


async def run(settings: WorkerSettings) -> None:
    rt = WorkerRuntime(settings, SERVICES)
    await rt.start()
    leases = LeaseTable(default_ttl_s=settings.lease_s)
    prefill_pb2_grpc.add_PrefillServicer_to_server(PrefillServicer(rt, leases, TRANSPORTS), rt.built.server)
    kv_pb2_grpc.add_KvTransferServicer_to_server(KvTransferServicer(leases), rt.built.server)
    reaper = asyncio.create_task(leases.run_reaper(0.5))
    rt.on_stop = leases.release_all
    orig = rt.load_now

    def load_with_leases():
        rt.metrics.kv_leases.set(len(leases))
        return orig()

    rt.load_now = load_with_leases
    try:
        await rt.serve(TRANSPORTS)
    finally:
        reaper.cancel()
