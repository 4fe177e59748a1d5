"""`distserve plan --watch` against a real redis-server whose registry entries the real Registry wrote."""

import asyncio
import dataclasses
import time

import pytest

from distserve.planner.watch import Advisor, PoolSample, watch
from distserve.state.connect import connect
from distserve.state.redis_server import RedisServer
from distserve.state.registry import Registry, WorkerInfo, WorkerLoad
from tests.unit.test_planner_latency import synthetic_profile


def info(worker_id: str, role: str, blocks: int = 1000, elastic: bool = False) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, address="127.0.0.1:1", kv_address="127.0.0.1:1", model="synthetic",
                      host_id="h", transports=("grpc",), total_blocks=blocks, block_size=16, max_model_len=8192, started_at=time.time(),
                      elastic=elastic)


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


def test_the_last_prefill_worker_moves_to_decode_only_when_allowed():
    from distserve.planner.watch import commands_for, role_change

    busy_decode = PoolSample(prefill=1, decode=1, colocated=0, queued_tokens=0, held=0, decode_waiting=0, running=40,
                             used_blocks=400, total_blocks=1000, elastic_prefill=("prefill-1",))
    assert Advisor(synthetic_profile(), 1e6, 1e-6, cores=2, window=1).advise(busy_decode) is None  # min_prefill 1: keep it
    advisor = Advisor(synthetic_profile(), 1e6, 1e-6, cores=2, window=1, min_prefill=0)
    rec = advisor.advise(busy_decode)
    assert (rec.prefill, rec.decode, rec.colocated) == (0, 2, 0) and "prefill every prompt themselves" in rec.reason
    assert role_change(busy_decode, rec) == ("prefill", "decode")
    assert commands_for(rec, advisor, "m") == ["distserve up --model m --prefill 0 --decode 2 --threads 1 --weights int8 "
                                               "--router-arg=--disagg-mode=conditional"]
    # decode workers alone, prompts queueing on them while decode has room: one goes back to prefill
    queued = PoolSample(prefill=0, decode=2, colocated=0, queued_tokens=5000, held=0, decode_waiting=0, running=2,
                        used_blocks=20, total_blocks=2000, elastic_decode=("decode-2", "decode-1"))
    rec = Advisor(synthetic_profile(), 1e-6, 1e6, cores=2, window=1).advise(queued)
    assert (rec.prefill, rec.decode) == (1, 1) and "move a decode worker to prefill" in rec.reason
    assert role_change(queued, rec) == ("decode", "prefill")
    # ... and with a core to spare, a prefill worker is added instead (no role change)
    rec = Advisor(synthetic_profile(), 1e-6, 1e6, cores=3, window=1).advise(queued)
    assert (rec.prefill, rec.decode) == (1, 2) and role_change(queued, rec) is None


def test_apply_asks_the_least_loaded_elastic_worker_and_waits_for_it(redis_url):
    asyncio.run(publish(redis_url, [
        (info("prefill-busy", "prefill", elastic=True), WorkerLoad(queued_requests=1, queued_tokens=10, total_blocks=1000, free_blocks=1000)),
        (info("prefill-idle", "prefill", elastic=True), WorkerLoad(total_blocks=1000, free_blocks=1000)),
        (info("prefill-fixed", "prefill"), WorkerLoad(total_blocks=1000, free_blocks=1000)),
        (info("decode-1", "decode"), WorkerLoad(running_requests=30, total_blocks=1000, free_blocks=500)),
    ]))
    advisor = Advisor(synthetic_profile(), slo_ttft=1e6, slo_tpot=1e-6, cores=4, window=1)
    lines: list[str] = []
    recs = asyncio.run(watch(redis_url, advisor, "synthetic", interval_s=0.01, iterations=6, apply=True, out=lines.append,
                             change_timeout_s=0.03))
    assert (recs[0].prefill, recs[0].decode) == (2, 2)
    assert "APPLIED: asked elastic worker prefill-idle to serve decode" in lines

    async def asked(wid):
        r = connect(redis_url, role="router")
        try:
            return await Registry(r).requested_role(wid)
        finally:
            await r.aclose()
    assert asyncio.run(asked("prefill-idle")) == "decode" and asyncio.run(asked("prefill-busy")) is None
    # the registered entry never changes role here: the watch gives up after its timeout, then may ask again
    assert any(line.startswith("GAVE UP waiting for prefill-idle to serve decode") for line in lines)
    gave_up = next(i for i, line in enumerate(lines) if line.startswith("GAVE UP"))
    assert not any(line.startswith("RECOMMEND") for line in lines[lines.index("APPLIED: asked elastic worker prefill-idle to serve decode"):gave_up])


def test_apply_without_elastic_workers_prints_the_command(redis_url):
    asyncio.run(publish(redis_url, [
        (info("prefill-1", "prefill"), WorkerLoad(total_blocks=1000, free_blocks=1000)),
        (info("prefill-2", "prefill"), WorkerLoad(total_blocks=1000, free_blocks=1000)),
        (info("decode-1", "decode"), WorkerLoad(running_requests=30, total_blocks=1000, free_blocks=500)),
    ]))
    advisor = Advisor(synthetic_profile(), slo_ttft=1e6, slo_tpot=1e-6, cores=3, window=1)
    recs, lines = run_watch(redis_url, advisor, 1)
    assert (recs[0].prefill, recs[0].decode) == (1, 2)
    assert "no elastic prefill worker to move (start workers with --elastic true, or distserve up --elastic)" in lines
    assert any(line.startswith("APPLY (would run): distserve up --model synthetic --prefill 1 --decode 2") for line in lines)


def test_a_measured_step_slower_than_the_profile_counts_as_decode_pressure():
    advisor = Advisor(synthetic_profile(), slo_ttft=1e6, slo_tpot=0.1, cores=2, window=1)
    sample = dict(prefill=1, decode=1, colocated=0, queued_tokens=0, held=0, decode_waiting=0, running=1, used_blocks=2, total_blocks=1000)
    _, predicted, _ = advisor.pressures(PoolSample(**sample))
    assert predicted < 1
    _, measured, why = advisor.pressures(PoolSample(**sample, step_period_s=0.25))
    assert measured == pytest.approx(2.5) and "measured 250ms" in why
    _, idle, _ = advisor.pressures(PoolSample(**{**sample, "running": 0}, step_period_s=0.25))  # nothing runs: no TPOT to miss
    assert idle == 0.0


def test_kv_on_its_way_to_a_decode_worker_with_room_is_no_decode_pressure():
    """Prefilled KV is held a moment before its pull: counted as decode short only when decode has no room."""
    advisor = Advisor(synthetic_profile(), slo_ttft=1e6, slo_tpot=0.1, cores=2, window=1)
    in_transit = PoolSample(prefill=1, decode=1, colocated=0, queued_tokens=0, held=3, decode_waiting=0, running=4, used_blocks=100,
                            total_blocks=1000)
    _, d, why = advisor.pressures(in_transit)
    assert d < 1 and "KV held" not in why
    _, d, why = advisor.pressures(dataclasses.replace(in_transit, used_blocks=950))  # a nearly full decode pool
    assert d >= 1.3 and "3 KV held" in why
    _, d, _ = advisor.pressures(dataclasses.replace(in_transit, held=0, decode_waiting=2))  # requests wait for admission
    assert d >= 1.2
