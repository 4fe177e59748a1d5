"""`distserve serve prefill|decode --elastic`: a worker that serves either role and changes role when
asked, so a suite can move a worker to the phase that is short of capacity without a restart.

Both roles' services are on its server from the start (a gRPC server takes no service once started);
the one it does not serve refuses calls with UNAVAILABLE (`WorkerRuntime.serving`), which routers
replay on another worker. Every heartbeat it reads the `want_role` field of its own registry entry
(`distserve role set WORKER ROLE`, or whatever watches the pools: `Registry.request_role`); when that
names the other role, `WorkerRuntime.change_role` drains this role's work as on shutdown (in-flight
requests finish, held KV is pulled), the idle engine takes the other mode, and the worker registers
again under the new role with that role's KV transports. The field goes with the old entry, so a
request is acted on once; one that cannot drain in `drain_s` leaves the worker in its role.

Under mutual TLS it runs with a decode certificate: as a decode worker it pulls KV, which prefill
workers allow only decode and colocated callers, and no peer checks the role of a server it calls.
Under Redis ACLs it needs the decode user, which may read the registry (its `want_role` watch does).
"""

from __future__ import annotations

import asyncio
import logging

from distserve.errors import Unavailable
from distserve.runtime import WorkerSettings
from services.worker.runtime import WorkerRuntime
from services.decode import main as decode_main
from services.prefill import main as prefill_main

log = logging.getLogger(__name__)

SERVICES = (*prefill_main.SERVICES, *decode_main.SERVICES)
ROLES = ("prefill", "decode")


async def watch_role(rt: WorkerRuntime, transports: dict[str, tuple[str, ...]]) -> None:
    """Acts on the role asked of this worker, one change at a time, until the worker stops."""
    failing = None  # the last error's text, so a lasting one (a Redis user that may not read) logs once
    while not rt.stop_event.is_set():
        await asyncio.sleep(rt.settings.heartbeat_s)
        try:
            await watch_once(rt, transports)
            failing = None
        except Unavailable:
            pass  # Redis is out: the heartbeat reports it
        except Exception as exc:  # never the end of the watch
            if str(exc) != failing:
                log.exception("%s: acting on the role asked of it failed (needs the decode role's Redis user)", rt.worker_id)
            failing = str(exc)


async def watch_once(rt: WorkerRuntime, transports: dict[str, tuple[str, ...]]) -> None:
    if rt.heartbeat is None or rt.role is None or rt.stop_event.is_set():
        return
    want = await rt.registry.requested_role(rt.worker_id)
    if want is None or want == rt.role:
        return
    if want not in transports:
        log.warning("%s was asked to serve %r; an elastic worker serves %s only", rt.worker_id, want, " or ".join(ROLES))
        await rt.registry.request_role(rt.worker_id, rt.role)  # answered: what it serves
        return
    await rt.change_role(want, transports[want])


async def run(settings: WorkerSettings) -> None:
    if settings.role not in ROLES:
        raise SystemExit(f"an elastic worker starts as {' or '.join(ROLES)}, not {settings.role}")
    rt = WorkerRuntime(settings, SERVICES)
    await rt.start()
    roles = {"prefill": prefill_main.attach(rt, settings), "decode": decode_main.attach(rt, settings)}
    watch = asyncio.create_task(watch_role(rt, {name: r.transports for name, r in roles.items()}), name="role-watch")
    try:
        await rt.serve(roles[settings.role].transports)
    finally:
        watch.cancel()
        for r in roles.values():
            await r.close()
