"""Which KV holders a decode worker may dial: prefill workers the registry lists, at the address they
registered, never an address a request names (that would let any caller point this worker at any
host: a server-side request forgery).

`KnownHolders.check(handle)` passes a handle whose holder (worker id) is a live prefill worker of this
model whose registered KV address is the handle's, and whose transport endpoints (e.g. a
torch.distributed store) are on that same host; anything else raises PermissionDenied. It answers
from the last registry read, reading again (at most every `min_refresh_s`) when it meets a holder it
does not know: a prefill worker that registered a moment ago is found, an address nobody registered
costs one Redis read per interval at most.
"""

from __future__ import annotations

import asyncio
import logging
import time

from distserve.errors import DistserveError, PermissionDenied
from distserve.kv.handle import KvHandle
from distserve.state.registry import Registry, WorkerInfo

log = logging.getLogger(__name__)

HOLDER_ROLES = ("prefill",)


def _host(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


class KnownHolders:
    def __init__(self, registry: Registry, model: str, min_refresh_s: float = 0.5):
        self.registry = registry
        self.model = model
        self.min_refresh_s = min_refresh_s
        self._holders: dict[str, WorkerInfo] = {}  # worker id -> what it registered
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def check(self, handle: KvHandle) -> None:
        if self._problem(handle) is None:
            return
        async with self._lock:  # one registry read for a burst of unknown holders
            if time.monotonic() - self._read_at >= self.min_refresh_s:
                await self._refresh()
        problem = self._problem(handle)
        if problem is not None:
            log.warning("refused a KV handle of request %s: %s", handle.request_id, problem)
            raise PermissionDenied(f"kv_handle: {problem}; KV is pulled only from registered prefill workers")

    def _problem(self, handle: KvHandle) -> str | None:
        info = self._holders.get(handle.worker_id)
        if info is None:
            return f"holder {handle.worker_id!r} is not a registered prefill worker"
        if info.kv_address != handle.kv_address:
            return f"holder {handle.worker_id!r} registered KV address {info.kv_address}, not {handle.kv_address!r}"
        host = _host(info.kv_address)
        for name, endpoint in handle.transport_params.items():
            if ":" in endpoint and _host(endpoint) != host:
                return f"{name} endpoint {endpoint!r} is not on the holder's host {host}"
        return None

    async def _refresh(self) -> None:
        self._read_at = time.monotonic()
        try:
            views = await self.registry.live_workers(model=self.model)
        except DistserveError as exc:  # Redis away: keep what we knew (the worker serves on, as it does for routers)
            log.warning("could not read the registry to check a KV holder: %s", exc)
            return
        self._holders = {v.info.worker_id: v.info for v in views if v.info.role in HOLDER_ROLES}
