"""The engine thread bridge: errors reach the awaiting caller, streams end, nothing hangs."""

import asyncio
import time

import pytest

from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.errors import InvalidRequest, ResourceExhausted
from distserve.engine.sampling import SamplingParams
from distserve.engine.worker import EngineWorker

pytestmark = pytest.mark.timeout(60)


def started_with(eng: LLMEngine, before_step) -> EngineWorker:
    """A started worker over `eng` whose every step first runs `before_step()`."""
    real_step = eng.step

    def step():
        before_step()
        return real_step()

    eng.step = step
    w = EngineWorker(eng)
    w.start()
    return w


def test_errors_from_the_engine_thread_reach_the_caller(tiny):
    async def go():
        w = EngineWorker(LLMEngine(tiny, EngineConfig(mode="decode", num_blocks=4)))
        w.start()
        try:
            with pytest.raises(InvalidRequest):
                await w.generate("bad", [], SamplingParams())
            await w.reserve("a", [5] * 40, SamplingParams(max_tokens=9))
            with pytest.raises(ResourceExhausted):
                await w.reserve("b", [5] * 40, SamplingParams(max_tokens=9))
            assert await w.abort("a")
            stream = await w.generate("ok", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            outs = [o async for o in stream]
            assert sum(len(o.new_token_ids) for o in outs) == 4 and outs[-1].finished
        finally:
            w.stop()

    asyncio.run(go())


def test_abort_ends_a_running_stream(tiny):
    async def go():
        w = EngineWorker(LLMEngine(tiny, EngineConfig(num_blocks=64)))
        w.start()
        try:
            stream = await w.generate("long", [5] * 10, SamplingParams(max_tokens=900, ignore_eos=True))
            n = 0
            async for o in stream:
                n += 1
                if n == 3:
                    await w.abort("long")
            assert n < 900
            await asyncio.sleep(0.1)
            assert w.engine.blocks.num_free == 64
        finally:
            w.stop()

    asyncio.run(go())


def test_queue_time_counts_the_wait_behind_a_running_step(tiny):
    async def go():
        eng = LLMEngine(tiny, EngineConfig(num_blocks=64))
        w = EngineWorker(eng)
        w.start()
        try:
            gate = __import__("threading").Event()
            blocker = asyncio.ensure_future(w.call(lambda e: gate.wait(5)))  # the engine thread is busy
            await asyncio.sleep(0.05)
            pending = asyncio.ensure_future(w.generate("q", [5, 6, 7], SamplingParams(max_tokens=1, temperature=0.0)))
            await asyncio.sleep(0.3)
            gate.set()
            await blocker
            outs = [o async for o in await pending]
            return outs[0].queue_s
        finally:
            w.stop()

    assert asyncio.run(go()) >= 0.25


def test_reservations_honour_max_num_seqs_and_waiters_wake_when_room_frees(tiny):
    async def go():
        w = EngineWorker(LLMEngine(tiny, EngineConfig(mode="decode", num_blocks=64, max_num_seqs=2)))
        w.start()
        try:
            p = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            await w.reserve("a", [5] * 8, p)
            await w.reserve("b", [6] * 8, p)
            seen = w.room_version
            with pytest.raises(ResourceExhausted, match="max_num_seqs"):  # blocks are free, seats are not
                await w.reserve("c", [7] * 8, p)
            assert not await w.wait_for_room(seen, 0.2)  # nothing freed: times out
            waiting = asyncio.create_task(w.wait_for_room(seen, 10.0))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            t = asyncio.get_running_loop().time()
            await w.abort("a")
            assert await waiting  # woken by the freed seat, not by a timer
            assert asyncio.get_running_loop().time() - t < 1.0
            await w.reserve("c", [7] * 8, p)
            assert not await w.wait_for_room(w.room_version, 0.05)
            assert await w.wait_for_room(seen, 0.05)  # a wake-up before the wait is not lost
        finally:
            w.stop()

    asyncio.run(go())


def test_the_queue_counts_the_step_in_flight_and_what_arrives_during_it(tiny):
    """A prefill step can take seconds: the published queue keeps its prompts, and those sent while it runs,
    until it ends (the router's remote estimate reads this); the step's elapsed time is readable meanwhile."""
    import threading

    async def go():
        eng = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=64, max_num_batched_tokens=64))
        gate, stepping = threading.Event(), threading.Event()

        def hold():  # the real step runs once the test lets it
            stepping.set()
            assert gate.wait(20)

        w = started_with(eng, hold)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        try:
            assert w.queued_tokens == 0 and w.step_elapsed_s() == 0.0
            a = await w.generate("a", [5] * 40, params)
            assert await asyncio.to_thread(stepping.wait, 20)
            time.sleep(0.05)
            assert w.queued_tokens == 40 and w.step_elapsed_s() >= 0.05  # in the step, not done
            task = asyncio.ensure_future(w.generate("b", [6] * 30, params))  # its add waits for the step
            await asyncio.sleep(0.05)
            assert not task.done() and w.queued_tokens == 70  # handed over, behind the step in flight
            gate.set()
            b = await task
            assert [len(o.new_token_ids) async for o in a] == [1] and [len(o.new_token_ids) async for o in b] == [1]
            for _ in range(100):
                if w.queued_tokens == 0:
                    break
                await asyncio.sleep(0.02)
            assert w.queued_tokens == 0 and w.step_elapsed_s() == 0.0
        finally:
            gate.set()
            w.stop()

    asyncio.run(go())


def test_step_period_is_the_cadence_of_busy_steps_not_of_idle_waits(tiny):
    """What a running sequence waits between tokens: each step held 20 ms here, so the period is about
    that; a second's idle wait before the next request does not count."""
    async def go():
        w = started_with(LLMEngine(tiny, EngineConfig(num_blocks=64)), lambda: time.sleep(0.02))
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        try:
            assert w.step_period_s == 0.0
            _ = [o async for o in await w.generate("a", [5] * 10, params)]
            assert 0.02 <= w.step_period_s < 0.2
            await asyncio.sleep(1.0)
            _ = [o async for o in await w.generate("b", [6] * 10, params)]
            assert 0.02 <= w.step_period_s < 0.2  # 0.2 of a 1 s gap in the average would put it over
        finally:
            w.stop()

    asyncio.run(go())
