"""Supervision of `distserve up`'s processes: restart what crashes, with backoff and a limit.

Lifecycle: `up` wraps each process it starts in a `Child` (`ProcChild` for workers and routers,
`RedisChild` for its Redis) and hands them to a `Supervisor`, whose `tick()` it calls every 0.25 s.
A tick never blocks: a child that exited while serving is logged and, per `RestartPolicy`, relaunched
after an exponential backoff (0.5 s doubling to 30 s) or left down once its restarts in a row pass the
limit; a relaunched child is polled for readiness (gRPC health SERVING, or Redis answering) one short
check per tick, so the others are watched meanwhile. A child that stays up 60 s starts its count
afresh. Every change rewrites `supervisor.json` (per child: pid, address, state, restarts, last exit)
atomically, for operators and tests.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distserve.rpc.channels import internal_options, sync_channel
from distserve.rpc.tls import Tls
from distserve.state.redis_server import RedisServer


class Proc(Protocol):
    """A process `up` launched (its `Proc` record): what ProcChild reads of it."""

    name: str
    address: str  # host:port of its gRPC server
    popen: Any  # subprocess.Popen, or up's Forked: pid, poll(), kill(), wait()

logger = logging.getLogger(__name__)


def describe_exit(code: int) -> str:
    """`exit code 3` or `signal SIGKILL`, from a Popen-style return code."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def backoff_s(streak: int, base_s: float = 0.5, max_s: float = 30.0) -> float:
    """The wait before restart number `streak + 1` in a row: base_s, doubling each time, at most max_s."""
    return min(max_s, base_s * 2.0 ** min(streak, 60))


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    limit: int = 5  # restarts in a row before a process is left down (0: never restart)
    base_s: float = 0.5  # first backoff
    max_s: float = 30.0  # longest backoff
    stable_s: float = 60.0  # up this long since its last start: its streak starts afresh
    start_timeout_s: float = 600.0  # a restarted process not ready after this long is killed (and counts as an exit)

    def on_exit(self, streak: int, uptime_s: float) -> tuple[int, float | None]:
        """(restarts in a row counting the coming one, wait before it); wait None: past the limit."""
        if uptime_s >= self.stable_s:
            streak = 0
        if streak >= self.limit:
            return streak, None
        return streak + 1, backoff_s(streak, self.base_s, self.max_s)


class Child(Protocol):
    """A supervised process, whatever starts it."""

    name: str
    address: str

    def pid(self) -> int | None: ...

    def exit_code(self) -> int | None:
        """None while it runs."""

    def relaunch(self) -> None:
        """Start it again (it has exited); raises when it cannot be started."""

    def ready(self) -> bool:
        """Whether it serves now; must return within a fraction of a tick."""

    def close(self) -> None:
        """Drop what ready() holds (a channel)."""

    def kill(self) -> None:
        """Stop it at once (it hung while starting)."""


class ProcChild:
    """A worker or router: its Proc, restarted by `respawn`, ready when its gRPC health says SERVING."""

    def __init__(self, proc: Proc, respawn: Callable[[Proc], None], tls: Tls | None = None):
        self.proc = proc
        self.tls = tls  # the suite's TLS (a certificate any service admits to health checks), or None
        self.name = proc.name
        self.address = proc.address
        self._respawn = respawn  # puts a freshly spawned interpreter in proc.popen
        self._channel: grpc.Channel | None = None

    def pid(self) -> int | None:
        return self.proc.popen.pid

    def exit_code(self) -> int | None:
        return self.proc.popen.poll()

    def relaunch(self) -> None:
        self.close()
        self._respawn(self.proc)

    def ready(self) -> bool:
        if self._channel is None:  # short reconnect backoff: it starts listening while we poll
            self._channel = sync_channel(self.address, self.tls, [
                ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000), *internal_options(self.tls)])
        try:
            resp = health_pb2_grpc.HealthStub(self._channel).Check(health_pb2.HealthCheckRequest(), timeout=0.2)
        except grpc.RpcError:
            return False
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            return False
        self.close()
        return True

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def kill(self) -> None:
        self.proc.popen.kill()
        self.proc.popen.wait()


class RedisChild:
    """`up`'s Redis: restarted on the same port; ready once restart() returns (it waited for PING)."""

    def __init__(self, server: RedisServer):
        self.server = server
        self.name = "redis"
        self.address = server.url

    def pid(self) -> int | None:
        return self.server.pid

    def exit_code(self) -> int | None:
        return self.server.returncode if self.server.pid is not None else -1

    def relaunch(self) -> None:
        self.server.restart()

    def ready(self) -> bool:
        return self.server.running()

    def close(self) -> None:
        pass

    def kill(self) -> None:
        self.server.stop()


@dataclass(slots=True)
class Watch:
    """Supervision state of one process. serving -(exits)-> backoff -(wait over)-> starting
    -(health SERVING)-> serving; past the restart limit -> failed; at shutdown -> stopped."""

    child: Child
    state: str = "serving"
    restarts: int = 0  # restarts so far
    streak: int = 0  # restarts in a row (since it last stayed up stable_s); checked against the limit
    started_at: float = 0.0  # monotonic time of its last start
    restart_at: float = 0.0  # monotonic time of its next start, while in backoff
    last_exit: str = ""  # how it last ended, e.g. "signal SIGKILL"


class Supervisor:
    """Restarts the suite's processes by a RestartPolicy; `tick()` never waits on a process."""

    def __init__(self, children: list[Child], policy: RestartPolicy, status_path: Path | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._clock = clock
        now = clock()
        self.watches = {c.name: Watch(c, started_at=now) for c in children}
        self._status_path = status_path
        self.write_status()

    def tick(self) -> None:
        now = self._clock()
        changed = [self._step(w, now) for w in self.watches.values()]
        if any(changed):
            self.write_status()

    def _step(self, w: Watch, now: float) -> bool:
        c = w.child
        if w.state in ("serving", "starting"):
            code = c.exit_code()
            if code is not None:
                self._exited(w, now, describe_exit(code))
                return True
            if w.state == "starting" and now - w.started_at > self.policy.start_timeout_s:
                c.kill()
                self._exited(w, now, f"not serving {self.policy.start_timeout_s:.0f} s after its restart: killed")
                return True
            if w.state == "starting" and c.ready():
                w.state = "serving"
                logger.info("%s is back: pid %s serving at %s (restart %d of %d)", c.name, c.pid(), c.address,
                            w.streak, self.policy.limit)
                return True
            return False
        if w.state == "backoff" and now >= w.restart_at:
            w.restarts += 1
            w.started_at = now
            try:
                c.relaunch()
            except Exception as exc:  # e.g. its port was taken meanwhile: counts as a failed start
                self._exited(w, now, f"failed to start ({exc})")
                return True
            w.state = "starting"
            logger.info("%s restarted: pid %s", c.name, c.pid())
            return True
        return False

    def _exited(self, w: Watch, now: float, how: str) -> None:
        c = w.child
        c.close()
        w.last_exit = how
        streak, wait_s = self.policy.on_exit(w.streak, now - w.started_at)
        w.streak = streak
        if wait_s is None:
            w.state = "failed"
            logger.error("%s (pid %s) %s; past its restart limit (%d in a row): left down", c.name, c.pid(), how,
                         self.policy.limit)
            return
        w.state = "backoff"
        w.restart_at = now + wait_s
        logger.warning("%s (pid %s) %s; restart %d of %d in %.1f s", c.name, c.pid(), how, streak,
                       self.policy.limit, wait_s)

    def alive(self, prefix: str) -> bool:
        """Whether any process whose name starts with prefix is serving or may still come back."""
        return any(w.state != "failed" for name, w in self.watches.items() if name.startswith(prefix))

    def status(self) -> dict[str, dict]:
        return {name: {"pid": w.child.pid(), "address": w.child.address, "state": w.state, "restarts": w.restarts,
                       "last_exit": w.last_exit} for name, w in self.watches.items()}

    def write_status(self) -> None:
        """supervisor.json, replaced atomically so a reader never sees half of it."""
        if self._status_path is None:
            return
        tmp = self._status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status(), indent=1) + "\n")
        os.replace(tmp, self._status_path)

    def stopped(self) -> None:
        for w in self.watches.values():
            w.child.close()
            if w.state != "failed":
                w.state = "stopped"
        self.write_status()

    def summary(self) -> str:
        return ", ".join(f"{name} {w.restarts}" + (" (failed)" if w.state == "failed" else "")
                         for name, w in self.watches.items())
