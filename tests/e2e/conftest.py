"""The whole suite as separate processes, started by `distserve up`, for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distserve.state.redis_server import free_port


class UpProcess:
    """`distserve up` in a subprocess; prints every log on failure."""

    def __init__(self, tmp: Path, *args: str, timeout_s: float = 600.0):
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


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def dump_on_failure(request):
    """Tests call `dump_on_failure(suite)`; the suite's logs print if the test fails."""
    suites = []
    yield suites.append
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for s in suites:
            s.dump()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
