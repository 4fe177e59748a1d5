"""`distserve up` with tiny-llama, 2 prefill + 2 decode workers, exercised through the SDK."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time

import grpc
import pytest
import redis.asyncio as aioredis
import torch

from distserve.client import AsyncClient, Client
from distserve.errors import InvalidRequest
from distserve.rpc.certs import role_files
from distserve.state.redis_server import free_port
from distserve.state.registry import Registry
from distserve.state.requests import RequestPhase, RequestStateStore
from distserve.up import UpProcess

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    up = UpProcess(tmp_path_factory.mktemp("suite"), "--model", "tiny-llama", "--prefill", "2", "--decode", "2",
                   "--worker-arg=--num-blocks=256", "--worker-arg=--ttl-s=2", "--worker-arg=--heartbeat-s=0.25")
    yield up
    code = up.stop()
    assert code == 0, "distserve up did not stop cleanly"


async def workers(redis_url: str):
    r = aioredis.from_url(redis_url)
    try:
        return await Registry(r).live_workers()
    finally:
        await r.aclose()


async def wait_idle(redis_url: str, timeout_s: float = 10.0):
    """Until every worker reports all blocks free, nothing running and no held KV."""
    deadline = time.monotonic() + timeout_s
    while True:
        views = await workers(redis_url)
        busy = [v for v in views if v.load.free_blocks != v.load.total_blocks or v.load.running_requests or v.load.held_requests]
        if not busy or time.monotonic() > deadline:
            return views, busy
        await asyncio.sleep(0.2)


def reference(lm, prompt, n):
    ids = torch.tensor([prompt])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_fifty_concurrent_requests_match_transformers_and_free_everything(suite, tiny, dump_on_failure):
    dump_on_failure(suite)
    rng = random.Random(0)
    reqs = [([rng.randrange(3, 259) for _ in range(rng.randrange(2, 200))], rng.randrange(1, 40)) for _ in range(50)]

    async def go():
        async with AsyncClient(suite.target, **suite.client_tls) as c:
            return await asyncio.gather(*(c.generate(p, max_tokens=n, temperature=0.0) for p, n in reqs))

    outs = asyncio.run(go())
    for (p, n), out in zip(reqs, outs):
        assert out.token_ids == reference(tiny, p, n)
        assert out.finish_reason in ("stop", "length")
        assert out.metrics.prefill_worker.startswith("prefill-") and (n == 1 or out.metrics.decode_worker.startswith("decode-") or out.finish_reason == "stop")
    used = {o.metrics.prefill_worker for o in outs} | {o.metrics.decode_worker for o in outs if o.metrics.decode_worker}
    assert used == {"prefill-1", "prefill-2", "decode-1", "decode-2"}  # load spread over both pools
    views, busy = asyncio.run(wait_idle(suite.redis_url))
    assert len(views) == 4 and not busy, busy


def test_prompts_sharing_a_prefix_meet_the_worker_that_holds_it_and_stay_exact(suite, tiny, dump_on_failure):
    """KV-aware routing with 2 prefill workers: a conversation's turns go where its history is cached,
    prefill only what is new, and answer as transformers does on the whole prompt."""
    dump_on_failure(suite)
    rng = random.Random(7)
    system = [rng.randrange(3, 259) for _ in range(130)]

    async def go():
        async with AsyncClient(suite.target, **suite.client_tls) as c:
            first = await c.generate(system + [9, 9, 9], max_tokens=6, temperature=0.0, ignore_eos=True)
            await asyncio.sleep(0.6)  # a heartbeat publishes the worker's cache (the router also remembers where it sent it)
            history = system + [9, 9, 9] + first.token_ids
            turns = []
            for k in range(3):
                prompt = history + [rng.randrange(3, 259) for _ in range(5 + k)]
                out = await c.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
                turns.append((prompt, out))
                history = prompt + out.token_ids
            return first, turns

    first, turns = asyncio.run(go())
    for prompt, out in turns:
        assert out.metrics.prefill_worker == first.metrics.prefill_worker
        assert out.metrics.cached_tokens >= 128 and out.metrics.cached_tokens % 16 == 0
        assert out.token_ids == reference(tiny, prompt, 6)


def test_text_prompt_streams_and_state_is_recorded(suite, tiny, dump_on_failure):
    dump_on_failure(suite)
    with Client(suite.target, **suite.client_tls) as c:
        chunks = list(c.stream("héllo wörld ✓", max_tokens=12, temperature=0.0, ignore_eos=True, request_id="state-1"))
    assert chunks[-1].finish_reason == "length"
    ids = [t for ch in chunks for t in ch.token_ids]
    assert len(ids) == 12
    # streamed deltas add up to the decode of the whole output (no character lost or split twice)
    assert "".join(ch.text for ch in chunks) == tiny.tokenizer.decode(ids, skip_special_tokens=True)
    m = chunks[-1].metrics
    assert m.completion_tokens == 12 and m.ttft_s > 0 and m.e2e_s >= m.ttft_s and m.kv_transport in ("shm", "gloo", "nccl", "grpc") and m.kv_bytes > 0

    async def state():
        r = aioredis.from_url(suite.redis_url)
        try:
            for _ in range(50):
                s = await RequestStateStore(r).get("state-1")
                if s and s["phase"] is RequestPhase.FINISHED:
                    return s
                await asyncio.sleep(0.1)
            return s
        finally:
            await r.aclose()

    s = asyncio.run(state())
    assert s["phase"] is RequestPhase.FINISHED and s["tokens_emitted"] == 12
    assert s["prefill_worker"].startswith("prefill-") and s["decode_worker"].startswith("decode-")
    assert s["t_queued"] <= s["t_prefilled"] <= s["t_decoding"] <= s["t_finished"]


def test_cancelled_stream_stops_both_legs_and_frees_blocks(suite, dump_on_failure):
    dump_on_failure(suite)

    async def go():
        async with AsyncClient(suite.target, **suite.client_tls) as c:
            got = 0
            async for ch in c.stream([5] * 100, max_tokens=900, temperature=0.0, ignore_eos=True, request_id="cancel-1"):
                got += len(ch.token_ids)
                if got >= 5:
                    break  # leaving the stream cancels the call
            views, busy = await wait_idle(suite.redis_url)
            r = aioredis.from_url(suite.redis_url)
            for _ in range(50):  # state is written off the request's critical path
                state = await RequestStateStore(r).get("cancel-1")
                if state["phase"].terminal:
                    break
                await asyncio.sleep(0.1)
            await r.aclose()
            return busy, state

    busy, state = asyncio.run(go())
    assert not busy, busy
    assert state["phase"] is RequestPhase.CANCELLED
    assert state["tokens_emitted"] < 900


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(prompt=""), "prompt"),
        (dict(prompt="hi", max_tokens=0), "max_tokens"),
        (dict(prompt="hi", top_p=2.0), "top_p"),
        (dict(prompt=[7] * 1100), "max_tokens"),  # prompt beyond the 1024-token context
        (dict(prompt=[7, 5000]), "prompt"),
        (dict(prompt="hi", temperature=-1.0), "temperature"),
    ],
)
def test_invalid_requests_get_invalid_argument_and_workers_keep_serving(suite, kwargs, field):
    with Client(suite.target, **suite.client_tls) as c:
        prompt = kwargs.pop("prompt")
        with pytest.raises(InvalidRequest) as e:
            c.generate(prompt, **kwargs)
        assert e.value.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in str(e.value)
        assert c.generate("ok", max_tokens=3, temperature=0.0, ignore_eos=True).finish_reason == "length"


def test_worker_joining_gets_traffic_and_a_dead_one_stops_getting_it(suite, tmp_path, dump_on_failure):
    dump_on_failure(suite)
    port = free_port()
    log = open(tmp_path / "late.log", "wb")
    late = subprocess.Popen([sys.executable, "-m", "distserve.cli", "serve", "decode", "--model", "tiny-llama",
                             "--redis-url", suite.redis_url, "--port", str(port), "--worker-id", "decode-late",
                             "--num-blocks", "256", "--ttl-s", "2", "--heartbeat-s", "0.25", "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **role_files(suite.tls_dir, "decode").env()})  # joins the suite's mTLS
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "READY" not in (tmp_path / "late.log").read_text(errors="replace"):
            assert late.poll() is None, (tmp_path / "late.log").read_text()
            time.sleep(0.2)
        ready_at = time.monotonic()

        async def burst(n):
            async with AsyncClient(suite.target, **suite.client_tls) as c:
                outs = await asyncio.gather(*(c.generate([9] * 20, max_tokens=20, temperature=0.0, ignore_eos=True) for _ in range(n)))
            return {o.metrics.decode_worker for o in outs}

        time.sleep(max(0.0, ready_at + 2.0 - time.monotonic()))  # a new worker must get traffic within 2 s
        assert "decode-late" in asyncio.run(burst(12))
        late.kill()
        late.wait()
        time.sleep(2.5)  # its registry entry lapses after the 2 s TTL
        used = asyncio.run(burst(8))
        assert "decode-late" not in used and used <= {"decode-1", "decode-2"}
    finally:
        if late.poll() is None:
            late.kill()
        log.close()


def test_deadline_exceeded_is_typed_and_frees_the_request(suite):
    from distserve.errors import DeadlineExceeded

    with Client(suite.target, **suite.client_tls) as c:
        with pytest.raises(DeadlineExceeded) as e:
            c.generate([5] * 50, max_tokens=900, temperature=0.0, ignore_eos=True, timeout_s=0.3)
        assert e.value.grpc_code == grpc.StatusCode.DEADLINE_EXCEEDED
    views, busy = asyncio.run(wait_idle(suite.redis_url))
    assert not busy, busy
