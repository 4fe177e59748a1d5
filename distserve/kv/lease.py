"""Leases on finished KV held by a prefill worker until a decode worker has pulled it.

Lifecycle of one lease:
  hold(request_id, export_fn, free_fn, ttl_s) -> (token, expiry)   the KV stays in the cache
  pinned(request_id, token) / export(...)                          a pull reads it (may repeat)
  release(request_id, token)  or  expiry (reaper / expire_now)     free_fn runs, exactly once
A release or expiry that lands while a pull is reading the KV is deferred until that read ends, so
free_fn never runs under a reader. Unknown id, wrong token and expired lease all look the same to a
caller (NotFound), so a token cannot be probed. Thread-safe: free_fn may hand work to an engine
thread, and exports run in worker threads; free_fn is always called outside the table's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from distserve.errors import InvalidRequest, NotFound
from distserve.kv.handle import new_transfer_token

logger = logging.getLogger(__name__)

ExportFn = Callable[[], torch.Tensor]
FreeFn = Callable[[], None]


@dataclass(slots=True)
class _Lease:
    token: bytes
    export_fn: ExportFn
    free_fn: FreeFn
    expires_mono: float  # time.monotonic() deadline
    nbytes: int | None  # size of the exported tensor, when the holder knows it
    readers: int = 0  # exports in progress
    dead: bool = False  # released or expired; freed when readers reaches 0


@dataclass(frozen=True, slots=True)
class LeaseStats:
    held: int  # live leases
    bytes_held: int  # sum of known sizes of live leases
    reading: int  # live or dead leases with an export in progress
    released_total: int  # leases ended by release
    expired_total: int  # leases ended by expiry


class LeaseTable:
    def __init__(self, default_ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.default_ttl_s = default_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}  # live leases by request id
        self._dying: list[_Lease] = []  # dead leases still being read
        self._released = 0
        self._expired = 0

    def hold(
        self,
        request_id: str,
        export_fn: ExportFn,
        free_fn: FreeFn,
        ttl_s: float | None = None,
        nbytes: int | None = None,
        token: bytes | None = None,
    ) -> tuple[bytes, float]:
        """Hold a request's KV; returns (transfer token, lease expiry as unix time). `token`: the
        caller's own (16-64 bytes), else a new one."""
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise InvalidRequest("ttl_s", f"must be positive, got {ttl}")
        if token and not 16 <= len(token) <= 64:
            raise InvalidRequest("transfer_token", f"must be 16 to 64 bytes, got {len(token)}")
        token = token or new_transfer_token()
        with self._lock:
            if request_id in self._leases:
                raise InvalidRequest("request_id", f"{request_id} already holds a KV lease")
            self._leases[request_id] = _Lease(token, export_fn, free_fn, self._clock() + ttl, nbytes)
        return token, time.time() + ttl

    def _live(self, request_id: str, token: bytes) -> _Lease:
        """The live lease for (id, token); caller holds the lock."""
        lease = self._leases.get(request_id)
        if lease is None or not hmac.compare_digest(lease.token, bytes(token)) or lease.expires_mono <= self._clock():
            raise NotFound(f"no KV lease for request {request_id} (unknown, expired, released or wrong token)")
        return lease

    @contextlib.contextmanager
    def pinned(self, request_id: str, token: bytes) -> Iterator[ExportFn]:
        """Validate and pin a lease; yields its export function. Free is deferred until exit."""
        with self._lock:
            lease = self._live(request_id, token)
            lease.readers += 1
        try:
            yield lease.export_fn
        finally:
            with self._lock:
                lease.readers -= 1
                free_now = lease.dead and lease.readers == 0
                if free_now:
                    self._dying.remove(lease)
            if free_now:
                self._free(request_id, lease)

    def export(self, request_id: str, token: bytes) -> torch.Tensor:
        """Run the export function of a live lease (blocking; call it off the event loop)."""
        with self.pinned(request_id, token) as export_fn:
            return export_fn()

    def release(self, request_id: str, token: bytes) -> bool:
        """End a lease and free its KV. False if there was no such live lease (or a wrong token)."""
        with self._lock:
            try:
                lease = self._live(request_id, token)
            except NotFound:
                return False
            free_now = self._kill(request_id, lease)
            self._released += 1
        if free_now:
            self._free(request_id, lease)
        return True

    def _kill(self, request_id: str, lease: _Lease) -> bool:
        """Mark dead and unlist; True if nobody reads it, so the caller frees it. Lock held."""
        del self._leases[request_id]
        lease.dead = True
        if lease.readers:
            self._dying.append(lease)
            return False
        return True

    def expire_now(self) -> int:
        """Free every lease past its expiry; returns how many expired."""
        now = self._clock()
        expired = 0
        to_free = []
        with self._lock:
            for request_id, lease in list(self._leases.items()):
                if lease.expires_mono <= now:
                    expired += 1
                    if self._kill(request_id, lease):
                        to_free.append((request_id, lease))
                    logger.warning("KV lease of request %r expired unreleased", request_id)
            self._expired += expired
        for request_id, lease in to_free:
            self._free(request_id, lease)
        return expired

    def release_all(self) -> int:
        """Free every lease (shutdown); ones being read are freed when their read ends."""
        to_free = []
        with self._lock:
            for request_id, lease in list(self._leases.items()):
                if self._kill(request_id, lease):
                    to_free.append((request_id, lease))
                self._released += 1
        for request_id, lease in to_free:
            self._free(request_id, lease)
        return len(to_free)

    async def run_reaper(self, interval_s: float = 1.0) -> None:
        """Expire leases every interval_s until cancelled (run as an asyncio task)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.expire_now()
            except Exception:
                logger.exception("KV lease reaper failed; continuing")

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._leases

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def stats(self) -> LeaseStats:
        with self._lock:
            live = list(self._leases.values())
            return LeaseStats(
                held=len(live),
                bytes_held=sum(lease.nbytes or 0 for lease in live),
                reading=sum(1 for lease in live if lease.readers) + len(self._dying),
                released_total=self._released,
                expired_total=self._expired,
            )

    @staticmethod
    def _free(request_id: str, lease: _Lease) -> None:
        try:
            lease.free_fn()
        except Exception:
            logger.exception("freeing KV of request %r failed", request_id)
