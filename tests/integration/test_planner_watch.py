"""`distserve plan --watch` against a real redis-server whose registry entries the real Registry wrote."""

import asyncio
import time

import pytest

from distserve.planner.watch import Advisor, PoolSample, watch
from distserve.state.connect import connect
from distserve.state.redis_server import RedisServer
from distserve.state.registry import Registry, WorkerInfo, WorkerLoad
from tests.unit.test_planner_latency import synthetic_profile


def info(worker_id: str, role: str, blocks: int = 1000) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, address="127.0.0.1:1", kv_address="127.0.0.1:1", model="synthetic",
                      host_id="h", transports=("grpc",), total_blocks=blocks, block_size=16, max_model_len=8192, started_at=time.time())


async def publish(url: str, workers: list[tuple[WorkerInfo, WorkerLoad]]) -> None:
    r = connect(url, role="router")
    try:
        reg = Registry(r)
        for wi, load in workers:
            await reg.register(wi, load, ttl_s=30)
    finally:
        await r.aclose()


def run_watch(url: str, advisor: Advisor, iterations: int) -> tuple[list, list[str]]:
    lines: list[str] = []
    recs = asyncio.run(watch(url, advisor, "synthetic", interval_s=0.01, iterations=iterations, apply=True, out=lines.append))
    return recs, lines


@pytest.fixture
def redis_url():
    with RedisServer() as server:
        yield server.url


def test_a_long_prefill_queue_moves_a_worker_to_prefill(redis_url):
    asyncio.run(publish(redis_url, [
        (info("prefill-1", "prefill"), WorkerLoad(queued_requests=40, queued_tokens=20_000, total_blocks=1000, free_blocks=900)),
        (info("decode-1", "decode"), WorkerLoad(running_requests=2, total_blocks=1000, free_blocks=950)),
        (info("decode-2", "decode"), WorkerLoad(running_requests=1, total_blocks=1000, free_blocks=980)),
    ]))
    advisor = Advisor(synthetic_profile(), slo_ttft=2.0, slo_tpot=0.1, cores=3, window=2)
    recs, lines = run_watch(redis_url, advisor, 3)
    assert len(recs) == 1  # printed once, after two reads in a row
    assert (recs[0].prefill, recs[0].decode) == (2, 1) and "prefill is short" in recs[0].reason
    assert any(line.startswith("APPLY (would run): distserve up --model synthetic --prefill 2 --decode 1") for line in lines)
    assert sum(line.startswith("RECOMMEND") for line in lines) == 1


def test_kv_waiting_for_decode_room_adds_a_decode_worker_when_cores_allow(redis_url):
    asyncio.run(publish(redis_url, [
        (info("prefill-1", "prefill"), WorkerLoad(held_requests=6, total_blocks=1000, free_blocks=600)),
        (info("decode-1", "decode"), WorkerLoad(running_requests=30, total_blocks=1000, free_blocks=10)),
    ]))
    advisor = Advisor(synthetic_profile(), slo_ttft=2.0, slo_tpot=0.1, cores=4, window=1)
    recs, _ = run_watch(redis_url, advisor, 1)
    assert (recs[0].prefill, recs[0].decode) == (1, 2) and "decode is short" in recs[0].reason


def test_a_quiet_pool_changes_nothing_and_an_idle_one_hands_a_worker_back():
    advisor = Advisor(synthetic_profile(), slo_ttft=2.0, slo_tpot=0.1, cores=4, window=1)
    busy = PoolSample(prefill=1, decode=1, colocated=0, queued_tokens=300, held=0, decode_waiting=0, running=8, used_blocks=200, total_blocks=1000)
    assert advisor.advise(busy) is None
    idle = PoolSample(prefill=2, decode=2, colocated=0, queued_tokens=0, held=0, decode_waiting=0, running=0, used_blocks=0, total_blocks=2000)
    rec = advisor.advise(idle)
    assert (rec.prefill, rec.decode) == (1, 2)
    stalled = PoolSample(prefill=0, decode=0, colocated=2, queued_tokens=0, held=0, decode_waiting=0, running=120, used_blocks=1900,
                         total_blocks=2000)
    rec = Advisor(synthetic_profile(), 2.0, 0.1, cores=2, window=1).advise(stalled)
    assert (rec.prefill, rec.decode, rec.colocated) == (1, 1, 0)
