"""Drain: a router stops picking a worker the moment its gRPC health turns NOT_SERVING (or its
health stream breaks), without waiting for its registry read; and a prefill worker told to stop keeps
serving the KV it holds until a decode worker has pulled it, then exits cleanly."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from distserve.engine.sampling import SamplingParams
from distserve.kv.grpc_transport import GrpcKvTransport
from distserve.kv.release import LeaseClient
from distserve.kv.handle import KvHandle
from distserve.rpc.channels import ChannelPool
from distserve.rpc.convert import params_to_pb
from distserve.rpc.server import build_server
from distserve.state.redis_server import RedisServer
from distserve.state.registry import Registry, WorkerInfo, WorkerLoad
from distserve.v1 import prefill_pb2, prefill_pb2_grpc
from services.router.picker import WorkerPicker
from tests.integration.service_procs import Cluster

pytestmark = pytest.mark.timeout(180)


def info(worker_id: str, address: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role="decode", address=address, kv_address=address, model="m", host_id="h",
                      transports=("grpc",), total_blocks=64, block_size=16, max_model_len=1024, started_at=time.time())


async def until(fn, timeout_s: float = 2.0) -> float:
    """Awaits fn() until it is true; returns the seconds it took."""
    t0 = time.monotonic()
    while not await fn():
        assert time.monotonic() - t0 < timeout_s, "condition not reached"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def test_picker_drops_a_worker_at_once_when_its_health_leaves_serving():
    async def go():
        with RedisServer() as server:
            r = aioredis.from_url(server.url)
            reg = Registry(r)
            built = {}
            for wid in ("a", "b"):
                built[wid] = await build_server(("distserve.v1.Decode",))
                await built[wid].server.start()
                await built[wid].health.set_serving()
                await reg.register(info(wid, built[wid].address), WorkerLoad(free_blocks=64, total_blocks=64), ttl_s=60)
            pool = ChannelPool()
            watching = WorkerPicker(reg, "m", refresh_s=60.0, pool=pool)  # reads the registry once in this test
            blind = WorkerPicker(reg, "m", refresh_s=60.0)  # the control: no health watches
            try:
                assert await _ids(watching) == {"a", "b"} == await _ids(blind)
                await asyncio.sleep(0.2)  # the watches have seen SERVING

                await built["a"].health.set_not_serving()  # what a worker does first on SIGTERM
                took = await until(lambda: _absent(watching, "a"))
                assert took < 1.0 and await _ids(blind) == {"a", "b"}  # still registered: only the watch knew
                await built["a"].health.set_serving()
                await until(ids_equal(watching, {"a", "b"}))  # back when it serves again

                await built["b"].server.stop(grace=None)  # gone without a word: its stream breaks
                await until(lambda: _absent(watching, "b"))
                assert (await watching.pick_decode(lambda bs: 1)).worker_id == "a"
                assert len(await reg.live_workers()) == 2  # the registry has not noticed either
            finally:
                await watching.close()
                await pool.close_all()
                for b in built.values():
                    await b.server.stop(grace=None)
                await r.aclose()

    asyncio.run(go())


async def _ids(picker: WorkerPicker) -> set[str]:
    return {v.worker_id for v in await picker.workers()}


async def _absent(picker: WorkerPicker, wid: str) -> bool:
    return wid not in await _ids(picker)


def ids_equal(picker: WorkerPicker, want: set[str]):
    async def check() -> bool:
        return await _ids(picker) == want
    return check


def test_a_stopping_prefill_worker_serves_its_held_kv_until_it_is_pulled(tmp_path):
    with RedisServer() as server, Cluster(tmp_path) as c:
        w = c.start("prefill", "prefill", ["--model", "tiny-llama", "--redis-url", server.url, "--num-blocks", "64", "--threads", "1",
                                           "--heartbeat-s", "0.2", "--ttl-s", "2", "--drain-s", "30", "--lease-s", "30",
                                           "--metrics-port", "-1", "--worker-id", "prefill-d"])
        w.wait_ready()

        async def go():
            pool = ChannelPool()
            r = aioredis.from_url(server.url)
            try:
                params = params_to_pb(SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
                resp = await prefill_pb2_grpc.PrefillStub(pool.get(w.address)).Prefill(
                    prefill_pb2.PrefillRequest(request_id="held-1", token_ids=[5] * 40, params=params), timeout=30)
                handle = KvHandle.from_proto(resp.kv_handle)
                w.terminate()  # SIGTERM with one prompt's KV held for a decode worker
                await until(lambda: _gone(r), timeout_s=5)  # it left the registry
                await asyncio.sleep(1.0)  # past leave_s: only the held KV keeps it up now
                assert w.popen.poll() is None, "the worker exited with KV still held"
                kv = await GrpcKvTransport(pool).pull(handle)  # a decode worker pulls it, then releases the lease
                assert kv.shape[2] == 40
                assert await LeaseClient(pool).release_handle(handle)
            finally:
                await pool.close_all()
                await r.aclose()

        async def _gone(r) -> bool:
            return not await Registry(r).live_workers()

        asyncio.run(go())
        t0 = time.monotonic()
        assert w.wait(15) == 0
        assert time.monotonic() - t0 < 5  # it left soon after the lease was released, not at the end of drain_s
