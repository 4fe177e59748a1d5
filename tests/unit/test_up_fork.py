"""`distserve up`'s forked workers: multiprocessing's fork context behind the Popen interface the
supervisor reads, and the child's side (own session, own log, its environment, `serve <role>`)."""

import multiprocessing
import os
import signal
import subprocess
import time

import pytest

from services.up import Forked, forked_main

FORK = multiprocessing.get_context("fork")


def _sleep_then_exit(seconds: float, code: int) -> None:
    time.sleep(seconds)
    os._exit(code)


def forked(seconds: float, code: int = 0) -> Forked:
    p = FORK.Process(target=_sleep_then_exit, args=(seconds, code))
    p.start()
    return Forked(p)


def test_forked_reports_exit_codes_and_signals_like_popen():
    p = forked(0.2, 3)
    assert p.poll() is None and p.returncode is None
    assert p.wait(timeout=10) == 3 and p.poll() == 3 and p.returncode == 3
    q = forked(60)
    with pytest.raises(subprocess.TimeoutExpired):
        q.wait(timeout=0.2)
    q.send_signal(signal.SIGTERM)
    assert q.wait(timeout=10) == -signal.SIGTERM
    q.send_signal(signal.SIGTERM)  # already reaped: a no-op, not an error
    r = forked(60)
    r.kill()
    assert r.wait(timeout=10) == -signal.SIGKILL


def _report(path: str) -> None:
    """What a forked child sees of itself, written where the test reads it."""
    with open(path, "w") as f:
        f.write(f"{os.getsid(0)} {os.getpid()} {os.environ.get('DISTSERVE_PROBE', '')}")


def test_a_forked_worker_has_its_own_session_log_and_environment_and_exits_with_its_code(tmp_path, monkeypatch):
    log = tmp_path / "w.log"
    p = FORK.Process(target=forked_main, args=("probe-1", ["serve", "prefill", "--help"], log, {"DISTSERVE_PROBE": "yes"}))
    p.start()
    assert Forked(p).wait(timeout=60) == 0
    assert "DISTSERVE_KV_CACHE_BYTES" in log.read_text()  # its output went to its log, not ours
    p = FORK.Process(target=forked_main, args=("probe-2", ["serve", "prefill", "--no-such-flag"], log))
    p.start()
    assert Forked(p).wait(timeout=60) == 2  # argparse's exit code
    assert "--no-such-flag" in log.read_text()
    assert "DISTSERVE_PROBE" not in os.environ  # the child's environment stayed its own

    # the session and the environment, seen from inside a child that runs forked_main's set-up
    seen = tmp_path / "seen"
    import services.up as up

    monkeypatch.setattr(up.roles, "main", lambda argv: _report(str(seen)))  # inherited by the fork
    p = FORK.Process(target=forked_main, args=("probe-3", ["serve", "decode"], log, {"DISTSERVE_PROBE": "yes"}))
    p.start()
    assert Forked(p).wait(timeout=60) == 0
    sid, pid, env = seen.read_text().split()
    assert sid == pid and env == "yes"  # a session leader of its own: up's Ctrl-C does not reach it directly
