"""Conditional disaggregation end to end: one prefill and one decode worker (tiny-llama) as processes,
and three routers over them, one per `--disagg-mode`. Local mode prefills on the decode worker (the
prefill worker sees nothing), remote mode on the prefill worker, and conditional chooses per request:
remote while the prefill pool is idle, local for short prompts while it has a queue, remote for long
ones; greedy output is the same whichever way a prompt went."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
import torch

from distserve.client import AsyncClient
from distserve.state.redis_server import RedisServer
from distserve.state.registry import Registry
from services.router.disagg import fitted
from tests.integration.service_procs import Cluster, scrape, total

pytestmark = pytest.mark.timeout(600)

WORKER = ["--model", "tiny-llama", "--num-blocks", "4096", "--threads", "1", "--heartbeat-s", "0.2", "--ttl-s", "3",
          "--metrics-port", "0"]
ROUTER = ["--model", "tiny-llama", "--port", "0", "--metrics-port", "0", "--refresh-s", "0.1"]
LOCAL_MAX = 128  # the conditional router's local_max_prompt_tokens
PROMPTS = [[3 + (7 * i + j) % 250 for j in range(10 + 15 * i)] for i in range(6)]  # 10 to 85 tokens
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    with RedisServer() as redis, Cluster(tmp_path_factory.mktemp("cond")) as c:
        common = ["--redis-url", redis.url]
        workers = [c.start("prefill", "prefill", [*common, *WORKER, "--worker-id", "prefill-c"]),
                   c.start("decode", "decode", [*common, *WORKER, "--worker-id", "decode-c"])]
        routers = {mode: c.start(f"router-{mode}", "router", [*common, *ROUTER, "--disagg-mode", mode,
                                                              "--local-max-prompt-tokens", str(LOCAL_MAX)])
                   for mode in ("local", "remote", "conditional")}
        for s in (*workers, *routers.values()):
            s.wait_ready()
        c.redis_url = redis.url
        c.prefill, c.decode, c.routers = workers[0], workers[1], routers
        yield c


def reference(lm, prompt, n):
    ids = torch.tensor([prompt])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


async def generate(router, prompts, max_tokens=MAX_TOKENS):
    async with AsyncClient(router.address) as c:
        return await asyncio.gather(*(c.generate(p, max_tokens=max_tokens, temperature=0.0) for p in prompts))


def prefill_requests(suite) -> float:
    return total(scrape("127.0.0.1", suite.prefill.metrics_port), "distserve_requests_total", role="prefill")


def decisions(router) -> dict[str, float]:
    s = scrape("127.0.0.1", router.metrics_port)
    return {d: total(s, "distserve_disagg_decision_total", decision=d) for d in ("local", "remote")}


def test_forced_modes_prefill_where_told_and_give_the_same_tokens(suite, tiny):
    try:
        before = prefill_requests(suite)
        local = asyncio.run(generate(suite.routers["local"], PROMPTS))
        assert prefill_requests(suite) == before  # the prefill worker saw none of them
        remote = asyncio.run(generate(suite.routers["remote"], PROMPTS))
        assert prefill_requests(suite) == before + len(PROMPTS)
        for o in local:
            m = o.metrics
            assert (m.disagg_decision, m.disagg_reason) == ("local", "mode")
            assert m.prefill_worker == "" and m.decode_worker == "decode-c" and m.colocated and m.kv_transport == "local"
            assert m.kv_bytes == 0 and m.phases.prefill_compute_s > 0  # the decode worker's own prefill
        for o in remote:
            m = o.metrics
            assert (m.disagg_decision, m.disagg_reason) == ("remote", "mode")
            assert m.prefill_worker == "prefill-c" and m.decode_worker == "decode-c" and not m.colocated and m.kv_bytes > 0
        for p, a, b in zip(PROMPTS, local, remote):
            assert a.token_ids == b.token_ids == reference(tiny, p, MAX_TOKENS)
        assert decisions(suite.routers["local"]) == {"local": len(PROMPTS), "remote": 0}
        assert decisions(suite.routers["remote"]) == {"local": 0, "remote": len(PROMPTS)}
        d = scrape("127.0.0.1", suite.decode.metrics_port)
        assert total(d, "distserve_disaggregation_decisions_total", decision="local_prefill") == len(PROMPTS)
        time.sleep(0.5)  # a heartbeat after the pulls
        loads = asyncio.run(registry_loads(suite.redis_url))
        dec, pre = loads["decode-c"], loads["prefill-c"]
        # what routers weigh: both step fits (from the start-up calibration on), the decode worker's chunk
        # budget (idle: its whole step budget) and its KV pulls; a prefill worker offers no chunk budget,
        # and on CPU steps 256 tokens at a time (distserve/runtime.py's step_tokens); both idle again
        assert fitted(dec) and fitted(pre) and (dec.max_step_tokens, pre.max_step_tokens) == (2048, 256)
        assert dec.queued_tokens == pre.queued_tokens == 0 and dec.step_elapsed_s == pre.step_elapsed_s == 0
        assert dec.prefill_budget_tokens == 2048 and pre.prefill_budget_tokens == 0
        assert dec.kv_bytes_per_s > 0 and dec.kv_bytes_per_token == pytest.approx(sum(o.metrics.kv_bytes for o in remote) / sum(map(len, PROMPTS)), rel=0.5)
    except BaseException:
        suite.dump()
        raise


async def registry_loads(redis_url: str):
    r = aioredis.from_url(redis_url)
    try:
        return {v.worker_id: v.load for v in await Registry(r).live_workers()}
    finally:
        await r.aclose()


async def prefill_queue(redis_url: str) -> int:
    r = aioredis.from_url(redis_url)
    try:
        views = await Registry(r).live_workers(role="prefill")
        return sum(v.load.queued_tokens for v in views)
    finally:
        await r.aclose()


def test_conditional_goes_local_for_short_prompts_only_while_the_prefill_pool_is_busy(suite, tiny):
    router = suite.routers["conditional"]
    long_prompts = [[3 + (5 * i + j) % 250 for j in range(900)] for i in range(80)]

    async def go():
        idle = await generate(router, PROMPTS[:2])  # nothing queued anywhere: remote
        async with AsyncClient(router.address) as c:
            # 80 prompts of 900 tokens (long: remote) that end at their first token, so they only load the prefill worker
            burst = asyncio.gather(*(c.generate(p, max_tokens=1, temperature=0.0) for p in long_prompts))
            deadline = time.monotonic() + 30
            while await prefill_queue(suite.redis_url) < 20_000:  # the registry shows the queue ...
                assert time.monotonic() < deadline, "the prefill worker never showed a queue"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.15)  # ... and the router has read it
            short = await asyncio.gather(*(c.generate(p, max_tokens=MAX_TOKENS, temperature=0.0) for p in PROMPTS))
            still_busy = await prefill_queue(suite.redis_url)
            long_out = await burst
        # the burst has ended, but the registry shows the queue until the prefill worker's next beat (0.2 s) and
        # the router reads it up to refresh_s (0.1 s) later: wait for both before asking for an idle decision
        deadline = time.monotonic() + 10
        while await prefill_queue(suite.redis_url) > 0:
            assert time.monotonic() < deadline, "the prefill worker's queue never showed empty after the burst"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.15)
        after = await generate(router, PROMPTS[:1])
        return idle, short, still_busy, long_out, after

    try:
        before = decisions(router)
        idle, short, still_busy, long_out, after = asyncio.run(go())
        for o in idle + after:
            assert (o.metrics.disagg_decision, o.metrics.disagg_reason) == ("remote", "estimate"), o.metrics
            assert o.metrics.remote_estimate_s > 0 and o.metrics.local_estimate_s > 0
        assert still_busy > 0, "the burst drained before the short prompts were decided: the test proves nothing"
        for o in short:
            m = o.metrics
            assert (m.disagg_decision, m.disagg_reason) == ("local", "estimate"), m
            assert m.remote_estimate_s > m.local_estimate_s + 0.2 and m.prefill_worker == "" and m.kv_transport == "local"
        for o in long_out:
            assert (o.metrics.disagg_decision, o.metrics.disagg_reason) == ("remote", "long_prompt")
            assert o.metrics.prefill_worker == "prefill-c"
        for p, o in zip(PROMPTS, short):
            assert o.token_ids == reference(tiny, p, MAX_TOKENS)
        now = decisions(router)
        assert now["local"] - before["local"] == len(short)
        assert now["remote"] - before["remote"] == len(idle) + len(long_out) + len(after)
    except BaseException:
        suite.dump()
        raise
