"""TLS and mutual TLS between real processes (Redis, a prefill, a decode worker and a router on
tiny-llama, each with its role's certificate from `distserve certs`): clients reach the router only over
TLS; a worker refuses callers without a certificate of the suite's CA (the handshake fails), and
callers of the wrong role (PERMISSION_DENIED); a decode worker never dials a KV address that no
registered prefill worker owns."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from distserve.client import Client
from distserve.errors import Unavailable
from distserve.kv.handle import KvHandle
from distserve.rpc.certs import make_certs, role_files
from distserve.rpc.channels import internal_options, sync_channel
from distserve.rpc.tls import Tls
from distserve.state.redis_server import RedisServer
from distserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, kv_pb2, kv_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.integration.service_procs import Cluster

pytestmark = pytest.mark.timeout(300)


def tls_of(certs: Path, role: str | None) -> Tls:
    if role is None:  # a client with the CA only
        return Tls.load(str(certs / "ca.pem"))
    f = role_files(certs, role)
    return Tls.load(str(f.ca), str(f.cert), str(f.key))


def call(address: str, tls: Tls | None, method: str):
    """What one call of `method` (prefill, decode, pull, release) gets: the response, or the failed call's status code."""
    with sync_channel(address, tls, internal_options(tls)) as ch:
        try:
            if method == "prefill":
                req = prefill_pb2.PrefillRequest(request_id="probe", token_ids=[5, 6, 7], params=common_pb2.SamplingParams(max_tokens=4))
                return prefill_pb2_grpc.PrefillStub(ch).Prefill(req, timeout=20)
            if method == "decode":
                req = decode_pb2.DecodeRequest(request_id="probe", prompt_token_ids=[5, 6, 7], params=common_pb2.SamplingParams(max_tokens=2))
                return list(decode_pb2_grpc.DecodeStub(ch).Decode(req, timeout=20))
            if method == "release":
                req = kv_pb2.ReleaseKvRequest(request_id="probe", transfer_token=b"x" * 16)
                return kv_pb2_grpc.KvTransferStub(ch).Release(req, timeout=20)
            req = kv_pb2.PullKvRequest(request_id="probe", transfer_token=b"x" * 16)
            return list(kv_pb2_grpc.KvTransferStub(ch).Pull(req, timeout=20))
        except grpc.RpcError as exc:
            return exc.code()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    certs = make_certs(tmp / "certs")
    other_ca = make_certs(tmp / "other")  # the same roles, signed by a CA the suite does not trust
    with RedisServer() as redis, Cluster(tmp) as cluster:
        common = ["--model", "tiny-llama", "--redis-url", redis.url, "--port", "0"]
        procs = {}
        for role in ("prefill", "decode", "router"):
            extra = ["--http-port", "0"] if role == "router" else ["--threads", "1"]
            procs[role] = cluster.start(role, role, [*common, *extra], env=role_files(certs, role).env())
        for p in procs.values():
            p.wait_ready()
        yield certs, other_ca, procs


def test_clients_reach_the_router_over_tls_only(suite):
    certs, other_ca, procs = suite
    router = procs["router"]
    with Client(router.address, timeout_s=60, tls_ca=str(certs / "ca.pem")) as c:
        out = c.generate([5, 6, 7, 8], max_tokens=6, temperature=0.0, ignore_eos=True)
    assert len(out.token_ids) == 6 and out.metrics.kv_bytes > 0  # prefill -> KV over mTLS -> decode
    with Client(router.address, timeout_s=10, tls_ca="", max_failovers=0) as c, pytest.raises(Unavailable):
        c.generate([5, 6, 7], max_tokens=2)  # plaintext against a TLS port: the handshake fails
    with Client(router.address, timeout_s=10, tls_ca=str(other_ca / "ca.pem"), max_failovers=0) as c, pytest.raises(Unavailable):
        c.generate([5, 6, 7], max_tokens=2)  # a router whose certificate the client's CA did not sign
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    body = json.dumps({"model": "tiny-llama", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}).encode()
    req = urllib.request.Request(f"https://127.0.0.1:{router.http_port}/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=60) as r:
        assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 3
    with pytest.raises(Exception):  # plain HTTP to the HTTPS port
        urllib.request.urlopen(f"http://127.0.0.1:{router.http_port}/v1/models", timeout=10)


@pytest.mark.parametrize("method, worker", [("prefill", "prefill"), ("pull", "prefill"), ("decode", "decode")])
def test_worker_rpcs_need_a_certificate_of_the_suites_ca(suite, method, worker):
    certs, other_ca, procs = suite
    address = procs[worker].address
    assert call(address, None, method) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert call(address, tls_of(certs, None), method) == grpc.StatusCode.UNAVAILABLE  # TLS, no client certificate
    assert call(address, tls_of(other_ca, "router"), method) == grpc.StatusCode.UNAVAILABLE  # another CA's router


@pytest.mark.parametrize("method, worker, allowed", [
    ("prefill", "prefill", {"router"}),
    ("pull", "prefill", {"decode", "colocated"}),
    ("release", "prefill", {"decode", "colocated", "router"}),  # routers free the KV of requests whose clients left
    ("decode", "decode", {"router"}),
])
def test_each_worker_rpc_admits_only_its_callers_roles(suite, method, worker, allowed):
    certs, _, procs = suite
    for role in ("router", "prefill", "decode", "colocated", "client"):
        got = call(procs[worker].address, tls_of(certs, role), method)
        if role in allowed:
            assert got != grpc.StatusCode.PERMISSION_DENIED, role  # served (a probe: NOT_FOUND for a pull is fine)
            assert got not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED), role
        else:
            assert got == grpc.StatusCode.PERMISSION_DENIED, role


def test_health_probes_work_with_the_roles_own_certificate(suite):
    certs, _, procs = suite
    for role in ("prefill", "decode", "router"):
        f = role_files(certs, role)
        done = subprocess.run([sys.executable, "-m", "distserve.cli", "health", "--target", procs[role].address,
                               "--tls-ca", str(f.ca), "--tls-cert", str(f.cert), "--tls-key", str(f.key)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "SERVING" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "distserve.cli", "health", "--target", procs["decode"].address],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "DISTSERVE_TLS_CA": ""})
    assert done.returncode == 1 and "UNAVAILABLE" in done.stdout


def test_decode_dials_only_registered_prefill_workers(suite):
    certs, _, procs = suite
    router = tls_of(certs, "router")
    with sync_channel(procs["prefill"].address, router, internal_options(router)) as ch:
        req = prefill_pb2.PrefillRequest(request_id="ssrf-probe", token_ids=[5, 6, 7, 8, 9],
                                         params=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True))
        held = prefill_pb2_grpc.PrefillStub(ch).Prefill(req, timeout=30)
    handle = KvHandle.from_proto(held.kv_handle)
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.settimeout(1.0)
    try:
        bent = {
            "an unregistered address": handle.to_proto(),
            "an unregistered holder": handle.to_proto(),
            "a store endpoint on another host": handle.to_proto(),
        }
        bent["an unregistered address"].kv_address = f"127.0.0.1:{trap.getsockname()[1]}"
        bent["an unregistered holder"].worker_id = "prefill-nobody"
        bent["a store endpoint on another host"].transport_params["gloo"] = f"10.255.255.1:{trap.getsockname()[1]}"
        with sync_channel(procs["decode"].address, router, internal_options(router)) as ch:
            stub = decode_pb2_grpc.DecodeStub(ch)
            for what, kv in bent.items():
                req = decode_pb2.DecodeRequest(request_id=f"ssrf-{len(what)}", prompt_token_ids=[5, 6, 7, 8, 9],
                                               first_token=held.first_token, kv_handle=kv,
                                               params=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True))
                with pytest.raises(grpc.RpcError) as refused:
                    list(stub.Decode(req, timeout=20))
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, what
                assert "registered prefill workers" in refused.value.details()
            with pytest.raises(TimeoutError):
                trap.accept()  # nobody dialed the address the requests named
            ok = decode_pb2.DecodeRequest(request_id="ssrf-probe", prompt_token_ids=[5, 6, 7, 8, 9], first_token=held.first_token,
                                          kv_handle=held.kv_handle, params=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True))
            tokens = [t for m in stub.Decode(ok, timeout=60) for t in m.token_ids]
        assert len(tokens) == 3  # the genuine handle still decodes (first token came from prefill)
    finally:
        trap.close()


def test_a_worker_with_unreadable_tls_files_does_not_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "distserve.cli", "serve", "decode", "--model", "tiny-llama",
                           "--tls-ca", "/nonexistent/ca.pem"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "tls_" in done.stderr, done.stderr
