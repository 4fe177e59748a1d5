"""`distserve up` as a supervisor, on real processes: a worker killed with SIGKILL comes back on its
port with the same id while `up` keeps running, and so does a killed Redis, on the same port; requests
complete again within a bounded time after each fault."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distserve.client import Client
from distserve.rpc.certs import role_files
from distserve.rpc.channels import internal_options, sync_channel
from distserve.rpc.tls import Tls
from distserve.state.registry import Registry
from distserve.up import UpProcess

pytestmark = pytest.mark.timeout(240)

RECOVERY_S = 60.0  # a fault until the next request succeeds, at most (a restart imports torch afresh)


def generate_ok(target: str, within_s: float, tls: dict[str, str]) -> int:
    """Requests until one completes; the number of attempts it took. Fails after within_s."""
    deadline = time.monotonic() + within_s
    attempts, last = 0, None
    with Client(target, timeout_s=10, **tls) as c:
        while time.monotonic() < deadline:
            attempts += 1
            try:
                out = c.generate("The quick brown fox", max_tokens=8, temperature=0.0, ignore_eos=True)
                assert len(out.token_ids) == 8 and out.finish_reason == "length", out
                return attempts
            except Exception as exc:  # the SDK's errors while the suite recovers; retried
                last = exc
                time.sleep(0.5)
    raise AssertionError(f"no request completed within {within_s:.0f}s ({attempts} attempts); last error: {last!r}")


def wait_for(what: str, check, within_s: float):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {within_s:.0f}s")


def serving(address: str, tls_dir: Path) -> bool:
    """Health of one process of the suite, asked with a router's certificate (workers want one)."""
    f = role_files(tls_dir, "router")
    tls = Tls.load(str(f.ca), str(f.cert), str(f.key))
    with sync_channel(address, tls, internal_options(tls)) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


async def live_worker_ids(url: str) -> set[str]:
    r = aioredis.from_url(url)
    try:
        return {w.info.worker_id for w in await Registry(r).live_workers()}
    finally:
        await r.aclose()


def redis_credentials_stay_out_of_argv_and_output(up: UpProcess) -> None:
    """Issue 13: up's Redis refuses a client without a password; each child logs in as its role's user
    with a URL that is not in its argv; the admin URL is in an owner-only file, not in up's output."""
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(up.redis_address, socket_timeout=2).ping()
    assert (up.logs / "redis-admin.url").stat().st_mode & 0o777 == 0o600
    assert urlsplit(up.redis_url).username == "admin" and urlsplit(up.redis_url).password not in up.out.read_text()
    for name, st in up.status().items():
        if name != "redis":
            assert b"@" not in Path(f"/proc/{st['pid']}/cmdline").read_bytes(), name
    clients = redis.Redis.from_url(up.redis_url, socket_timeout=2).client_list()
    users = {(c["name"], c["user"]) for c in clients if c["name"].startswith("distserve-")}
    assert users == {("distserve-prefill", "prefill"), ("distserve-decode", "decode"), ("distserve-router", "router")}, users


def test_up_restarts_a_killed_decode_worker_and_a_killed_redis_and_keeps_serving(tmp_path):
    up = UpProcess(tmp_path, "--model", "tiny-llama", "--prefill", "1", "--decode", "1", "--restart-limit", "3",
                   "--worker-arg=--num-blocks=128", "--worker-arg=--ttl-s=2", "--worker-arg=--heartbeat-s=0.25",
                   timeout_s=120)
    ok = False
    try:
        assert up.targets == [up.target]
        assert generate_ok(up.target, 30, up.client_tls) == 1  # the suite serves before any fault
        redis_credentials_stay_out_of_argv_and_output(up)

        # kill -9 the decode worker: `up` stays, the worker comes back on its port, requests complete
        before = up.status()["decode-1"]
        assert before["state"] == "serving" and before["restarts"] == 0
        os.kill(before["pid"], signal.SIGKILL)
        after = wait_for("decode-1 back and SERVING", lambda: (s := up.status()["decode-1"])["state"] == "serving"
                         and s["restarts"] == 1 and s, RECOVERY_S)
        assert up.proc.poll() is None, "distserve up stopped when a worker died"
        assert after["pid"] != before["pid"] and after["address"] == before["address"]
        assert after["last_exit"] == "signal SIGKILL"
        assert serving(after["address"], up.tls_dir)
        generate_ok(up.target, RECOVERY_S, up.client_tls)
        assert up.status()["prefill-1"]["restarts"] == 0 and up.status()["router"]["restarts"] == 0

        # kill -9 Redis: restarted on the same port, the workers re-register, requests complete again
        r0 = up.status()["redis"]
        os.kill(r0["pid"], signal.SIGKILL)
        r1 = wait_for("redis back", lambda: (s := up.status()["redis"])["state"] == "serving" and s["restarts"] == 1
                      and s, 15)
        assert r1["pid"] != r0["pid"] and r1["address"] == r0["address"] == up.redis_address
        assert redis.Redis.from_url(up.redis_url, socket_timeout=2).ping()
        wait_for("both workers re-registered in the new Redis",
                 lambda: asyncio.run(live_worker_ids(up.redis_url)) >= {"prefill-1", "decode-1"}, 10)
        generate_ok(up.target, 30, up.client_tls)
        assert up.proc.poll() is None
        ok = True
    finally:
        if not ok:
            up.dump()
        code = up.stop()
    out = up.out.read_text()
    assert code == 0, out
    assert "restart 1 of 3" in out and "restarts: redis 1, prefill-1 0, decode-1 1, router 0" in out, out
    assert up.status()["decode-1"]["state"] == "stopped"


def test_up_runs_several_routers_and_ends_with_code_1_when_none_is_left(tmp_path):
    up = UpProcess(tmp_path, "--model", "tiny-llama", "--prefill", "0", "--decode", "0", "--colocated", "1",
                   "--routers", "2", "--restart-limit", "0", "--worker-arg=--num-blocks=64", timeout_s=120)
    ok = False
    try:
        assert len(up.targets) == 2 and up.targets[0] == up.target
        for target in up.targets:
            generate_ok(target, 30, up.client_tls)
        st = up.status()
        assert st["router-2"]["address"] == up.targets[1]
        os.kill(st["router-2"]["pid"], signal.SIGKILL)  # limit 0: left down, the other router serves on
        wait_for("router-2 failed", lambda: up.status()["router-2"]["state"] == "failed", 10)
        assert up.proc.poll() is None
        generate_ok(up.target, 10, up.client_tls)
        os.kill(st["router"]["pid"], signal.SIGKILL)  # no router left: up stops the suite, code 1
        assert up.proc.wait(timeout=60) == 1
        ok = True
    finally:
        if not ok:
            up.dump()
        up.stop()
    assert "no router left" in up.out.read_text()
    assert {s["state"] for s in up.status().values()} == {"failed", "stopped"}
