"""A worker publishes the requests it holds open (`WorkerLoad.open_requests`), and the router balances
colocated workers by them (real processes: Redis, two colocated tiny-llama workers, a router). The
router once balanced by the running batch alone, which leaves out prompts waiting to be prefilled, and
forgot its own sends at every registry read, before the workers' next heartbeat showed them."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis.asyncio as aioredis

from distserve.client import Client
from distserve.state.redis_server import RedisServer
from distserve.state.registry import Registry
from tests.integration.service_procs import Cluster

pytestmark = pytest.mark.timeout(240)

STREAMS = 6
MAX_TOKENS = 1000  # ~1.5 s each on tiny-llama, 4.5 s for a worker's three in turn


def _loads(url: str) -> dict[str, int]:
    async def read():
        r = aioredis.from_url(url)
        try:
            return {v.worker_id: v.load.open_requests for v in await Registry(r).live_workers()}
        finally:
            await r.aclose()

    return asyncio.run(read())


def test_open_requests_are_published_and_a_burst_spreads_over_colocated_workers(tmp_path):
    with RedisServer() as redis, Cluster(tmp_path) as cluster:
        common = ["--model", "tiny-llama", "--redis-url", redis.url, "--port", "0"]
        workers = [cluster.start(f"col-{i}", "colocated", [*common, "--threads", "1", "--heartbeat-s", "0.1", "--max-num-seqs", "1",
                                                            "--worker-id", f"col-{i}"]) for i in (1, 2)]
        router = cluster.start("router", "router", common)
        for s in (*workers, router):
            s.wait_ready()
        assert _loads(redis.url) == {"col-1": 0, "col-2": 0}
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                with Client(router.address, timeout_s=120) as c:
                    c.generate([5 + i, 6, 7], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
            time.sleep(0.05)  # one by one, as arrivals come
        # one request runs on each worker (--max-num-seqs 1), the others wait there: all are open
        deadline = time.monotonic() + 5
        while sum((held := _loads(redis.url)).values()) < STREAMS and time.monotonic() < deadline:
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert not errors, errors
        # every request is open on one worker or the other, though one runs on each; spread about
        # evenly (a send made just before a heartbeat counts twice for up to SENT_SLACK_S, so three
        # and three, or two and four)
        assert sum(held.values()) == STREAMS and min(held.values()) >= STREAMS // 2 - 1, held
