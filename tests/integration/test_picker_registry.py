"""The router's picker against a real Redis registry: a worker that registered after the picker's last
read (within refresh_s) is found when no worker of its role was known, instead of a request failing
with "no decode worker is available" (seen in a loaded CI run right after a suite came up)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from distserve.state.redis_server import RedisServer
from distserve.state.registry import Registry, WorkerInfo, WorkerLoad
from services.router.picker import SENT_SLACK_S, WorkerPicker


def _info(wid: str, role: str) -> WorkerInfo:
    return WorkerInfo(wid, role, f"127.0.0.1:{1000 + len(wid)}", "", "m", "h", ("grpc",), 100, 16, 2048, 0.0)


def test_a_role_with_no_known_worker_is_read_again_before_refusing():
    async def go():
        with RedisServer() as server:
            r = aioredis.from_url(server.url)
            reg = Registry(r)
            await reg.register(_info("p1", "prefill"), WorkerLoad(free_blocks=100, total_blocks=100), ttl_s=30)
            picker = WorkerPicker(reg, "m", refresh_s=3600)  # no periodic re-read within the test
            assert [v.worker_id for v in await picker.workers()] == ["p1"]
            await reg.register(_info("d1", "decode"), WorkerLoad(free_blocks=100, total_blocks=100), ttl_s=30)
            assert (await picker.pick_decode(lambda bs: 1)).worker_id == "d1"
            await r.aclose()

    asyncio.run(go())


def test_requests_sent_since_a_workers_last_heartbeat_still_count_after_a_read():
    """Two colocated workers, both idle at their last heartbeat: a burst spreads over both even when
    the registry is read again between the sends (the heartbeats come slower than the reads), and a
    heartbeat taken after the sends replaces the router's own count."""

    async def go():
        with RedisServer() as server:
            r = aioredis.from_url(server.url)
            reg = Registry(r)
            for wid in ("c1", "c2"):
                await reg.register(_info(wid, "colocated"), WorkerLoad(free_blocks=100, total_blocks=100), ttl_s=30)
            picker = WorkerPicker(reg, "m", refresh_s=0.0)  # every call reads the registry
            picks = []
            for _ in range(20):
                picks.append((await picker.pick_decode(lambda bs: 1, role="colocated")).worker_id)
                # each send goes to one with fewer (forgetting sends at a read, the picks were random: 1 in 1024 stays even)
                assert abs(picks.count("c1") - picks.count("c2")) <= 1, picks
            await asyncio.sleep(SENT_SLACK_S + 0.02)  # a heartbeat clearly after the sends
            # c1's heartbeat now says it holds 5 (it got 10 from us, 1 from another router): c2 takes the next
            await reg.heartbeat("c1", WorkerLoad(open_requests=11, free_blocks=100, total_blocks=100), ttl_s=30)
            views = {v.worker_id: v for v in await picker.workers(force=True)}
            assert picker.assigned(views["c1"]) == 11 and picker.assigned(views["c2"]) == 10
            assert (await picker.pick_decode(lambda bs: 1, role="colocated")).worker_id == "c2"
            await r.aclose()

    asyncio.run(go())
