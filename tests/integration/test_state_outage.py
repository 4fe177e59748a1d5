"""The state layer against a real redis-server that goes away: the bounded pool of `connect`, outages
as `Unavailable` (gRPC UNAVAILABLE), the picker serving from its last registry read, and the reaper
that closes the requests of dead routers."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import grpc
import pytest

from distserve.errors import Unavailable
from distserve.metrics import Metrics
from distserve.rpc.errors import status_for
from distserve.state.connect import connect
from distserve.state.redis_server import RedisServer
from distserve.state.registry import Heartbeat, Registry, WorkerInfo, WorkerLoad
from distserve.state.requests import RequestPhase, RequestStateStore
from distserve.state.routers import Orphan, Reaper, RouterHeartbeat, RouterInfo, index_key, reap_orphans
from services.router.picker import WorkerPicker

pytestmark = pytest.mark.timeout(60)

FAST = 1.5  # seconds: what a call to a dead Redis may cost at most with the default timeouts


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def worker(worker_id: str, role: str = "prefill") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, address="127.0.0.1:1", kv_address="127.0.0.1:1",
                      model="tiny-llama", host_id="h", transports=("grpc",), total_blocks=64, block_size=16,
                      max_model_len=512, started_at=time.time())


async def fails_fast(call) -> float:
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="Redis unavailable"):
        await call
    return time.monotonic() - t0


def test_pool_is_bounded_and_exhaustion_waits_then_gives_unavailable(redis: RedisServer) -> None:
    async def main() -> None:
        r = connect(redis.url, role="test", max_connections=2, timeout_s=0.4)
        reg = Registry(r)
        try:
            await reg.register(worker("p0"), WorkerLoad())
            pool = r.connection_pool
            held = [await pool.get_connection(), await pool.get_connection()]  # the whole pool, busy
            t0 = time.monotonic()
            with pytest.raises(Unavailable, match="Redis unavailable while reading the worker registry"):
                await reg.live_workers()
            waited = time.monotonic() - t0
            assert 0.35 <= waited < FAST, waited  # it waited for a connection, then gave up

            # a connection coming back within the wait serves the waiting call
            async def give_back_soon() -> None:
                await asyncio.sleep(0.1)
                await pool.release(held.pop())

            views, _ = await asyncio.gather(reg.live_workers(), give_back_soon())
            assert [v.worker_id for v in views] == ["p0"]
            await pool.release(held.pop())
            # 20 concurrent calls share the 2 sockets: none fails, none opens a third
            await asyncio.gather(*(reg.live_workers() for _ in range(20)))
            clients = await r.client_list()
            assert sum(c.get("name") == "distserve-test" for c in clients) <= 2
        finally:
            await r.aclose()

    asyncio.run(main())


def test_redis_stopped_or_hung_gives_unavailable_quickly() -> None:
    async def main() -> None:
        server = RedisServer().start()
        r = connect(server.url, role="test")
        reg = Registry(r)
        store = RequestStateStore(r, router_id="router-a")
        hb = Heartbeat(reg, worker("p0"), WorkerLoad, interval_s=0.1, ttl_s=1.0)
        presence = RouterHeartbeat(r, RouterInfo("router-a", "127.0.0.1:1", time.time()), interval_s=0.1, ttl_s=1.0)
        try:
            assert await hb.start() and await presence.start()
            await store.update("q1", RequestPhase.QUEUED)

            os.kill(server.pid, signal.SIGSTOP)  # hung: connections open, no replies
            try:
                assert await fails_fast(reg.live_workers()) < FAST
                assert await fails_fast(store.update("q1", RequestPhase.DECODING)) < FAST
            finally:
                os.kill(server.pid, signal.SIGCONT)

            server.stop()  # gone: connections refused
            for call in (reg.live_workers(), reg.register(worker("p1"), WorkerLoad()), reg.deregister("p0"),
                         store.update("q1", RequestPhase.FINISHED), store.get("q1"), store.inflight(),
                         store.delete("q1"), presence.beat(), reap_orphans(r)):
                assert await fails_fast(call) < FAST
            try:
                await store.get("q1")
            except Unavailable as exc:
                assert status_for(exc)[0] == grpc.StatusCode.UNAVAILABLE  # never INTERNAL at the boundary
            # the heartbeats only count failures; their tasks live on
            await asyncio.sleep(0.5)
            assert hb.failures > 0 and hb._task is not None and not hb._task.done()
        finally:
            await hb.stop(deregister=True)  # logs, does not raise
            await presence.stop(leave=True)
            await r.aclose()
            server.stop()

    asyncio.run(main())


def test_picker_routes_from_its_last_read_while_redis_is_down_and_rereads_after() -> None:
    async def main() -> None:
        server = RedisServer().start()
        port = server.port
        r = connect(server.url, role="test")
        reg = Registry(r)
        metrics = Metrics("router")
        picker = WorkerPicker(reg, "tiny-llama", refresh_s=0.05, metrics=metrics)
        cold = WorkerPicker(reg, "tiny-llama", refresh_s=0.05)  # never read the registry
        second = None
        try:
            await reg.register(worker("p0"), WorkerLoad(), ttl_s=30)
            await reg.register(worker("d0", role="decode"), WorkerLoad(), ttl_s=30)
            assert [v.worker_id for v in await picker.workers()] == ["d0", "p0"]
            server.stop()
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            for _ in range(20):  # every call answers from the cache; re-reads run in the background
                assert [v.worker_id for v in await picker.workers(force=True)] == ["d0", "p0"]
                assert (await picker.pick_prefill(8)).worker_id == "p0"
                await asyncio.sleep(0.02)
            assert time.monotonic() - t0 < FAST
            assert metrics.registry_up._value.get() == 0
            with pytest.raises(Unavailable):  # nothing to fall back on
                await cold.workers()

            second = RedisServer(port=port).start()
            await reg.register(worker("p1"), WorkerLoad(), ttl_s=30)
            deadline = time.monotonic() + 5
            while [v.worker_id for v in await picker.workers()] != ["p1"]:
                assert time.monotonic() < deadline, "the picker did not read the registry again"
                await asyncio.sleep(0.05)
            assert metrics.registry_up._value.get() == 1
        finally:
            await picker.close()
            await cold.close()
            await r.aclose()
            server.stop()
            if second is not None:
                second.stop()

    asyncio.run(main())


def test_reaper_expires_a_dead_routers_open_requests_exactly_once(redis: RedisServer) -> None:
    async def main() -> None:
        r = connect(redis.url, role="test")
        try:
            a = RequestStateStore(r, router_id="router-a")
            b = RequestStateStore(r, router_id="router-b")
            beat_a = RouterHeartbeat(r, RouterInfo("router-a", "127.0.0.1:1", time.time()), interval_s=0.1, ttl_s=0.4)
            beat_b = RouterHeartbeat(r, RouterInfo("router-b", "127.0.0.1:2", time.time()), interval_s=0.1, ttl_s=0.4)
            await beat_a.start()
            await beat_b.start()
            for rid, store, phases in (
                ("a-decoding", a, [RequestPhase.QUEUED, RequestPhase.PREFILLED, RequestPhase.DECODING]),
                ("a-queued", a, [RequestPhase.QUEUED]),
                ("a-finished", a, [RequestPhase.QUEUED, RequestPhase.DECODING, RequestPhase.FINISHED]),
                ("a-cancelled", a, [RequestPhase.QUEUED, RequestPhase.CANCELLED]),
                ("b-decoding", b, [RequestPhase.QUEUED, RequestPhase.DECODING]),
                ("moved", a, [RequestPhase.QUEUED, RequestPhase.DECODING]),
            ):
                for phase in phases:
                    await store.update(rid, phase)
            await b.update("moved", RequestPhase.DECODING)  # router b resumed it
            assert await a.inflight() == {"a-decoding", "a-queued", "moved"}
            assert (await a.get("a-decoding"))["router"] == "router-a"

            # nobody is dead yet
            assert await reap_orphans(r) == []
            await beat_a.stop(leave=False)  # router a dies: its key expires after its TTL
            await asyncio.sleep(0.6)

            # two routers reap at once: each request is closed by exactly one of them
            reaped: list[Orphan] = []
            reapers = [Reaper(r, on_reaped=reaped.extend) for _ in range(2)]
            results = await asyncio.gather(*(rp.reap() for rp in reapers for _ in range(3)))
            assert sorted(o.request_id for res in results for o in res) == ["a-decoding", "a-queued"]
            assert sorted(o.request_id for o in reaped) == ["a-decoding", "a-queued"]
            assert {o.router_id for o in reaped} == {"router-a"}

            for rid in ("a-decoding", "a-queued"):
                state = await a.get(rid)
                assert state["phase"] is RequestPhase.EXPIRED and state["phase"].terminal
                assert "router router-a died" in state["error"]
                assert state["t_expired"] > 0
            assert (await a.get("a-finished"))["phase"] is RequestPhase.FINISHED
            assert "error" not in await a.get("a-finished")
            assert (await a.get("a-cancelled"))["phase"] is RequestPhase.CANCELLED
            assert (await b.get("b-decoding"))["phase"] is RequestPhase.DECODING
            assert (await b.get("moved"))["phase"] is RequestPhase.DECODING
            assert await a.inflight() == set()
            assert {m.decode() for m in await r.smembers(index_key("distserve"))} == {"router-b"}
            assert await b.inflight() == {"b-decoding", "moved"}

            # a clean stop removes the presence at once, and the leftovers are reaped at the next tick
            reaper = Reaper(r, interval_s=0.1)
            reaper.start()
            await beat_b.stop(leave=True)
            deadline = time.monotonic() + 5
            while reaper.reaped < 2:  # counted once the script's reply is in, a moment after Redis wrote it
                assert time.monotonic() < deadline, "the reaper did not close router b's requests"
                await asyncio.sleep(0.05)
            await reaper.stop()
            assert reaper.reaped == 2
            assert (await b.get("b-decoding"))["phase"] is RequestPhase.EXPIRED
            await b.update("b-decoding", RequestPhase.FINISHED)  # a late write from a router that was not dead
            assert await b.inflight() == set()
        finally:
            await r.aclose()

    asyncio.run(main())
