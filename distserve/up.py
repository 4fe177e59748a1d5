"""`distserve up`: the whole suite on this machine, as separate processes.

Order: pull the model once -> start our own Redis (free port, no persistence) -> start the workers,
each pinned to its share of the cores with a matching torch thread count -> start the router -> wait
until every process reports SERVING on gRPC health -> print the address. SIGINT/SIGTERM, or any
process dying, stops everything in reverse: router, workers (each drains), Redis.

Workers are forked (`--preload on`, the default): this process first imports what a worker runs
(torch, the transformers model code, the engine, gRPC, the compiled kernels), freezes those objects
out of the garbage collector's reach, then forks one child per worker. The children share those pages
copy-on-write (the relocated data of torch's libraries and the imported modules: ~200 MiB that each
spawned worker would hold privately), and with `--share-weights` the weight file's pages as well. No
thread and no OpenMP pool exists here when it forks (the model is pulled in a subprocess). Each
child starts its own session, logs to its file and runs `distserve serve <role>` as a spawned one
would. `--preload off` spawns every worker as a fresh interpreter instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distserve.engine.models import home
from distserve.state.redis_server import RedisServer, free_port

READY_TIMEOUT_S = 900.0


class Forked:
    """A forked child with the parts of subprocess.Popen's interface that `up` uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass(slots=True)
class Proc:
    name: str
    address: str
    popen: subprocess.Popen | Forked
    log: Path


def preload() -> None:
    """Imports (and compiles) what a worker runs, so forked workers share it; then moves every object
    made so far out of the collector's generations (gc.freeze), whose passes would otherwise touch,
    and so copy, the shared pages."""
    import gc

    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import distserve.runtime  # noqa: F401
    import services.decode.main  # noqa: F401
    import services.prefill.main  # noqa: F401
    from distserve.engine import kernels

    kernels.paged_attention()
    kernels.int8_linear()
    gc.collect()
    gc.freeze()


def set_process_name(name: str) -> None:
    """The name `ps`, `top` and /proc/PID/comm show (15 bytes at most)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def forked_main(name: str, argv: list[str], log: Path) -> None:
    """The child's side of a fork: its own session, its log, `distserve <argv>`; never returns."""
    code = 1
    try:
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # whatever the parent had bound them to
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        set_process_name(f"ds-{name}")
        import logging

        logging.root.handlers.clear()  # the worker sets up its own, on the new stderr
        from distserve.cli import main

        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def core_plan(workers: int, threads: int, pin: bool) -> list[tuple[int, str]]:
    """(threads, cpu list) for each worker: the cores divided among them, disjoint where possible."""
    cores = sorted(os.sched_getaffinity(0))
    if workers <= 0:
        return []
    share = max(1, len(cores) // workers)
    plan = []
    for i in range(workers):
        mine = cores[(i * share) % len(cores):][:share] if pin and workers <= len(cores) else []
        plan.append((threads or share, ",".join(map(str, mine))))
    return plan


def wait_serving(address: str, proc: subprocess.Popen, deadline: float) -> None:
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {READY_TIMEOUT_S:.0f}s")


class Suite:
    def __init__(self, args):
        self.args = args
        self.procs: list[Proc] = []
        self.redis: RedisServer | None = None
        self.logs = Path(args.logs) if args.logs else home() / "logs" / time.strftime("up-%Y%m%d-%H%M%S")
        self._stop = False

    def _spawn(self, name: str, argv: list[str], address: str) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as f:
            popen = subprocess.Popen([sys.executable, "-m", "distserve.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        p = Proc(name, address, popen, log)
        self.procs.append(p)
        return p

    def _fork(self, name: str, argv: list[str], address: str) -> Proc:
        log = self.logs / f"{name}.log"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            forked_main(name, argv, log)
        p = Proc(name, address, Forked(pid), log)
        self.procs.append(p)
        return p

    def start(self) -> str:
        a = self.args
        self.logs.mkdir(parents=True, exist_ok=True)
        # pull/convert once, before the workers race for it, in a subprocess: converting runs torch
        # here otherwise, and a process whose OpenMP pool has started must not fork workers
        pulled = subprocess.run([sys.executable, "-m", "distserve.cli", "model", "pull", a.model], stdout=subprocess.DEVNULL)
        if pulled.returncode != 0:
            raise SystemExit(f"could not resolve model {a.model!r} (its error is above)")
        fork = a.preload == "on"
        if fork:
            preload()
        self.redis = RedisServer(host="127.0.0.1").start()
        roles = ["prefill"] * a.prefill + ["decode"] * a.decode + ["colocated"] * a.colocated
        if not roles or (a.prefill and not a.decode):
            raise SystemExit("need decode workers for prefill workers, or colocated workers")
        plan = core_plan(len(roles), a.threads, not a.no_pin)
        common = ["--model", a.model, "--redis-url", self.redis.url, "--host", a.host]
        engine_flags = []  # workers only, when given
        for flag in ("weights", "kv_dtype", "share_weights"):
            if getattr(a, flag, ""):
                engine_flags += ["--" + flag.replace("_", "-"), getattr(a, flag)]
        workers = []
        counts: dict[str, int] = {}
        for role, (threads, cpus) in zip(roles, plan):
            counts[role] = counts.get(role, 0) + 1
            port = free_port(a.host)
            name = f"{role}-{counts[role]}"
            argv = ["serve", role, *common, *engine_flags, "--port", str(port), "--threads", str(threads), "--worker-id", name, *a.worker_arg]
            if cpus:
                argv += ["--cpus", cpus]
            workers.append((self._fork if fork else self._spawn)(name, argv, f"{a.host}:{port}"))
        router = self._spawn("router", ["serve", "router", *common, "--port", str(a.port)], f"{a.host}:{a.port}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        for p in [*workers, router]:
            try:
                wait_serving(p.address, p.popen, deadline)
            except Exception as exc:
                self.report_failure(p, exc)
                raise SystemExit(1)
        return router.address

    def report_failure(self, p: Proc, exc: Exception, what: str = "failed to start") -> None:
        print(f"{p.name} {what}: {exc}; last lines of {p.log}:", file=sys.stderr)
        try:
            print("".join(p.log.read_text(errors="replace").splitlines(True)[-30:]), file=sys.stderr)
        except OSError:
            pass

    def stop(self) -> None:
        for p in reversed(self.procs):  # router first, then the workers
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        if self.redis is not None:
            self.redis.stop()

    def run(self) -> int:
        def on_signal(signum, frame):
            self._stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        code = 0
        try:
            address = self.start()
            a = self.args
            print(f"distserve is up: router at {address} ({a.prefill} prefill, {a.decode} decode, {a.colocated} colocated; "
                  f"model {a.model}; redis at {self.redis.url}; logs in {self.logs}). Ctrl-C stops it.", flush=True)
            while not self._stop:
                dead = next((p for p in self.procs if p.popen.poll() is not None), None)
                if dead is not None:
                    self.report_failure(dead, RuntimeError(f"exited with code {dead.popen.returncode}"), "stopped while serving")
                    code = 1
                    break
                time.sleep(0.5)
        except SystemExit as exc:
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            self.stop()
            print("distserve stopped.", flush=True)
        return code


class UpProcess:
    """`distserve up` in a subprocess; prints every log on failure."""

    def __init__(self, tmp: Path, *args: str, timeout_s: float = READY_TIMEOUT_S):
        self.port = free_port()
        self.logs = tmp / "logs"
        self.out = tmp / "up.out"
        self._f = open(self.out, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distserve.cli", "up", "--port", str(self.port), "--logs", str(self.logs), *args],
            stdout=self._f, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.out.read_text(errors="replace")
            m = re.search(r"redis at (redis://\S+);", text)
            if m:
                self.redis_url = m.group(1)
                break
            if self.proc.poll() is not None:
                self.dump()
                raise RuntimeError(f"distserve up exited with {self.proc.returncode}")
            time.sleep(0.3)
        else:
            self.dump()
            self.stop()
            raise TimeoutError("distserve up did not come up")
        self.target = f"127.0.0.1:{self.port}"

    def dump(self) -> None:
        print("---- distserve up ----\n" + self.out.read_text(errors="replace"))
        for log in sorted(self.logs.glob("*.log")) if self.logs.exists() else []:
            print(f"---- {log.name} ----\n" + log.read_text(errors="replace")[-6000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._f.close()
        return self.proc.returncode
