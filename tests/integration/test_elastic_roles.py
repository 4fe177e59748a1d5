"""An elastic worker changes role under load without losing a request: router, a prefill worker, a
decode worker and an elastic worker (tiny-llama) as processes. It starts as prefill, is asked to serve
decode while requests stream, then back; every request finishes with the tokens transformers gives,
and the worker serves each role's legs once it took that role."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis
import torch

from distserve.client import AsyncClient
from distserve.state.redis_server import RedisServer
from distserve.state.registry import Registry
from tests.integration.service_procs import Cluster, scrape, total

pytestmark = pytest.mark.timeout(600)

WORKER = ["--model", "tiny-llama", "--num-blocks", "1024", "--threads", "1", "--heartbeat-s", "0.2", "--ttl-s", "2",
          "--metrics-port", "0", "--leave-s", "0.3", "--drain-s", "20"]


def reference(lm, prompt, n):
    ids = torch.tensor([prompt])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


async def roles(redis_url: str) -> dict[str, str]:
    r = aioredis.from_url(redis_url)
    try:
        return {v.worker_id: v.info.role for v in await Registry(r).live_workers()}
    finally:
        await r.aclose()


async def wait_role(redis_url: str, worker: str, role: str, timeout_s: float = 30.0) -> float:
    t0 = time.monotonic()
    while (await roles(redis_url)).get(worker) != role:
        assert time.monotonic() - t0 < timeout_s, f"{worker} never registered as {role}"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def ask(redis_url: str, worker: str, role: str) -> None:
    """Through the CLI an operator would use."""
    out = subprocess.run([sys.executable, "-m", "distserve.cli", "role", "set", worker, role, "--redis-url", redis_url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"asked {worker} to serve {role}" in out.stdout


def test_an_elastic_worker_changes_role_under_load_and_loses_no_request(tmp_path, tiny):
    rng = random.Random(4)
    reqs = [([rng.randrange(3, 259) for _ in range(rng.randrange(8, 150))], rng.randrange(4, 40)) for _ in range(90)]
    with RedisServer() as redis, Cluster(tmp_path) as c:
        common = ["--redis-url", redis.url]
        workers = [c.start("prefill", "prefill", [*common, *WORKER, "--worker-id", "prefill-a"]),
                   c.start("elastic", "prefill", [*common, *WORKER, "--worker-id", "elastic-e", "--elastic", "true"]),
                   c.start("decode", "decode", [*common, *WORKER, "--worker-id", "decode-d"])]
        router = c.start("router", "router", [*common, "--model", "tiny-llama", "--port", "0", "--metrics-port", "0", "--refresh-s", "0.1"])
        for s in (*workers, router):
            s.wait_ready()

        async def load(client, batch):
            return await asyncio.gather(*(client.generate(p, max_tokens=n, temperature=0.0) for p, n in batch))

        async def go():
            assert (await roles(redis.url))["elastic-e"] == "prefill"
            async with AsyncClient(router.address) as client:
                first = await load(client, reqs[:15])  # elastic-e prefills some of these
                running = asyncio.ensure_future(load(client, reqs[15:45]))  # in flight while it changes role
                await asyncio.sleep(0.05)
                await asyncio.to_thread(ask, redis.url, "elastic-e", "decode")
                took = await wait_role(redis.url, "elastic-e", "decode")
                during = await running
                as_decode = await load(client, reqs[45:70])  # two decode workers now: elastic-e decodes some
                await asyncio.to_thread(ask, redis.url, "elastic-e", "prefill")
                running = asyncio.ensure_future(load(client, reqs[70:]))
                await wait_role(redis.url, "elastic-e", "prefill")
                back = await running
            return first, during, as_decode, back, took

        try:
            first, during, as_decode, back, took = asyncio.run(go())
            outs = first + during + as_decode + back
            for (p, n), o in zip(reqs, outs):
                assert o.token_ids == reference(tiny, p, n)  # not one lost, cut short or altered
            assert any(o.metrics.prefill_worker == "elastic-e" for o in first)
            assert any(o.metrics.decode_worker == "elastic-e" for o in as_decode)
            assert not any(o.metrics.prefill_worker == "elastic-e" for o in as_decode)
            assert all(o.metrics.decode_worker != "elastic-e" for o in first)
            assert took < 20
            r = scrape("127.0.0.1", router.metrics_port)
            assert total(r, "distserve_requests_total", role="router", outcome="finished") == len(reqs)
            assert total(r, "distserve_requests_total", role="router", outcome="failed") == 0
            assert "changing role from prefill to decode" in workers[1].text()
            assert "serving as decode" in workers[1].text() and "serving as prefill" in workers[1].text()
        except BaseException:
            c.dump()
            raise
