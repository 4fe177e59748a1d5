"""`distserve up`: the whole suite on this machine, as separate processes (`Suite`).

Order: pull the model once (compiling meanwhile the native kernels this CPU has no build of) -> start
our own Redis (free port, no persistence) -> start the workers, each pinned to its share of the cores
with a matching torch thread count -> start the router -> wait until every process reports SERVING on
gRPC health -> print the address -> supervise. SIGINT/SIGTERM stops everything in reverse: routers,
workers (each drains), Redis.

Supervision (distserve.supervisor: `Supervisor`, one `Watch` per process): each tick polls every process without blocking.
One that exits while the suite serves is logged (name, exit code or signal, restart n of the limit),
waits out a backoff (`RestartPolicy`: 0.5 s doubling to 30 s) and is started again with the same argv
(same worker id, same port); Redis is started again on the same port with the same users, so every
service's URL stays valid and the workers re-register at their next heartbeat. A restarted process
is `starting` until its gRPC health answers SERVING (one short check per tick), then `serving`.
Restarts in a row count against `--restart-limit`; a process that stayed up `stable_s` starts its
count and its backoff afresh; one past the limit stays down (`failed`) and is reported. The others
serve meanwhile. `up` ends by itself only when every router has failed (exit code 1). Per-process pid, state and restart
count are written to `supervisor.json` in the logs folder at every change and printed at shutdown.

Workers are forked (`--preload on`, the default): this process first imports what a worker runs
(torch, the transformers model code, the engine, gRPC, the compiled kernels), freezes those objects
out of the garbage collector's reach, then forks one child per worker. The children share those pages
copy-on-write (the relocated data of torch's libraries and the imported modules: ~200 MiB that each
spawned worker would hold privately), and with `--share-weights` the weight file's pages as well. No
thread and no OpenMP pool exists here when it forks (the model is pulled in a subprocess). The fork
is multiprocessing's fork context (`Forked` adapts its Process to the Popen interface the supervisor
reads); each child starts its own session, logs to its file, takes its role's environment and runs
`serve <role>` through `services.roles.main`, as a spawned one would. `--preload off` spawns every
worker as a fresh interpreter instead.

Services talk TLS (`--tls on`, the default): `up` makes a CA and a certificate per role once, in
`--tls-dir` (default $DISTSERVE_HOME/tls; made again when it lacks a host asked for or nears its end),
and gives each child its role's files in DISTSERVE_TLS_*: workers take calls only from peers with a
certificate of that CA and the right role, the router serves TLS (and HTTPS), and clients need
DISTSERVE_TLS_CA=<tls-dir>/ca.pem, which the status line names. `--tls off` runs everything plaintext.

Redis runs with distserve's ACL users (distserve.state.acl): each child gets its role's URL, password
included, in its environment (`DISTSERVE_REDIS_URL`), never in its argv, which any user can read in
/proc; the admin URL is written, owner-only, to `redis-admin.url` in the logs folder.

Restarts always spawn (`_spawn`), never fork: once the suite is up this process holds gRPC channels
and their threads (the health checks), and a fork of a process with running gRPC or OpenMP threads
can inherit locks held by a thread that does not exist in the child. Only the first start forks.

`distserve.up.UpProcess` runs this command in a subprocess, for tests and benchmarks.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from filelock import FileLock

from distserve.models import home
from distserve.rpc.certs import make_certs, role_files
from distserve.rpc.certs import valid_for as certs_valid_for
from distserve.rpc.channels import internal_options, sync_channel
from distserve.rpc.tls import Tls
from distserve.state.acl import write_private
from distserve.state.redis_server import RedisServer, free_port, port_free
from distserve.supervisor import ProcChild, RedisChild, RestartPolicy, Supervisor, describe_exit
from distserve.up import READY_TIMEOUT_S  # how long up waits for its processes, and its driver for up
from services import roles

logger = logging.getLogger(__name__)

TICK_S = 0.25  # the supervisor's poll period


class Forked:
    """A worker forked through multiprocessing's fork context, with the parts of subprocess.Popen's
    interface that `up` and its supervisor use (pid, returncode, poll, wait, send_signal, kill)."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self.process = process  # started

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode  # -N for a signal, as Popen gives it

    def poll(self) -> int | None:
        return self.process.exitcode  # reaps the child once it has exited

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass(slots=True)
class Proc:
    name: str
    address: str  # host:port of its gRPC server
    popen: subprocess.Popen | Forked  # replaced by a spawned Popen at each restart
    log: Path
    argv: list[str] = field(default_factory=list)  # `distserve <argv>`, the same at every restart
    env: dict[str, str] = field(default_factory=dict)  # added to its environment (secrets: not in argv)
    metrics: str = ""  # host:port of its Prometheus endpoint, where up chose it (the same at every restart)


def preload() -> None:
    """Imports (and compiles) what a worker runs, so forked workers share it; then moves every object
    made so far out of the collector's generations (gc.freeze), whose passes would otherwise touch,
    and so copy, the shared pages."""
    import gc

    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import services.decode.main  # noqa: F401
    import services.prefill.main  # noqa: F401
    import services.worker.runtime  # noqa: F401
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


def forked_main(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """The child's side of a fork (multiprocessing's, which turns SystemExit and errors into the exit
    code and ends the child with os._exit): its own session, its log, `env` added to its environment,
    then `serve <role>` (`argv`)."""
    os.setsid()
    os.environ.update(env or {})
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # whatever the parent had bound them to
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    set_process_name(f"ds-{name}")
    logging.root.handlers.clear()  # the worker sets up its own, on the new stderr
    roles.main(argv)


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


def wait_serving(address: str, proc: subprocess.Popen | Forked, deadline: float,
                 stopping: Callable[[], bool] = lambda: False, tls: Tls | None = None) -> None:
    """Returns once `address` answers SERVING; SystemExit(0) as soon as stopping() (a signal came)."""
    with sync_channel(address, tls, internal_options(tls)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if stopping():
                raise SystemExit(0)
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {describe_exit(proc.returncode)}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {READY_TIMEOUT_S:.0f}s")


def fresh_port(host: str, taken: set[int]) -> int:
    """A free port not in `taken` (ports handed out a moment ago are free until their servers bind them,
    and ports the command line names are bound only later), added to it."""
    port = free_port(host)
    while port in taken:
        port = free_port(host)
    taken.add(port)
    return port


def metrics_flags(host: str, taken: set[int], extra: list[str]) -> tuple[list[str], str]:
    """A fixed Prometheus port for a process (so a restart keeps it, and up can say where it is), unless
    its extra flags (--worker-arg / --router-arg) set one: (flags, host:port or "")."""
    if any(f == "--metrics-port" or f.startswith("--metrics-port=") for f in extra):
        return [], ""
    port = fresh_port(host, taken)
    return ["--metrics-port", str(port)], f"{host}:{port}"


def router_ports(host: str, first: int, n: int, taken: set[int] | None = None) -> list[int]:
    """first, then the next ports up where free (and not in `taken`), else any free one."""
    taken = set() if taken is None else taken
    ports = [first]
    for i in range(1, n):
        want = first + i
        if want < 65536 and want not in ports and want not in taken and port_free(host, want):
            taken.add(want)
            ports.append(want)
        else:
            ports.append(fresh_port(host, taken))
    return ports


class Suite:
    def __init__(self, args):
        self.args = args
        self.procs: list[Proc] = []  # in start order: workers, then routers
        self.redis: RedisServer | None = None
        self.tls_dir: Path | None = None  # the certificates' folder, with --tls on
        self.supervisor: Supervisor | None = None  # set once everything serves
        self.logs = Path(args.logs) if args.logs else home() / "logs" / time.strftime("up-%Y%m%d-%H%M%S")
        self._stop = False

    def _spawn(self, name: str, argv: list[str], address: str, env: dict[str, str]) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as f:
            popen = subprocess.Popen([sys.executable, "-m", "distserve.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **env})
        p = Proc(name, address, popen, log, argv, env)
        self.procs.append(p)
        return p

    def _respawn(self, p: Proc) -> None:
        """A restart: a fresh interpreter running the same `distserve <argv>`, appending to the same log."""
        with open(p.log, "ab") as f:
            f.write(f"\n---- restarted by distserve up at {time.strftime('%H:%M:%S')} ----\n".encode())
            f.flush()
            p.popen = subprocess.Popen([sys.executable, "-m", "distserve.cli", *p.argv], stdout=f,
                                       stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **p.env})

    def _fork(self, name: str, argv: list[str], address: str, env: dict[str, str]) -> Proc:
        log = self.logs / f"{name}.log"
        process = multiprocessing.get_context("fork").Process(target=forked_main, args=(name, argv, log, env), name=name)
        process.start()  # flushes our stdout and stderr first
        p = Proc(name, address, Forked(process), log, argv, env)
        self.procs.append(p)
        return p

    def start(self) -> list[str]:
        """Starts everything, waits until each serves; the routers' addresses, the first one first."""
        a = self.args
        if a.routers < 1 or a.restart_limit < 0:
            raise SystemExit("--routers must be at least 1 and --restart-limit at least 0")
        self.logs.mkdir(parents=True, exist_ok=True)
        # pull/convert once, before the workers race for it, in a subprocess: converting runs torch
        # here otherwise, and a process whose OpenMP pool has started must not fork workers. Meanwhile
        # the native kernels this CPU lacks compile, both at once (a first start: ~20 s on 2 idle cores)
        kernel_build = subprocess.Popen([sys.executable, "-m", "distserve.cli", "kernels", "build", "--missing", "--jobs", "2"])
        try:
            pulled = subprocess.run([sys.executable, "-m", "distserve.cli", "model", "pull", a.model], stdout=subprocess.DEVNULL)
        finally:
            kernel_build.wait()  # a failed build is no error here: the workers warn and run the torch path
        if pulled.returncode != 0:
            raise SystemExit(f"could not resolve model {a.model!r} (its error is above)")
        fork = a.preload == "on"
        if fork:
            preload()
        self.tls_dir = self._certificates() if a.tls == "on" else None
        self.redis = RedisServer(host="127.0.0.1", acl=True).start()
        write_private(self.redis_admin_file, self.redis.admin_url + "\n")
        roles = ["prefill"] * a.prefill + ["decode"] * a.decode + ["colocated"] * a.colocated
        if not roles or (a.prefill and not a.decode):
            raise SystemExit("need decode workers for prefill workers, or colocated workers")
        plan = core_plan(len(roles), a.threads, not a.no_pin)
        common = ["--model", a.model, "--host", a.host]
        engine_flags = []  # workers only, when given
        for flag in ("weights", "kv_dtype", "share_weights", "prefill_gemm"):
            if getattr(a, flag, ""):
                engine_flags += ["--" + flag.replace("_", "-"), getattr(a, flag)]
        spec_flags = ["--speculative", a.speculative] if getattr(a, "speculative", "") else []  # decode/colocated only
        workers = []
        # ports handed out and not bound yet: the routers' HTTP APIs (named on the command line), the
        # routers' own (chosen first, bound last), and those given to workers so far
        taken = {a.port} | ({a.http_port + i for i in range(a.routers)} if a.http_port > 0 else set())
        router_at = router_ports(a.host, a.port, a.routers, taken)
        counts: dict[str, int] = {}
        for role, (threads, cpus) in zip(roles, plan):
            counts[role] = counts.get(role, 0) + 1
            port = fresh_port(a.host, taken)
            metrics, metrics_at = metrics_flags(a.host, taken, a.worker_arg)
            name = f"{role}-{counts[role]}"
            argv = ["serve", role, *common, *engine_flags, *(spec_flags if role != "prefill" else []), "--port", str(port), *metrics,
                    "--threads", str(threads), "--worker-id", name, *a.worker_arg]
            if cpus:
                argv += ["--cpus", cpus]
            elastic = getattr(a, "elastic", False) and role != "colocated"  # as a decode worker it pulls KV and reads the registry: the decode role's rights
            if elastic:
                argv += ["--elastic", "true"]
            env = self._env("decode" if elastic else role)
            workers.append((self._fork if fork else self._spawn)(name, argv, f"{a.host}:{port}", env))
            workers[-1].metrics = metrics_at
        routers = []
        for i, port in enumerate(router_at):
            name = "router" if i == 0 else f"router-{i + 1}"
            http = ["--http-port", str(a.http_port + i if a.http_port > 0 else a.http_port)]
            metrics, metrics_at = metrics_flags(a.host, taken, a.router_arg)
            routers.append(self._spawn(name, ["serve", "router", *common, "--port", str(port), *http, *metrics, *a.router_arg],
                                       f"{a.host}:{port}", self._env("router")))
            routers[-1].metrics = metrics_at
        deadline = time.monotonic() + READY_TIMEOUT_S
        for p in [*workers, *routers]:
            try:
                wait_serving(p.address, p.popen, deadline, lambda: self._stop, self.tls)  # Ctrl-C while starting
            except Exception as exc:
                self.report_failure(p, exc)
                raise SystemExit(1)
        policy = RestartPolicy(limit=a.restart_limit)
        children = [RedisChild(self.redis), *(ProcChild(p, self._respawn, self.tls) for p in self.procs)]
        self.supervisor = Supervisor(children, policy, self.logs / "supervisor.json")
        return [r.address for r in routers]

    @property
    def redis_admin_file(self) -> Path:
        """Where the URL of Redis's admin user is written (owner-only)."""
        return self.logs / "redis-admin.url"

    def _env(self, role: str) -> dict[str, str]:
        """What a child of `role` gets in its environment: its Redis URL and, with TLS, its certificate."""
        tls = role_files(self.tls_dir, role).env() if self.tls_dir else {}
        return {"DISTSERVE_REDIS_URL": self.redis.role_url(role), **tls}

    def _certificates(self) -> Path:
        """The TLS folder, with a set valid for the hosts this suite serves on (made when it has none)."""
        a = self.args
        d = Path(a.tls_dir) if a.tls_dir else home() / "tls"
        hosts = [h for h in (a.host, socket.gethostname()) if h not in ("0.0.0.0", "::", "")]
        d.mkdir(parents=True, exist_ok=True)
        with FileLock(str(d) + ".lock"):  # two `up`s starting at once make one set
            if not certs_valid_for(d, hosts):
                make_certs(d, hosts)
                logger.info("made a CA and role certificates in %s", d)
        return d

    @functools.cached_property
    def tls(self) -> Tls | None:
        """What up itself presents to health-check its children (a router's certificate); read once,
        after start() chose the folder."""
        if self.tls_dir is None:
            return None
        f = role_files(self.tls_dir, "router")
        return Tls.load(str(f.ca), str(f.cert), str(f.key))

    def report_failure(self, p: Proc, exc: Exception, what: str = "failed to start") -> None:
        print(f"{p.name} {what}: {exc}; last lines of {p.log}:", file=sys.stderr)
        try:
            print("".join(p.log.read_text(errors="replace").splitlines(True)[-30:]), file=sys.stderr)
        except OSError:
            pass

    def stop(self) -> None:
        for p in reversed(self.procs):  # routers first, then the workers
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
        if self.supervisor is not None:
            self.supervisor.stopped()
            print(f"restarts: {self.supervisor.summary()}", flush=True)

    def run(self) -> int:
        def on_signal(signum, frame):
            self._stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        code = 0
        try:
            addresses = self.start()
            a = self.args
            more = f"routers at {','.join(addresses)}; " if len(addresses) > 1 else ""
            if self.tls_dir is not None:  # before the "is up" line, which scripts wait for
                print(f"TLS certificates in {self.tls_dir}; clients need DISTSERVE_TLS_CA={self.tls_dir / 'ca.pem'}", flush=True)
            if at := [f"{p.name}={p.metrics}" for p in self.procs if p.metrics]:
                print(f"metrics (Prometheus, plain HTTP): {' '.join(at)}", flush=True)
            print(f"distserve is up: router at {addresses[0]} ({more}{a.prefill} prefill, {a.decode} decode, "
                  f"{a.colocated} colocated; model {a.model}; redis at {self.redis.url}, admin URL in {self.redis_admin_file}; "
                  f"logs in {self.logs}). "
                  "Ctrl-C stops it.", flush=True)
            if a.http_port > 0:
                scheme = "https" if self.tls_dir is not None else "http"
                print(f"OpenAI-compatible API at {scheme}://{a.host}:{a.http_port}/v1", flush=True)
            while not self._stop:
                self.supervisor.tick()
                if not self.supervisor.alive("router"):
                    logger.error("no router left serving (each is past its restart limit): stopping the suite")
                    code = 1
                    break
                time.sleep(TICK_S)
        except SystemExit as exc:
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            self.stop()
            print("distserve stopped.", flush=True)
        return code
