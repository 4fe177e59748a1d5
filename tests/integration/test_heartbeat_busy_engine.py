"""A worker whose engine is busy for longer than its registry TTL stays registered: the heartbeat never
waits on the engine thread for the prefix filter. A saturated one-core prefill worker runs steps of
seconds, and while its heartbeat waited for the hashes its entry expired and routers refused requests
('no prefill worker is available'); here a real engine, a real redis-server, the real heartbeat."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from distserve.engine.prefix import BlockBloom, block_hashes
from distserve.engine.sampling import SamplingParams
from distserve.runtime import WorkerSettings
from distserve.state.redis_server import RedisServer
from distserve.state.registry import Heartbeat, Registry, WorkerInfo
from services.worker.runtime import WorkerRuntime

pytestmark = pytest.mark.timeout(120)

TTL_S = 0.6
BUSY_S = 4 * TTL_S  # one "step" the heartbeat must not wait for
PROMPT = list(range(3, 3 + 40))  # two full blocks of 16 cached


def test_entry_outlives_an_engine_step_longer_than_its_ttl_and_the_filter_follows():
    settings = WorkerSettings(role="prefill", model="tiny-llama", threads=1, num_blocks=64, heartbeat_s=0.1, ttl_s=TTL_S)
    rt = WorkerRuntime(settings, ())
    rt.load()
    rt.worker.start()
    e = rt.engine
    info = WorkerInfo("prefill-busy", "prefill", "127.0.0.1:1", "127.0.0.1:1", "tiny-llama", "h", ("grpc",),
                      e.blocks.num_blocks, e.config.block_size, e.max_model_len, time.time(),
                      prefix_root=f"{e.prefix_root:016x}")

    async def main() -> None:
        with RedisServer() as server:
            r = aioredis.from_url(server.url)
            reg = Registry(r)
            hb = Heartbeat(reg, info, rt.load_now, interval_s=settings.heartbeat_s, ttl_s=TTL_S, extra_fn=rt.prefix_fields)
            try:
                assert await hb.start()
                # a prompt fills the prefix cache, so the next tick wants the hashes from the engine thread
                stream = await rt.worker.generate("r1", PROMPT, SamplingParams(max_tokens=1, temperature=0.0))
                async for _ in stream:
                    pass
                busy = asyncio.ensure_future(rt.worker.call(lambda eng: time.sleep(BUSY_S)))
                await asyncio.sleep(0.05)  # the engine thread is in the long command now
                absent = 0
                while not busy.done():
                    live = {v.worker_id for v in await reg.live_workers()}
                    absent += "prefill-busy" not in live
                    await asyncio.sleep(0.05)
                assert absent == 0, f"the entry expired while the engine was busy ({absent} reads without it)"
                assert hb.failures == 0
                # once the engine answers, the filter with the prompt's cached blocks is published
                want = block_hashes(PROMPT, e.config.block_size, e.prefix_root)[:2]
                deadline = time.monotonic() + 5
                while True:
                    bits = (await reg.prefixes(["prefill-busy"])).get("prefill-busy")
                    if bits and BlockBloom(bits).prefix_blocks(want) == len(want):
                        break
                    assert time.monotonic() < deadline, "the prefix filter never followed"
                    await asyncio.sleep(0.05)
            finally:
                await hb.stop()
                await r.aclose()

    try:
        asyncio.run(main())
    finally:
        rt.worker.stop()
