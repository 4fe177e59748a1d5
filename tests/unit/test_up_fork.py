"""`distserve up`'s forked workers: the handle that stands in for Popen, and the child's side."""

import os
import signal
import subprocess
import sys
import time

import pytest

from distserve.up import Forked, forked_main


def fork_running(code: str) -> Forked:
    pid = os.fork()
    if pid == 0:  # the child runs `code` and exits with what it says
        try:
            exec(code, {"os": os, "time": time})
        finally:
            os._exit(0)
    return Forked(pid)


def test_forked_reports_exit_codes_and_signals_like_popen():
    p = fork_running("time.sleep(0.2); os._exit(3)")
    assert p.poll() is None
    assert p.wait(timeout=10) == 3 and p.poll() == 3
    q = fork_running("time.sleep(60)")
    with pytest.raises(subprocess.TimeoutExpired):
        q.wait(timeout=0.2)
    q.send_signal(signal.SIGTERM)
    assert q.wait(timeout=10) == -signal.SIGTERM
    q.send_signal(signal.SIGTERM)  # already reaped: a no-op, not an error
    r = fork_running("time.sleep(60)")
    r.kill()
    assert r.wait(timeout=10) == -signal.SIGKILL


def test_a_forked_worker_writes_to_its_own_log_and_exits_with_its_code(tmp_path):
    log = tmp_path / "w.log"
    pid = os.fork()
    if pid == 0:
        sys.argv = ["distserve"]
        forked_main("probe-1", ["settings"], log)  # a real CLI command; never returns
    p = Forked(pid)
    assert p.wait(timeout=60) == 0
    assert "DISTSERVE_" in log.read_text()  # its output went to its log, not ours
    pid = os.fork()
    if pid == 0:
        forked_main("probe-2", ["serve", "prefill", "--no-such-flag"], log)  # argparse exits 2
    assert Forked(pid).wait(timeout=60) == 2
    assert "--no-such-flag" in log.read_text()
