"""Multi-host: Redis, the router, two prefill and two decode workers (tiny-llama), each in its own
network namespace with its own address on one bridge (10.77.0.0/24), as compose gives each container
one. Requests succeed across hosts, a decode worker added later receives traffic, and workers drained
with SIGTERM finish every request they hold while new ones go elsewhere; the router's metrics count
exactly the requests sent.

Needs root and `ip netns`; everything made here (namespaces, veths, the bridge, the addresses) lives
inside namespaces this test creates and deletes. The client runs in a namespace of its own too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distserve.state.redis_server import find_redis_server
from tests.integration.netns import Net, require_netns
from tests.integration.service_procs import Cluster

pytestmark = pytest.mark.timeout(420)

SUBNET = "10.77.0"
METRICS_PORT = 9400
WORKER_PORT = 50061
ROUTER_PORT = 50051
TAG = f"ds{os.getpid() % 100000}"

# Runs in the client namespace: `gen N MAX_TOKENS PROMPT_LEN` sends N concurrent streams and prints
# STREAMING once every stream has two tokens, then one JSON line of results; `scrape HOST` prints
# the samples of HOST's metrics endpoint as JSON.
CLIENT = r"""
import asyncio, json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
from distserve.client import AsyncClient

async def gen(target, n, max_tokens, prompt_len):
    started = asyncio.Event()
    ready = 0
    async def one(i, c):
        nonlocal ready
        toks, last = 0, None
        async for ch in c.stream([3 + i % 200] * prompt_len, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
            toks += len(ch.token_ids)
            if toks >= 2 and toks - len(ch.token_ids) < 2:
                ready += 1
                if ready == n:
                    print("STREAMING", flush=True)
            last = ch
        m = last.metrics
        return {"tokens": toks, "finish": last.finish_reason, "prefill": m.prefill_worker, "decode": m.decode_worker}
    async with AsyncClient(target) as c:
        outs = await asyncio.gather(*(one(i, c) for i in range(n)), return_exceptions=True)
    print(json.dumps([o if isinstance(o, dict) else {"error": repr(o)} for o in outs]), flush=True)

if sys.argv[1] == "gen":
    asyncio.run(gen(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
else:
    text = urllib.request.urlopen(f"http://{sys.argv[2]}/metrics", timeout=5).read().decode()
    print(json.dumps([[s.name, s.labels, s.value] for f in text_string_to_metric_families(text) for s in f.samples]))
"""


@pytest.fixture
def net():
    require_netns()
    try:
        n = Net(TAG, SUBNET)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.decode(errors='replace').strip()}")
    try:
        yield n
    finally:
        n.close()


def client(net: Net, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", net.hosts["client"], sys.executable, "-c", CLIENT, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])


def results(p: subprocess.Popen, timeout_s: float = 120.0) -> list[dict]:
    out, err = p.communicate(timeout=timeout_s)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def generate(net: Net, n: int, max_tokens: int, prompt_len: int = 24) -> list[dict]:
    return results(client(net, "gen", f"{SUBNET}.3:{ROUTER_PORT}", str(n), str(max_tokens), str(prompt_len)))


def wait_streaming(p: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if line.strip() == "STREAMING":
            return
        if not line and p.poll() is not None:
            raise AssertionError(f"client ended early: {p.stderr.read()[-3000:]}")
    raise AssertionError("streams did not start")


def scrape(net: Net, host: str) -> list:
    return results(subprocess.Popen(["ip", "netns", "exec", net.hosts["client"], sys.executable, "-c", CLIENT, "scrape", f"{host}:{METRICS_PORT}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 30)


def total(samples, name: str, **labels) -> float:
    return sum(v for n, lb, v in samples if n == name and all(lb.get(k) == x for k, x in labels.items()))


def test_suite_across_namespaces_scales_out_and_drains(net, tmp_path):
    addr = {"redis": 2, "router": 3, "prefill-1": 11, "prefill-2": 12, "decode-1": 21, "decode-2": 22, "decode-3": 23, "client": 100}
    for name, octet in addr.items():
        net.host(name, octet)
    redis_url = f"redis://{SUBNET}.2:6379/0"
    worker = ["--model", "tiny-llama", "--host", "0.0.0.0", "--port", str(WORKER_PORT), "--metrics-port", str(METRICS_PORT),
              "--redis-url", redis_url, "--threads", "1", "--num-blocks", "512", "--heartbeat-s", "0.25", "--ttl-s", "2",
              "--drain-s", "60"]

    with Cluster(tmp_path) as c:
        redis = subprocess.Popen(["ip", "netns", "exec", net.hosts["redis"], find_redis_server(), "--bind", f"{SUBNET}.2",
                                  "--port", "6379", "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def start(name: str):
                role = name.split("-")[0]
                return c.start(name, role, [*worker, "--worker-id", name, "--advertise-host", f"{SUBNET}.{addr[name]}"],
                               netns=net.hosts[name])

            workers = {n: start(n) for n in ("prefill-1", "prefill-2", "decode-1", "decode-2")}
            router = c.start("router", "router", ["--model", "tiny-llama", "--host", "0.0.0.0", "--port", str(ROUTER_PORT),
                                                  "--metrics-port", str(METRICS_PORT), "--redis-url", redis_url], netns=net.hosts["router"])
            for s in (*workers.values(), router):
                s.wait_ready()
            for name, s in workers.items():
                assert s.address == f"{SUBNET}.{addr[name]}:{WORKER_PORT}" and s.metrics_port == METRICS_PORT
            sent = 0

            # 1. requests succeed across hosts and use both pools
            outs = generate(net, 12, 8)
            sent += 12
            assert all(o.get("tokens") == 8 and o["finish"] == "length" for o in outs), outs
            assert {o["prefill"] for o in outs} == {"prefill-1", "prefill-2"}
            assert {o["decode"] for o in outs} == {"decode-1", "decode-2"}

            # 2. a decode worker started later receives traffic
            workers["decode-3"] = start("decode-3").wait_ready()
            time.sleep(0.5)  # longer than the router's registry refresh (0.2 s)
            outs = generate(net, 12, 8)
            sent += 12
            assert all(o.get("tokens") == 8 for o in outs), outs
            assert "decode-3" in {o["decode"] for o in outs}

            # 3. SIGTERM to a decode worker in the middle of long streams: its streams finish, new requests avoid it
            long = client(net, "gen", f"{SUBNET}.3:{ROUTER_PORT}", "9", "600", "24")
            wait_streaming(long)
            # the router spreads the streams by load, not by name: stop a worker that holds some
            decodes = ("decode-1", "decode-2", "decode-3")
            scrapes = [subprocess.Popen(["ip", "netns", "exec", net.hosts["client"], sys.executable, "-c", CLIENT, "scrape",
                                         f"{SUBNET}.{addr[n]}:{METRICS_PORT}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                       for n in decodes]
            held = {n: total(results(p, 30), "distserve_inflight_requests", role="decode") for n, p in zip(decodes, scrapes)}
            victim = max(held, key=held.get)
            assert held[victim] >= 1, held
            workers[victim].terminate()
            t_term = time.monotonic()
            during = generate(net, 6, 8)
            sent += 6 + 9
            assert all(o.get("tokens") == 8 for o in during), during
            assert victim not in {o["decode"] for o in during}
            outs = results(long)
            assert all(o.get("tokens") == 600 and o["finish"] == "length" for o in outs), outs
            assert sum(o["decode"] == victim for o in outs) >= 1  # it did hold streams when it was told to stop
            assert workers[victim].wait(60) == 0
            assert time.monotonic() - t_term < 60

            # 4. the same for a prefill worker while a burst is being prefilled and handed over
            burst = client(net, "gen", f"{SUBNET}.3:{ROUTER_PORT}", "16", "24", "200")
            wait_streaming(burst)
            workers["prefill-1"].terminate()
            outs = results(burst)
            sent += 16
            assert all(o.get("tokens") == 24 and o["finish"] == "length" for o in outs), outs
            assert workers["prefill-1"].wait(60) == 0
            after = generate(net, 6, 4)
            sent += 6
            assert {o["prefill"] for o in after} == {"prefill-2"} and all(o.get("tokens") == 4 for o in after), after

            # 5. the router's metrics count exactly what was sent; live workers export their series
            r = scrape(net, f"{SUBNET}.3")
            assert total(r, "distserve_requests_total", role="router", outcome="finished") == sent
            assert total(r, "distserve_requests_total", role="router") == sent
            assert total(r, "distserve_ttft_seconds_count") == sent
            assert total(r, "distserve_pool_workers", role="decode") == 2 and total(r, "distserve_pool_workers", role="prefill") == 1
            d = scrape(net, f"{SUBNET}.{addr['decode-3' if victim != 'decode-3' else 'decode-2']}")  # a live one
            assert total(d, "distserve_requests_total", role="decode", outcome="finished") >= 1
            assert total(d, "distserve_kv_transfer_bytes_total") > 0 and total(d, "distserve_kv_transfer_seconds_count") >= 1
        finally:
            redis.terminate()
            redis.wait(10)
