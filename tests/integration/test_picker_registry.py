"""The router's picker against a real Redis registry: a worker that registered after the picker's last
read (within refresh_s) is found when no worker of its role was known, instead of a request failing
with "no decode worker is available" (seen in a loaded CI run right after a suite came up)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from distserve.state.redis_server import RedisServer
from distserve.state.registry import Registry, WorkerInfo, WorkerLoad
from services.router.picker import WorkerPicker


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
