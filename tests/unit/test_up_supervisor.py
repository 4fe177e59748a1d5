"""`distserve up`'s supervision without processes: the backoff arithmetic, the restart limit and its
reset, and the Supervisor's state machine driven by fake children and a fake clock."""

from __future__ import annotations

import json
import signal

import pytest

from distserve.supervisor import RestartPolicy, Supervisor, backoff_s, describe_exit


def test_backoff_doubles_from_the_base_and_stops_at_the_cap():
    assert [backoff_s(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_s(10_000) == 30.0  # no overflow however long the streak
    assert backoff_s(2, base_s=0.1, max_s=1.0) == pytest.approx(0.4)


def test_policy_counts_restarts_in_a_row_and_forgives_a_process_that_stayed_up():
    pol = RestartPolicy(limit=3, base_s=0.5, max_s=30.0, stable_s=60.0)
    assert pol.on_exit(0, uptime_s=1.0) == (1, 0.5)
    assert pol.on_exit(1, uptime_s=1.0) == (2, 1.0)
    assert pol.on_exit(2, uptime_s=1.0) == (3, 2.0)
    assert pol.on_exit(3, uptime_s=1.0) == (3, None)  # past the limit: left down
    assert pol.on_exit(3, uptime_s=60.0) == (1, 0.5)  # it stayed up a while: a fresh count and backoff
    assert RestartPolicy(limit=0).on_exit(0, uptime_s=1000.0) == (0, None)  # 0: never restart


def test_exits_are_described_by_code_or_signal_name():
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-200) == "signal 200"


class FakeChild:
    def __init__(self, name: str, ready_after: int = 1, fail_starts: int = 0):
        self.name, self.address = name, f"{name}:1"
        self._pid, self.code = 100, None
        self.ready_after = ready_after  # ready() calls answered False after a start
        self.fail_starts = fail_starts  # relaunches that raise
        self.checks = 0
        self.launches = 0
        self.closed = 0

    def pid(self):
        return self._pid

    def exit_code(self):
        return self.code

    def relaunch(self):
        self.launches += 1
        if self.fail_starts:
            self.fail_starts -= 1
            raise RuntimeError("port taken")
        self._pid += 1
        self.code = None
        self.checks = 0

    def ready(self):
        self.checks += 1
        return self.checks > self.ready_after

    def close(self):
        self.closed += 1

    def kill(self):
        self.code = -signal.SIGKILL


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_a_crashed_process_waits_its_backoff_restarts_and_serves_while_the_others_are_untouched(tmp_path):
    clock, dec, router = Clock(), FakeChild("decode-1"), FakeChild("router")
    status = tmp_path / "supervisor.json"
    sup = Supervisor([dec, router], RestartPolicy(limit=2, base_s=0.5, stable_s=60.0), status, clock=clock)
    assert json.loads(status.read_text())["decode-1"] == {"pid": 100, "address": "decode-1:1", "state": "serving",
                                                          "restarts": 0, "last_exit": ""}
    dec.code = -signal.SIGKILL
    sup.tick()
    w = sup.watches["decode-1"]
    assert (w.state, w.streak, w.last_exit) == ("backoff", 1, "signal SIGKILL")
    clock.t += 0.4
    sup.tick()
    assert dec.launches == 0  # still waiting
    clock.t += 0.2
    sup.tick()
    assert (dec.launches, w.state, w.restarts) == (1, "starting", 1)
    sup.tick()  # health not SERVING yet
    assert w.state == "starting"
    sup.tick()
    assert w.state == "serving"
    assert json.loads(status.read_text())["decode-1"]["pid"] == 101
    assert sup.watches["router"].state == "serving" and router.launches == 0
    # a second crash at once: backoff doubles; a third: past the limit of 2, left down
    dec.code = 1
    sup.tick()
    assert (w.state, w.streak, w.restart_at - clock.t) == ("backoff", 2, 1.0)
    clock.t += 1.0
    sup.tick()
    dec.code = 1
    sup.tick()
    assert w.state == "failed" and w.restarts == 2
    assert sup.alive("decode") is False and sup.alive("router") is True
    assert json.loads(status.read_text())["decode-1"]["state"] == "failed"
    sup.stopped()
    st = json.loads(status.read_text())
    assert (st["decode-1"]["state"], st["router"]["state"]) == ("failed", "stopped")
    assert sup.summary() == "decode-1 2 (failed), router 0"


def test_a_restart_that_cannot_start_counts_and_backs_off_again(tmp_path):
    clock, redis = Clock(), FakeChild("redis", fail_starts=1)
    sup = Supervisor([redis], RestartPolicy(limit=3, base_s=0.5), None, clock=clock)
    redis.code = -signal.SIGKILL
    sup.tick()
    clock.t += 0.5
    sup.tick()  # relaunch raises
    w = sup.watches["redis"]
    assert (w.state, w.streak, w.restarts, w.last_exit) == ("backoff", 2, 1, "failed to start (port taken)")
    clock.t += 1.0
    sup.tick()
    assert (w.state, redis.launches) == ("starting", 2)


def test_a_process_that_stayed_up_gets_a_fresh_streak(tmp_path):
    clock, dec = Clock(), FakeChild("decode-1", ready_after=0)
    sup = Supervisor([dec], RestartPolicy(limit=1, base_s=0.5, stable_s=60.0), None, clock=clock)
    for _ in range(3):  # with limit 1 it would be left down at the second crash, were it not stable
        clock.t += 61.0
        dec.code = 1
        sup.tick()
        assert sup.watches["decode-1"].state == "backoff"
        clock.t += 0.5
        sup.tick()
        sup.tick()
        assert sup.watches["decode-1"].state == "serving"
    assert sup.watches["decode-1"].restarts == 3


def test_further_routers_take_the_next_ports_up_or_any_free_one():
    import socket

    from services.up import router_ports

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        first = taken.getsockname()[1] - 1
        ports = router_ports("127.0.0.1", first, 3)
    assert ports[0] == first and ports[1] != first + 1 and len(set(ports)) == 3


def test_waiting_for_a_process_to_serve_gives_way_to_a_stop_signal():
    from services.up import wait_serving

    class Running:
        returncode = None

        def poll(self):
            return None

    with pytest.raises(SystemExit) as exc:
        wait_serving("127.0.0.1:9", Running(), deadline=float("inf"), stopping=lambda: True)
    assert exc.value.code == 0


def test_a_restart_that_never_becomes_ready_is_killed_and_counts_as_an_exit():
    clock, dec = Clock(), FakeChild("decode-1", ready_after=10**9)  # hangs while it starts
    sup = Supervisor([dec], RestartPolicy(limit=2, base_s=0.5, start_timeout_s=30.0), None, clock=clock)
    dec.code = 1
    sup.tick()
    clock.t += 0.5
    sup.tick()
    w = sup.watches["decode-1"]
    assert w.state == "starting"
    clock.t += 29.0
    sup.tick()
    assert w.state == "starting"  # not yet
    clock.t += 1.5
    sup.tick()
    assert (w.state, w.streak) == ("backoff", 2) and "killed" in w.last_exit
    assert dec.code == -signal.SIGKILL
