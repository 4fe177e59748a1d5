"""Back-pressure and leases with services started one by one (`distserve serve ...`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis

from distserve.client import AsyncClient
from distserve.kv.release import LeaseClient
from distserve.rpc.channels import ChannelPool
from distserve.state.redis_server import RedisServer, free_port
from distserve.state.registry import Registry
from distserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc

pytestmark = pytest.mark.timeout(300)


class Service:
    def __init__(self, tmp, name, *argv):
        self.port = free_port()
        self.log = tmp / f"{name}.log"
        self._f = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "distserve.cli", "serve", *argv, "--port", str(self.port)],
                                     stdout=self._f, stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s=180):
        deadline = time.monotonic() + timeout_s
        while "READY" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(self.log.read_text(errors="replace"))
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._f.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bp")
    redis = RedisServer().start()
    common = ["--model", "tiny-llama", "--redis-url", redis.url, "--threads", "1", "--ttl-s", "2", "--heartbeat-s", "0.25"]
    services = [
        Service(tmp, "prefill", "prefill", *common, "--num-blocks", "12", "--lease-s", "2", "--worker-id", "p1"),
        Service(tmp, "decode", "decode", *common, "--num-blocks", "8", "--worker-id", "d1"),
        Service(tmp, "router", "router", "--model", "tiny-llama", "--redis-url", redis.url),
        Service(tmp, "router2", "router", "--model", "tiny-llama", "--redis-url", redis.url),
    ]
    try:
        for s in services:
            s.wait_ready()
        yield redis, services
    except BaseException:
        for s in services:
            print(f"---- {s.log.name} ----\n{s.log.read_text(errors='replace')[-5000:]}")
        raise
    finally:
        for s in reversed(services):
            s.stop()
        redis.stop()


async def loads(redis_url):
    r = aioredis.from_url(redis_url)
    try:
        return {v.worker_id: v.load for v in await Registry(r).live_workers()}
    finally:
        await r.aclose()


def test_full_prefill_queues_prompts_until_leases_end(stack):
    redis, (prefill, *_) = stack
    params = common_pb2.SamplingParams(max_tokens=8, temperature=0.0)

    async def go():
        pool = ChannelPool()
        stub = prefill_pb2_grpc.PrefillStub(pool.get(prefill.address))
        # each prompt needs 4 of the worker's 12 blocks: three are held, the fourth must wait
        calls = [asyncio.ensure_future(stub.Prefill(prefill_pb2.PrefillRequest(request_id=f"lease-{i}", token_ids=[7 + i] * 60, params=params), timeout=60))
                 for i in range(4)]
        done, pending = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        while len(done) < 3:
            more, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            done |= more
        assert len(done) == 3 and len(pending) == 1
        first3 = [t.result() for t in done]
        await asyncio.sleep(0.6)
        mid = (await loads(redis.url))["p1"]
        # release one lease by hand; the queued prompt then runs at once, and the rest expire on their own
        released = await LeaseClient(pool).release_handle(first3[0].kv_handle)
        fourth = await pending.pop()
        await asyncio.sleep(2.6)  # the other leases (2 s) lapse and their blocks are freed
        end = (await loads(redis.url))["p1"]
        await pool.close_all()
        return first3, mid, released, fourth, end

    first3, mid, released, fourth, end = asyncio.run(go())
    assert all(r.HasField("kv_handle") for r in first3)
    assert mid.free_blocks == 0 and mid.queued_requests == 1 and mid.held_requests == 3
    assert released
    assert fourth.HasField("kv_handle") and 0.5 < fourth.queue_s < 1.9  # it waited for the release instead of failing
    assert end.free_blocks == end.total_blocks == 12 and end.held_requests == 0


def test_full_decode_worker_admits_requests_as_blocks_free(stack):
    redis, _ = stack[0], stack[1]
    router = stack[1][2]

    async def go():
        async with AsyncClient(router.address) as c:
            # each needs ceil((40 + 40 - 1) / 16) = 5 of the decode worker's 8 blocks: one at a time
            outs = await asyncio.gather(*(c.generate([11 + i] * 40, max_tokens=40, temperature=0.0, ignore_eos=True) for i in range(3)))
        await asyncio.sleep(0.6)
        return outs, await loads(redis.url)

    outs, end = asyncio.run(go())
    assert [len(o.token_ids) for o in outs] == [40, 40, 40]
    assert max(o.metrics.phases.decode_queue_s for o in outs) > 0.05  # someone waited for blocks
    assert end["d1"].free_blocks == 8 and end["p1"].held_requests == 0


def test_two_routers_share_the_pools(stack):
    redis, services = stack
    router, router2 = services[2], services[3]

    async def go():
        async with AsyncClient(router.address) as a, AsyncClient(router2.address) as b:
            return await asyncio.gather(*(c.generate([20 + i] * 10, max_tokens=5, temperature=0.0, ignore_eos=True)
                                          for i, c in enumerate([a, b, a, b])))

    outs = asyncio.run(go())
    assert all(len(o.token_ids) == 5 and o.metrics.decode_worker == "d1" for o in outs)
    assert outs[0].token_ids != outs[1].token_ids  # different prompts, served by both routers
