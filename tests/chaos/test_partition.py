"""Issue 11's partition fault: decode-1 cut off from both prefill workers while it pulls KV, then healed.

Every host has its own network namespace and address on one bridge (10.77.1.0/24, the pattern of
tests/e2e/test_netns.py): Redis, two routers, prefill-1/2, decode-1/2 and the load's
client. The KV goes over gRPC (`--kv-transport grpc`): in namespaces of one machine the workers would
otherwise pick shared memory, which no network partition touches.

Only decode-1 <-> prefill-1/2 is cut: decode-1 still reaches the routers and Redis, so it keeps
heartbeating and being picked, and its pulls fail or hang - the case lost-KV re-prefill and outlier
ejection are for. decode-2 stays whole, so a worker of each role survives and >= 95% must complete.
The cut is iptables DROP inside the namespaces where iptables exists, else blackhole routes (iproute2
only): both drop what decode-1 and the prefill workers send each other and touch nothing outside the
namespaces this test creates.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from distserve.state.redis_server import find_redis_server
from tests.chaos.harness import DECODE_BLOCKS, WORKER_FLAGS, LoadRun, assert_targets, classify, record, run_reference, workload
from tests.integration.netns import Net, require_netns
from tests.integration.service_procs import Cluster

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

SUBNET = "10.77.1"
PORT = 50061
TAG = f"dc{os.getpid() % 100000}"
PARTITION_S = 8.0
ADDR = {"redis": 2, "router-a": 3, "router-b": 4, "prefill-1": 11, "prefill-2": 12, "decode-1": 21, "decode-2": 22, "client": 100}


def cut(net: Net, a: str, b: str, on: bool) -> None:
    """Drop what host a sends to host b (on=True) or stop dropping it (on=False)."""
    net.cut(a, f"{SUBNET}.{ADDR[b]}", on)


@pytest.fixture
def net():
    require_netns()
    n = None
    try:
        n = Net(TAG, SUBNET)
        for name, octet in ADDR.items():
            n.host(name, octet)
        # the partition tool must work here before the suite is started for it
        cut(n, "decode-1", "prefill-1", True)
        cut(n, "decode-1", "prefill-1", False)
    except subprocess.CalledProcessError as exc:
        if n is not None:
            n.close()
        pytest.skip(f"cannot make namespaces or drop traffic between them here: {exc.stderr.decode(errors='replace').strip()}")
    try:
        yield n
    finally:
        n.close()


def test_partition_prefill_decode_during_pull(net, tmp_path):
    redis_url = f"redis://{SUBNET}.{ADDR['redis']}:6379/0"
    targets = [f"{SUBNET}.{ADDR[r]}:{PORT}" for r in ("router-a", "router-b")]
    with Cluster(tmp_path) as c:
        redis = subprocess.Popen(["ip", "netns", "exec", net.hosts["redis"], find_redis_server(), "--bind", f"{SUBNET}.{ADDR['redis']}",
                                  "--port", "6379", "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for name in ("prefill-1", "prefill-2", "decode-1", "decode-2"):
                role = name.split("-")[0]
                extra = ["--num-blocks", str(DECODE_BLOCKS)] if role == "decode" else []
                c.start(name, role, [*WORKER_FLAGS, *extra, "--kv-transport", "grpc", "--host", "0.0.0.0", "--port", str(PORT),
                                     "--advertise-host", f"{SUBNET}.{ADDR[name]}", "--redis-url", redis_url, "--worker-id", name,
                                     "--metrics-port", "-1"], netns=net.hosts[name])
            for r in ("router-a", "router-b"):
                c.start(r, "router", ["--model", "tiny-llama", "--host", "0.0.0.0", "--port", str(PORT), "--metrics-port", "-1",
                                      "--redis-url", redis_url, "--drain-s", "5"], netns=net.hosts[r])
            for s in c.services:
                s.wait_ready(180)
            time.sleep(2.0)  # every worker has heartbeated into the registry the routers read
            wl = workload()
            ref = run_reference(targets, wl, netns=net.hosts["client"])

            run = LoadRun(targets, wl, ref, netns=net.hosts["client"])
            # pulls run from the first prefilled request until the burst's last admission: cut early
            run.wait_for(lambda r: r.first >= 2, 60, "first tokens")
            pairs = [(a, b) for p in ("prefill-1", "prefill-2") for a, b in (("decode-1", p), (p, "decode-1"))]
            for a, b in pairs:
                cut(net, a, b, True)
            run.fault()
            time.sleep(PARTITION_S)
            for a, b in pairs:
                cut(net, a, b, False)
            result = run.finish()
        finally:  # a cut left in place goes with the namespaces, which the fixture deletes
            if "run" in locals() and run.popen.poll() is None:
                run.popen.kill()
            redis.terminate()
            redis.wait(10)
        out = classify("prefill<->decode partition", result, ref, wl)
        sdk = result.get("sdk_targets")
        out.note = f"decode-1 cut from prefill-1/2 for {PARTITION_S:.0f} s" + (f"; SDK used {sdk} of 2 routers" if sdk != 2 else "")
        if result.get("recovery_s") is None:
            out.note += f"; no probe succeeded ({result.get('probes', 0)} probes, last error: {result.get('last_probe_error')})"
        record(out)
        if out.lost or out.completed < 0.95 * out.total:
            c.dump()
        assert_targets(out)
