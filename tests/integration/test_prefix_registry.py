"""Prefix-cache filters through a real redis-server: published in the heartbeat that follows a change,
written again when the entry was lost, fetched by a router only when their version moved, and used
to route a prompt to the worker holding its prefix."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis

from distserve.engine.prefix import BlockBloom, block_hashes, root_hash
from distserve.state.redis_server import RedisServer
from distserve.state.registry import Heartbeat, Registry, WorkerInfo, WorkerLoad
from services.router.picker import WorkerPicker

pytestmark = pytest.mark.timeout(60)

ROOT = root_hash("tiny-llama", "float32", 16)
RNG = random.Random(1)
PROMPT = [RNG.randrange(3, 259) for _ in range(300)]


class FakeCache:
    """What a worker's engine would report: a version and the hashes it holds."""

    def __init__(self, hashes: list[int]):
        self.hashes, self.version, self.published = hashes, 1, 0
        self.calls: list[bool] = []

    async def extra(self, force: bool) -> dict[str, bytes]:
        self.calls.append(force)
        if not force and self.published == self.version:
            return {}
        self.published = self.version
        return {"prefix": BlockBloom.build(self.hashes, 64).bits}

    def load(self) -> WorkerLoad:
        return WorkerLoad(total_blocks=64, free_blocks=64, prefix_version=self.published)


def info(wid: str) -> WorkerInfo:
    return WorkerInfo(wid, "prefill", f"127.0.0.1:{6000 + len(wid)}", "", "tiny-llama", "h", ("grpc",), 64, 16, 2048, 0.0,
                      prefix_root=f"{ROOT:016x}")


def test_filters_are_published_refetched_on_change_and_route_prompts():
    async def main():
        with RedisServer() as server:
            r = aioredis.from_url(server.url)
            reg = Registry(r)
            a = FakeCache(block_hashes(PROMPT[:256], 16, ROOT))  # holds 16 blocks of the prompt
            b = FakeCache([])
            hbs = [Heartbeat(reg, info(w), c.load, interval_s=0.05, ttl_s=0.5, extra_fn=c.extra) for w, c in (("A", a), ("B", b))]
            for hb in hbs:
                await hb.start()
            await asyncio.sleep(0.2)
            assert a.calls[0] is True and not any(a.calls[1:])  # written once, then only the load
            got = await reg.prefixes(["A", "B", "nobody"])
            assert set(got) == {"A", "B"} and PROMPT and block_hashes(PROMPT, 16, ROOT)[0] in BlockBloom(got["A"])

            picker = WorkerPicker(reg, "tiny-llama", refresh_s=0.0, routing="kv")
            await picker.workers(force=True)
            [va] = [v for v in picker._views if v.worker_id == "A"]
            assert picker.cached_tokens(va, PROMPT) == 256
            assert {(await picker.peek_prefill(prompt=PROMPT)).worker_id for _ in range(10)} == {"A"}

            # B computes the prompt: its next heartbeat publishes, the router's next read fetches it
            b.hashes, b.version = block_hashes(PROMPT, 16, ROOT), 2
            await asyncio.sleep(0.2)
            await picker.workers(force=True)
            [vb] = [v for v in picker._views if v.worker_id == "B"]
            assert picker.cached_tokens(vb, PROMPT) == 288  # all 18 full blocks of 300 tokens

            # Redis loses everything: the re-registered entries carry their filters again
            await r.flushall()
            await asyncio.sleep(0.3)
            assert set(await reg.prefixes(["A", "B"])) == {"A", "B"}
            for hb in hbs:
                await hb.stop()
            await r.aclose()

    asyncio.run(main())
