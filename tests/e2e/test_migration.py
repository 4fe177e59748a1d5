"""Requests survive a worker's or a router's death mid-stream (real processes, tiny-llama).

Redis, one prefill worker, two decode workers and two routers run as separate processes. A reference
run gives each request's exact tokens; then the same requests run again and a process is killed
(SIGKILL) while every stream is under way. Greedy and seeded sampled requests must come out
token-identical to the reference: decode migration by token replay (the router prefills prompt +
emitted tokens elsewhere and decoding continues, seeded draws keyed by output position), and a client
given both routers resuming a cut stream on the other one. The chaos suite (tests/chaos/) covers the
other faults under load; this is the short version the default test run keeps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from distserve.client import AsyncClient
from distserve.state.redis_server import RedisServer
from tests.integration.service_procs import Cluster, scrape, total

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 300
REQUESTS = [  # (prompt, sampling): greedy ones and seeded sampled ones
    ([5 + i] * (8 + 5 * i), dict(temperature=0.0)) for i in range(4)
] + [([40 + i] * 12, dict(temperature=0.9, top_p=0.95, seed=1000 + i)) for i in range(2)]


@pytest.fixture
def suite(tmp_path):
    with RedisServer() as redis, Cluster(tmp_path) as cluster:
        common = ["--model", "tiny-llama", "--redis-url", redis.url, "--port", "0"]
        worker = [*common, "--threads", "1", "--heartbeat-s", "0.2", "--ttl-s", "1.5"]
        procs = {
            "prefill-1": cluster.start("prefill-1", "prefill", [*worker, "--worker-id", "prefill-1"]),
            "decode-1": cluster.start("decode-1", "decode", [*worker, "--worker-id", "decode-1"]),
            "decode-2": cluster.start("decode-2", "decode", [*worker, "--worker-id", "decode-2"]),
        }
        for name in ("a", "b"):
            procs[f"router-{name}"] = cluster.start(f"router-{name}", "router", [*common, "--stall-timeout-s", "5", "--refresh-s", "0.1"])
        for p in procs.values():
            p.wait_ready()
        yield procs


async def _run(targets, started_after: int = 0, on_started=None) -> list[list[int] | BaseException]:
    """Every request of REQUESTS as a stream; once each has `started_after` tokens, calls on_started()."""
    started = 0
    fired = asyncio.Event()

    async def one(c, prompt, kw):
        nonlocal started
        got: list[int] = []
        async for ch in c.stream(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, timeout_s=120, **kw):
            before = len(got)
            got.extend(ch.token_ids)
            if started_after and before < started_after <= len(got):
                started += 1
                if started == len(REQUESTS):
                    on_started()
                    fired.set()
            await asyncio.sleep(0.002)  # a slow reader, so the streams are still going at the fault
        return got

    async with AsyncClient(targets) as c:
        return await asyncio.gather(*(one(c, p, kw) for p, kw in REQUESTS), return_exceptions=True)


def test_a_decode_worker_killed_mid_stream_loses_no_request(suite):
    router = suite["router-a"]
    reference = asyncio.run(_run(router.address))
    assert all(isinstance(r, list) and len(r) == MAX_TOKENS for r in reference), reference
    killed = []

    def kill_the_busier_decode_worker():  # the one holding streams now (the picker may have used only one)
        load = {n: total(scrape("127.0.0.1", suite[n].metrics_port), "distserve_inflight_requests") for n in ("decode-1", "decode-2")}
        victim = suite[max(load, key=load.get)]
        os.kill(victim.popen.pid, signal.SIGKILL)
        killed.append(victim)

    outs = asyncio.run(_run(router.address, started_after=5, on_started=kill_the_busier_decode_worker))
    assert killed[0].popen.wait(10) == -signal.SIGKILL
    for got, want in zip(outs, reference):
        assert got == want  # no token missing, repeated or different; seeded ones included
    samples = scrape("127.0.0.1", router.metrics_port)
    assert total(samples, "distserve_migrations_total") >= 1
    # the survivor serves new requests at once
    again = asyncio.run(_run(router.address))
    assert again == reference


def test_a_router_killed_mid_stream_is_resumed_on_the_other(suite):
    a, b = suite["router-a"], suite["router-b"]
    reference = asyncio.run(_run(b.address))
    t_kill = []

    def kill():
        t_kill.append(time.monotonic())
        os.kill(a.popen.pid, signal.SIGKILL)

    outs = asyncio.run(_run([a.address, b.address], started_after=5, on_started=kill))
    assert a.popen.wait(10) == -signal.SIGKILL
    for got, want in zip(outs, reference):
        assert got == want
