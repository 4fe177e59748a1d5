"""An engine on its own thread, driven from asyncio.

Commands (add a request, reserve blocks, import KV, abort, export, free) go through a thread-safe
queue and run on the engine thread between steps; their results come back as asyncio futures. Every
`RequestOutput` of a step is delivered to that request's asyncio queue on the caller's loop. A
request's stream ends after its finishing (or HELD) output; `abort` ends it at once. `stop` ends the
thread after the step in flight; requests still streaming get a CANCELLED end.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from distserve.engine.engine import EngineStats, LLMEngine, RequestOutput
from distserve.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

_END = object()  # closes a stream without an output (abort, shutdown)


class EngineWorker:
    def __init__(self, engine: LLMEngine, threads: int | None = None):
        self.engine = engine
        self.threads = threads
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.stats: EngineStats = engine.stats()  # refreshed after every step and command
        self.steps = 0
        self.step_started = 0.0  # time.time() when the step in flight began (0: between steps)
        # seconds from one step's start to the next's while the engine had work throughout (what a running
        # sequence waits between its tokens: the step and everything around it), a moving average; 0: none yet
        self.step_period_s = 0.0
        self._last_start = 0.0  # monotonic start of the previous step, when the loop went straight on to another
        # prompt tokens handed to the engine thread (asyncio side), and those its add commands ran for
        # (engine thread), the latter as of the last stats: queued_tokens counts what lies in between
        self._sent_tokens = 0
        self._taken_tokens = 0
        self._queue_view = (self.stats.queued_tokens, 0)
        self._room_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()  # wait_for_room callers
        self._room_version = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(None)
        self._thread.join(timeout_s)
        with self._lock:
            streams, self._streams = self._streams, {}
        for loop, q in streams.values():
            loop.call_soon_threadsafe(q.put_nowait, _END)

    # -- calls from asyncio ------------------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Runs fn(engine) on the engine thread and returns its result (or raises its error)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._commands.put((fn, loop, fut))
        return await fut

    @property
    def queued_tokens(self) -> int:
        """Prompt tokens to compute here before a prompt sent now starts: the engine's queue as of its
        last stats (taken between steps: they count the prompts of the step in flight) plus the prompts
        handed over since. The stats alone miss what arrives during a step, and a prefill step of 2048
        tokens takes four seconds on one core."""
        queued, taken = self._queue_view
        return queued + self._sent_tokens - taken

    def step_elapsed_s(self) -> float:
        """Seconds the step in flight has run (0 between steps)."""
        started = self.step_started
        return max(0.0, time.time() - started) if started else 0.0

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Adds a request to be prefilled here; yields its outputs until it finishes (or is held)."""
        q = self._open(request_id)
        submitted = time.monotonic()
        n = len(prompt)

        def add(e: LLMEngine) -> float:
            self._taken_tokens += n  # counted before it can fail: the add is over either way
            e.add_request(request_id, prompt, params)
            return time.monotonic()

        self._sent_tokens += n
        try:
            # the engine stamps arrival when the command runs, after the step in flight; count that wait too
            taken = await self.call(add)
        except BaseException:
            self._close(request_id)
            raise
        return self._drain(request_id, q, waited_s=max(0.0, taken - submitted))

    async def decode_prefilled(self, request_id: str, first_token: int, first_logprob: float | None, kv: torch.Tensor) -> AsyncIterator[RequestOutput]:
        """Imports KV into blocks reserved earlier with `reserve`; yields the outputs after the first token."""
        q = self._open(request_id)
        try:
            done = await self.call(lambda e: e.admit_prefilled(request_id, first_token, first_logprob, kv))
        except BaseException:
            self._close(request_id)
            raise
        if done is not None:
            q.put_nowait(done)
        return self._drain(request_id, q)

    async def reserve(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        await self.call(lambda e: e.reserve(request_id, prompt, params))

    async def abort(self, request_id: str) -> bool:
        self._close(request_id)
        return await self.call(lambda e: e.abort(request_id))

    def abort_nowait(self, request_id: str) -> None:
        """Abort from any thread without waiting (used by lease expiry and cancellations)."""
        self._close(request_id)
        self._commands.put((lambda e: e.abort(request_id), None, None))

    @property
    def room_version(self) -> int:
        """Grows each time blocks, batch seats or held KV are freed; read it before trying to reserve."""
        return self._room_version

    async def wait_for_room(self, since: int, timeout_s: float) -> bool:
        """Waits until blocks or batch seats were freed after `room_version` read `since` (a request
        finished or was dropped), at most timeout_s; True when there was. Admission waits on this
        instead of polling, and no wake-up between its try and its wait is lost."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self._room_version != since:
                return True
            self._room_waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter[1].wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            with self._lock:
                self._room_waiters.discard(waiter)

    def _wake_room_waiters(self, before: EngineStats) -> None:
        now = self.stats
        if (now.free_blocks <= before.free_blocks and now.running_requests >= before.running_requests
                and now.held_requests >= before.held_requests):
            return
        with self._lock:
            self._room_version += 1
            waiters = list(self._room_waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    # -- plumbing ----------------------------------------------------------------------------
    def _open(self, request_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._streams[request_id] = (asyncio.get_running_loop(), q)
        return q

    def _close(self, request_id: str) -> None:
        with self._lock:
            entry = self._streams.pop(request_id, None)
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, _END)

    async def _drain(self, request_id: str, q: asyncio.Queue, waited_s: float = 0.0) -> AsyncIterator[RequestOutput]:
        try:
            first = True
            while True:
                out = await q.get()
                if out is _END:
                    return
                if first and out.new_token_ids:
                    out.queue_s += waited_s
                    first = False
                yield out
                if out.finished or out.held:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            entry = self._streams.get(out.request_id)
            if entry is not None and (out.finished or out.held):
                del self._streams[out.request_id]
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _run_command(self, item) -> None:
        fn, loop, fut = item
        try:
            result = fn(self.engine)
        except BaseException as exc:  # handed to the caller, never kills the thread
            if fut is not None:
                # bind exc now: the name is unbound once this except block ends
                loop.call_soon_threadsafe(lambda e=exc: fut.done() or fut.set_exception(e))
            else:
                log.warning("engine command failed: %s", exc)
            return
        if fut is not None:
            loop.call_soon_threadsafe(lambda r=result: fut.done() or fut.set_result(r))

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        engine = self.engine
        while not self._stopped.is_set():
            before = self.stats
            idle = not engine.has_work()
            if idle:
                self._last_start = 0.0  # the wait for work is no step period
            try:
                item = self._commands.get(timeout=0.5) if idle else self._commands.get_nowait()
            except queue.Empty:
                item = False
            while item:
                self._run_command(item)
                try:
                    item = self._commands.get_nowait()
                except queue.Empty:
                    item = False
            if item is None or self._stopped.is_set():
                break
            if engine.has_work():
                self.step_started = time.time()
                self._cadence(time.monotonic())
                try:
                    outs = engine.step()
                except Exception:
                    log.exception("engine step failed; aborting the requests in it")
                    for rid in engine.request_ids():
                        engine.abort(rid)
                        self._close(rid)
                    outs = []
                self.steps += 1
                self.step_started = 0.0
                for out in outs:
                    self._deliver(out)
            self._refresh()
            self._wake_room_waiters(before)

    def _cadence(self, now: float) -> None:
        if self._last_start:
            period = now - self._last_start
            self.step_period_s = period if not self.step_period_s else 0.8 * self.step_period_s + 0.2 * period
        self._last_start = now

    def _refresh(self) -> None:
        taken = self._taken_tokens
        self.stats = stats = self.engine.stats()
        self._queue_view = (stats.queued_tokens, taken)
