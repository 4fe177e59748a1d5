"""API keys on the router (real processes: Redis, a colocated tiny-llama worker, a router with keys):
no key or a wrong key is refused (UNAUTHENTICATED on gRPC, 401 on HTTP), a known key - given inline or
by its hash in the key file - is served, and health stays open for probes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distserve.client import Client
from distserve.errors import Unauthenticated
from distserve.rpc.auth import ApiKeys
from distserve.state.redis_server import RedisServer
from tests.integration.service_procs import Cluster

pytestmark = pytest.mark.timeout(180)


def test_key_file_lines_inline_keys_and_hashes(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# operators' keys\nalpha   # first\n\nsha256:" + hashlib.sha256(b"beta").hexdigest() + "\n")
    keys = ApiKeys.load(str(f), "gamma, delta")
    assert len(keys) == 4
    for k in ("alpha", "beta", "gamma", "delta"):
        assert keys.allows(f"Bearer {k}") and keys.allows(f"bearer  {k} ")
    for bad in (None, "", "Bearer", "Bearer wrong", "Basic alpha", "alpha"):
        assert not keys.allows(bad)
    assert ApiKeys().allows(None)  # no keys set: nothing is checked
    (tmp_path / "bad").write_text("sha256:abc\n")
    with pytest.raises(Exception, match="api_keys_file: line 1"):
        ApiKeys.load(str(tmp_path / "bad"))


def test_a_router_with_an_unreadable_key_file_does_not_start():
    done = subprocess.run([sys.executable, "-m", "distserve.cli", "serve", "router", "--model", "tiny-llama",
                           "--api-keys-file", "/nonexistent/keys"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "api_keys_file" in done.stderr


def _http(url: str, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_keys_are_required_on_grpc_and_http_and_health_stays_open(tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("sha256:" + hashlib.sha256(b"from-file").hexdigest() + "\n")
    with RedisServer() as redis, Cluster(tmp_path) as cluster:
        common = ["--model", "tiny-llama", "--redis-url", redis.url, "--port", "0"]
        worker = cluster.start("colocated", "colocated", [*common, "--threads", "1"])
        router = cluster.start("router", "router", [*common, "--api-keys-file", str(keyfile), "--http-port", "0"],
                               env={"DISTSERVE_API_KEYS": "inline-key"})
        worker.wait_ready()
        router.wait_ready()
        for key in (None, "wrong"):
            with Client(router.address, timeout_s=30, api_key=key or "") as c, pytest.raises(Unauthenticated) as refused:
                c.generate([5, 6, 7], max_tokens=2, temperature=0.0)
            assert refused.value.grpc_code == grpc.StatusCode.UNAUTHENTICATED
        for key in ("inline-key", "from-file"):
            with Client(router.address, timeout_s=60, api_key=key) as c:
                assert len(c.generate([5, 6, 7], max_tokens=2, temperature=0.0, ignore_eos=True).token_ids) == 2
                assert c.models()[0].name == "tiny-llama"
        with grpc.insecure_channel(router.address) as ch:  # probes need no key
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        base = f"http://127.0.0.1:{router.http_port}"
        code, body = _http(base + "/v1/models")
        assert code == 401 and body["error"]["type"] == "authentication_error"
        assert _http(base + "/v1/models", "wrong")[0] == 401
        code, body = _http(base + "/v1/models", "from-file")
        assert code == 200 and body["data"][0]["id"] == "tiny-llama"
        assert _http(base + "/health")[0] == 200
