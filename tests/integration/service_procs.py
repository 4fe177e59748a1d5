"""Services as separate processes for the operations tests (metrics, drain, network namespaces).

`Service` starts one `distserve serve ROLE` (optionally inside a network namespace) and reads its
READY line: `READY <role> <host:port> metrics=<port>`. `Cluster` keeps the processes of one test,
prints their logs when the test fails, and stops whatever is left. `scrape` reads a Prometheus
endpoint into samples; `total` sums the samples of one series that carry the given labels.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

READY = re.compile(r"^READY (\S+) (\S+) metrics=(\d*)(?: http=(\d+))?$", re.M)


class Service:
    def __init__(self, name: str, role: str, args: list[str], logs: Path, netns: str | None = None, env: dict | None = None):
        self.name = name
        self.role = role
        self.log = logs / f"{name}.log"
        argv = [sys.executable, "-m", "distserve.cli", "serve", role, *args]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self._f = open(self.log, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._f, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.address: str | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None  # a router's OpenAI HTTP API, when it serves one

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 300.0) -> "Service":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = READY.search(self.text())
            if m:
                self.address = m.group(2)
                self.metrics_port = int(m.group(3)) if m.group(3) else None
                self.http_port = int(m.group(4)) if m.group(4) else None
                return self
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.text()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not READY after {timeout_s:.0f}s:\n{self.text()[-4000:]}")

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int:
        self.terminate()
        try:
            return self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()
        finally:
            self._f.close()


class Cluster:
    """The processes of one test; `with` prints their logs on failure and stops them all at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.services: list[Service] = []

    def start(self, name: str, role: str, args: list[str], **kw) -> Service:
        s = Service(name, role, args, self.logs, **kw)
        self.services.append(s)
        return s

    def dump(self) -> None:
        for s in self.services:
            print(f"---- {s.name} (exit {s.popen.poll()}) ----\n{s.text()[-6000:]}")

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.dump()
        for s in reversed(self.services):  # router first, then the workers
            s.terminate()
        for s in reversed(self.services):
            s.stop()


def scrape(host: str, port: int) -> list[tuple[str, dict[str, str], float]]:
    """Samples (name, labels, value) of one Prometheus endpoint."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples, name: str, **labels) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for n, lb, v in samples if n == name and all(lb.get(k) == x for k, x in labels.items()))


def names(samples) -> set[str]:
    return {n for n, _, _ in samples}
