"""Heartbeat.stop ends the loop even when a cancel is swallowed inside a Redis call (a cancel that
lands as a client's own timeout fires comes back as that timeout, which the loop logs and survives)."""

import asyncio

from redis.exceptions import TimeoutError as RedisTimeout

from distserve.state.registry import Heartbeat, WorkerInfo, WorkerLoad


class SwallowingRegistry:
    """Its heartbeat turns a cancel into a Redis timeout, as a client whose own timeout fired does."""

    def __init__(self):
        self.beats = 0
        self.deregistered = False

    async def register(self, info, load, ttl_s, extra=None):
        pass

    async def heartbeat(self, worker_id, load, ttl_s, extra=None):
        self.beats += 1
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            raise RedisTimeout("Timeout reading from socket") from None
        return False

    async def deregister(self, worker_id):
        self.deregistered = True


def test_stop_ends_a_heartbeat_whose_cancel_was_swallowed():
    info = WorkerInfo("w", "decode", "127.0.0.1:1", "127.0.0.1:1", "m", "h", ("grpc",), 10, 16, 64, 0.0)
    reg = SwallowingRegistry()

    async def go():
        hb = Heartbeat(reg, info, WorkerLoad, interval_s=0.01, ttl_s=1.0)
        await hb.start()
        while reg.beats < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # most likely inside a heartbeat call now
        await asyncio.wait_for(hb.stop(deregister=True), 5.0)
        beats = reg.beats
        await asyncio.sleep(0.1)
        return beats

    beats = asyncio.run(go())
    assert reg.deregistered and reg.beats == beats  # stopped for good, then left the registry
