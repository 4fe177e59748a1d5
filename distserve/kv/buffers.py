"""Warm receive buffers, reused from one KV pull to the next.

Why: on a VM, touching fresh memory costs a page fault per 4 KiB page, and measured here that caps
writes into new memory at about 0.5-0.9 GB/s while a copy into memory already touched runs at 5 GB/s.
A puller that allocated its destination per pull would be bounded by the fault rate, not the wire.

Lifecycle of one buffer: `acquire(n)` hands out an idle buffer of at least n bytes (best fit) or makes
a new one -> the transport receives into it -> the KV is loaded into the engine's cache -> `release`
puts it back (warm). `discard` forgets a buffer a failed transfer may still write into. Idle buffers
beyond `max_idle_bytes`, or idle longer than `idle_s` (`evict_idle`, called periodically), are closed.
Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

B = TypeVar("B")

MIN_BUFFER_BYTES = 1 << 20


def size_class(nbytes: int) -> int:
    """nbytes rounded up to a quarter power of two (at most 25% slack), at least 1 MiB."""
    n = max(nbytes, MIN_BUFFER_BYTES)
    step = max(MIN_BUFFER_BYTES, 1 << max(0, n.bit_length() - 3))
    return -(-n // step) * step


@dataclass(slots=True)
class _Idle(Generic[B]):
    buf: B
    nbytes: int
    since: float  # time.monotonic() when it went idle


@dataclass(frozen=True, slots=True)
class PoolStats:
    idle: int  # buffers waiting for reuse
    idle_bytes: int
    in_use: int  # buffers handed out and not yet released or discarded
    created: int  # buffers made since start
    closed: int  # buffers closed since start


class BufferPool(Generic[B]):
    """Idle buffers by size; `make(nbytes)` creates one, `close(buf)` frees one."""

    def __init__(
        self,
        make: Callable[[int], B],
        close: Callable[[B], None] = lambda buf: None,
        size_of: Callable[[B], int] = lambda buf: buf.numel(),  # type: ignore[attr-defined]
        *,
        max_idle_bytes: int = 1 << 30,
        idle_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._make = make
        self._close = close
        self._size_of = size_of
        self.max_idle_bytes = max_idle_bytes
        self.idle_s = idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: list[_Idle[B]] = []
        self._in_use = 0
        self._created = 0
        self._closed = 0

    def acquire(self, nbytes: int) -> B:
        """A buffer of at least nbytes: the smallest idle one that is not much larger, else a new one."""
        with self._lock:
            best = None
            for i, item in enumerate(self._idle):
                if nbytes <= item.nbytes <= 4 * nbytes + MIN_BUFFER_BYTES and (best is None or item.nbytes < self._idle[best].nbytes):
                    best = i
            if best is not None:
                self._in_use += 1
                return self._idle.pop(best).buf
        buf = self._make(size_class(nbytes))
        with self._lock:
            self._created += 1
            self._in_use += 1
        return buf

    def release(self, buf: B) -> None:
        """Back to the pool; the oldest idle buffers close when the idle total passes max_idle_bytes."""
        with self._lock:
            self._in_use -= 1
            self._idle.append(_Idle(buf, self._size_of(buf), self._clock()))
            victims = self._trim_locked(self.max_idle_bytes)
        self._close_all(victims)

    def discard(self, buf: B, close: bool = False) -> None:
        """Forget a handed-out buffer (a failed transfer may still write into it; `close` only when safe)."""
        with self._lock:
            self._in_use -= 1
            if close:
                self._closed += 1
        if close:
            self._close_quietly(buf)

    def evict_idle(self) -> int:
        """Close buffers idle longer than idle_s; returns how many."""
        cutoff = self._clock() - self.idle_s
        with self._lock:
            victims = [item for item in self._idle if item.since <= cutoff]
            self._idle = [item for item in self._idle if item.since > cutoff]
            self._closed += len(victims)
        self._close_all(victims)
        return len(victims)

    def clear(self) -> int:
        """Close every idle buffer (shutdown); handed-out ones close when released after this."""
        with self._lock:
            victims, self._idle = self._idle, []
            self._closed += len(victims)
        self._close_all(victims)
        return len(victims)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(len(self._idle), sum(i.nbytes for i in self._idle), self._in_use, self._created, self._closed)

    def _trim_locked(self, limit: int) -> list[_Idle[B]]:
        victims = []
        self._idle.sort(key=lambda item: item.since)
        while self._idle and sum(i.nbytes for i in self._idle) > limit:
            victims.append(self._idle.pop(0))
        self._closed += len(victims)
        return victims

    def _close_all(self, items: list[_Idle[B]]) -> None:
        for item in items:
            self._close_quietly(item.buf)

    def _close_quietly(self, buf: B) -> None:
        try:
            self._close(buf)
        except Exception:  # a buffer that cannot close (still mapped by a view) is left to the GC
            pass


def cpu_buffer(nbytes: int) -> torch.Tensor:
    """A flat uint8 CPU tensor (the default buffer of pools on the CPU)."""
    return torch.empty(nbytes, dtype=torch.uint8)
