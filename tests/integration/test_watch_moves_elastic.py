"""`distserve plan --watch --apply` moves an elastic worker on its own: Redis, an elastic prefill worker,
a decode worker and a conditional router (tiny-llama) as processes. Under a decode-heavy load the
watch sees decode over its objective and prefill idle, asks the prefill worker to serve decode (the
last one: `--min-prefill 0`), and waits until it does; the decode workers then prefill every prompt
themselves. Every request, before, during and after, finishes with the tokens transformers gives."""

from __future__ import annotations

import asyncio
import random

import pytest

from distserve.client import AsyncClient
from distserve.planner.watch import Advisor, watch
from distserve.state.redis_server import RedisServer
from tests.integration.service_procs import Cluster, scrape, total
from tests.integration.test_elastic_roles import WORKER, reference, roles
from tests.unit.test_planner_latency import synthetic_profile

pytestmark = pytest.mark.timeout(600)


def test_the_watch_moves_the_idle_prefill_worker_to_decode_and_no_request_is_lost(tmp_path, tiny):
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randrange(8, 60))] for _ in range(8)]
    want = {i: reference(tiny, p, 48) for i, p in enumerate(prompts)}
    with RedisServer() as redis, Cluster(tmp_path) as c:
        common = ["--redis-url", redis.url]
        workers = [c.start("elastic", "prefill", [*common, *WORKER, "--worker-id", "prefill-e", "--elastic", "true"]),
                   c.start("decode", "decode", [*common, *WORKER, "--worker-id", "decode-d"])]
        router = c.start("router", "router", [*common, "--model", "tiny-llama", "--port", "0", "--metrics-port", "0",
                                              "--refresh-s", "0.1", "--disagg-mode", "conditional"])
        for s in (*workers, router):
            s.wait_ready()
        # any running decode is over a 1 us TPOT objective, and no prefill queue nears 1000 s of TTFT
        advisor = Advisor(synthetic_profile(), slo_ttft=1000.0, slo_tpot=1e-6, cores=2, window=2, min_prefill=0)
        lines: list[str] = []

        async def go():
            results: list[tuple[int, object]] = []
            async with AsyncClient(router.address) as client:
                async def one(i: int):
                    results.append((i, await client.generate(prompts[i], max_tokens=48, temperature=0.0)))

                watcher = asyncio.ensure_future(watch(redis.url, advisor, "tiny-llama", interval_s=0.2, iterations=300,
                                                      apply=True, out=lines.append))
                k = 0
                while not any(line.startswith("CHANGED") for line in lines):  # load until the move is done
                    assert not watcher.done(), "\n".join(lines[-20:])
                    assert k < 2000, "the watch never moved the prefill worker:\n" + "\n".join(lines[-20:])
                    await asyncio.gather(*(one((k + j) % len(prompts)) for j in range(8)))
                    k += 8
                await asyncio.sleep(0.5)  # the router's registry view (refreshed every 0.1 s) has the move too
                moved_after = len(results)
                await asyncio.gather(*(one(j % len(prompts)) for j in range(16)))  # two decode workers, no prefill worker
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            return results, moved_after

        try:
            results, moved_after = asyncio.run(go())
            assert asyncio.run(roles(redis.url)) == {"prefill-e": "decode", "decode-d": "decode"}
            for i, o in results:
                assert o.token_ids == want[i]  # not one lost, cut short or altered
            after = [o for _, o in results[moved_after:]]
            assert all(o.metrics.disagg_decision == "local" for o in after)
            assert any(o.metrics.decode_worker == "prefill-e" for o in after)
            assert any(line.startswith("APPLIED: asked elastic worker prefill-e to serve decode") for line in lines)
            assert sum(line.startswith("RECOMMEND") for line in lines) == 1  # nothing more once it moved
            r = scrape("127.0.0.1", router.metrics_port)
            assert total(r, "distserve_requests_total", role="router", outcome="finished") == len(results)
            assert total(r, "distserve_requests_total", role="router", outcome="failed") == 0
        except BaseException:
            print("\n".join(lines[-40:]))
            c.dump()
            raise
