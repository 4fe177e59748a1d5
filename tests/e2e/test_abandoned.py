"""Abandoned work stops at once (issue 20): requests whose deadline passes, or whose client goes away,
leave no work behind on any worker or in any queue, and nobody sees CANCELLED for a call they did not
cancel. Real processes: Redis, one prefill and one decode worker (tiny-llama), a router.

A burst far larger than the suite serves within its deadline is sent with a short deadline; every call
must be refused at admission, end with DEADLINE_EXCEEDED or complete (never CANCELLED, INTERNAL or
UNKNOWN), and within a few
seconds of the deadline both workers must be idle - no prefill queue, no running or reserved decode,
no KV block in use, no lease held - and a fresh request must be served at once.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from distserve.client import AsyncClient
from distserve.errors import DistserveError
from distserve.state.redis_server import RedisServer
from tests.integration.service_procs import Cluster, scrape, total

pytestmark = pytest.mark.timeout(240)

BURST = 300
DEADLINE_S = 2.0


def test_a_burst_past_its_deadline_leaves_no_work_behind(tmp_path):
    with RedisServer() as redis, Cluster(tmp_path) as cluster:
        common = ["--model", "tiny-llama", "--redis-url", redis.url, "--port", "0"]
        worker = [*common, "--threads", "1", "--num-blocks", "256", "--max-num-batched-tokens", "512"]
        prefill = cluster.start("prefill", "prefill", [*worker, "--worker-id", "prefill-1"])
        decode = cluster.start("decode", "decode", [*worker, "--worker-id", "decode-1"])
        router = cluster.start("router", "router", common)
        for s in (prefill, decode, router):
            s.wait_ready()

        async def one(c: AsyncClient, i: int) -> str:
            try:
                await c.generate([3 + i % 90] * (40 + i % 200), max_tokens=600, temperature=0.0, ignore_eos=True, timeout_s=DEADLINE_S)
                return "OK"
            except DistserveError as exc:
                return exc.grpc_code.name

        async def burst() -> list[str]:
            async with AsyncClient(router.address) as c:
                return await asyncio.gather(*(one(c, i) for i in range(BURST)))

        t0 = time.monotonic()
        statuses = asyncio.run(burst())
        ended = time.monotonic()
        counts = {s: statuses.count(s) for s in set(statuses)}
        # admission refuses at once what could not start before its deadline (RESOURCE_EXHAUSTED); the rest
        # completes or runs out of time: never CANCELLED, INTERNAL or UNKNOWN
        assert set(counts) <= {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, counts
        assert counts.get("DEADLINE_EXCEEDED", 0) > BURST // 10, counts  # admitted work really ran out of time
        assert ended - t0 < DEADLINE_S + 5, "calls outlived their deadline"

        def busy() -> dict[str, float]:
            p = scrape("127.0.0.1", prefill.metrics_port)
            d = scrape("127.0.0.1", decode.metrics_port)
            r = scrape("127.0.0.1", router.metrics_port)
            return {
                "router inflight": total(r, "distserve_inflight_requests", role="router"),
                "prefill queue": total(p, "distserve_queue_depth", role="prefill"),
                "prefill blocks": total(p, "distserve_kv_blocks_used", role="prefill"),
                "leases": total(p, "distserve_kv_leases_held"),
                "decode running": total(d, "distserve_running_requests", role="decode"),
                "decode blocks": total(d, "distserve_kv_blocks_used", role="decode"),
            }

        deadline = time.monotonic() + 10
        while any(busy().values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = busy()
        idle_after = time.monotonic() - ended
        assert not any(left.values()), f"work left {idle_after:.1f}s after the burst: {left}"
        print(f"\n{counts}; idle {idle_after:.2f}s after the last call ended")

        async def fresh() -> float:
            async with AsyncClient(router.address) as c:
                t = time.monotonic()
                out = await c.generate([7, 8, 9], max_tokens=8, temperature=0.0, ignore_eos=True, timeout_s=10)
                assert len(out.token_ids) == 8
                return time.monotonic() - t

        assert asyncio.run(fresh()) < 2.0  # served at once, not behind the abandoned burst
