"""`UpProcess`: `distserve up` (services.up) in a subprocess, for tests and benchmarks: waits until it
is up, reads its addresses, metrics endpoints, TLS folder and Redis admin URL from its output, prints every log on
failure and stops it with SIGINT."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from distserve.state.redis_server import free_port

READY_TIMEOUT_S = 900.0  # how long `distserve up` waits for each process to serve (services.up), and UpProcess for up


class UpProcess:
    """`distserve up` in a subprocess; prints every log on failure."""

    def __init__(self, tmp: Path, *args: str, timeout_s: float = READY_TIMEOUT_S):
        self.port = free_port()
        if "--http-port" not in args:  # never the default 8000: tests run beside whatever holds it
            args = (*args, "--http-port", str(free_port()))
        if "--tls-dir" not in args:  # its own CA, not the user's $DISTSERVE_HOME/tls
            args = (*args, "--tls-dir", str(tmp / "tls"))
        self.http_port = int(args[args.index("--http-port") + 1])
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
            m = re.search(r"redis at (redis://\S+), admin URL in (\S+);", text)
            if m:
                self.redis_address = m.group(1)  # without credentials, as supervisor.json names it
                self.redis_url = Path(m.group(2)).read_text().strip()  # the admin user's
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
        m = re.search(r"TLS certificates in (\S+);", text)
        self.tls_dir = Path(m.group(1)) if m else None  # None: the suite runs plaintext (--tls off)
        self.tls_ca = str(self.tls_dir / "ca.pem") if self.tls_dir else None
        scheme = "https" if self.tls_dir else "http"
        self.http_url = f"{scheme}://127.0.0.1:{self.http_port}" if self.http_port > 0 else None
        m = re.search(r"routers at (\S+);", text)
        self.targets = m.group(1).split(",") if m else [self.target]  # every router, the first one first
        m = re.search(r"^metrics \(Prometheus[^:]*: (.*)$", text, re.M)
        self.metrics = dict(kv.split("=", 1) for kv in m.group(1).split()) if m else {}  # process name -> host:port

    @property
    def client_tls(self) -> dict[str, str]:
        """The SDK's TLS arguments for this suite's routers: `Client(up.target, **up.client_tls)`."""
        return {"tls_ca": self.tls_ca or ""}

    def status(self) -> dict[str, dict]:
        """supervisor.json: per process name its pid, address, state, restarts and last exit."""
        return json.loads((self.logs / "supervisor.json").read_text())

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
