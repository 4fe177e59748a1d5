"""A worker answers on its port from the moment it starts: health NOT_SERVING while it loads its model
(here: while it waits for a native kernel another process compiles, as a second worker on a fresh
machine does), its role's calls UNAVAILABLE, then SERVING once loaded and warm."""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distserve.engine import kernels
from distserve.engine.kernels.cache import BuildLock, Spec, target
from distserve.engine.kernels.variants import by_name
from distserve.state.redis_server import RedisServer, free_port
from distserve.v1 import decode_pb2, decode_pb2_grpc
from tests.integration.service_procs import Cluster

pytestmark = pytest.mark.timeout(240)


def health(address: str) -> int | None:
    """The worker's overall health status, None while nothing answers on its port."""
    with grpc.insecure_channel(address) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise


def test_health_is_not_serving_while_a_kernel_builds_then_serving(tmp_path, monkeypatch):
    if kernels.paged_attention() is None:  # builds it in the usual cache when none is there yet
        pytest.skip("no native kernel here (no C++ compiler)")
    built = kernels.status()["paged_attention"]
    # a fresh home whose paged_attention build "another process" (this test) holds the lock of
    home = tmp_path / "home"
    monkeypatch.setenv("DISTSERVE_HOME", str(home))
    monkeypatch.setenv("DISTSERVE_KERNEL_VARIANT", built.variant)
    monkeypatch.delenv("DISTSERVE_KERNELS_DIR", raising=False)
    spec = Spec("paged_attention", kernels.source("paged_attention"), by_name(built.variant))
    final = target(spec, home / "kernels")
    final.parent.mkdir(parents=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    with ExitStack() as held:  # the build lock, let go of in the middle of the test
        assert held.enter_context(BuildLock(final.with_name(final.name + ".lock"), 0)).held
        with RedisServer() as redis, Cluster(tmp_path) as c:
            worker = c.start("decode", "decode", ["--redis-url", redis.url, "--model", "tiny-llama", "--num-blocks", "64",
                                                  "--threads", "1", "--port", str(port), "--worker-id", "decode-s"])
            deadline = time.monotonic() + 120
            while (status := health(address)) is None:
                assert worker.popen.poll() is None, worker.text()
                assert time.monotonic() < deadline, "the worker's port never answered"
                time.sleep(0.2)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            while "which is compiling native kernel paged_attention" not in worker.text():
                assert time.monotonic() < deadline, worker.text()
                time.sleep(0.2)
            assert health(address) == health_pb2.HealthCheckResponse.NOT_SERVING  # still, while it waits
            with grpc.insecure_channel(address) as ch:
                with pytest.raises(grpc.RpcError) as err:
                    list(decode_pb2_grpc.DecodeStub(ch).Decode(decode_pb2.DecodeRequest(request_id="r"), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "still starting" in err.value.details()
            assert "READY" not in worker.text()

            shutil.copytree(Path(built.where).parent, final)  # "the other process" finishes its build...
            held.close()  # ...and lets go of the lock
            worker.wait_ready(120)
            assert health(address) == health_pb2.HealthCheckResponse.SERVING
            assert "compiled native kernel" not in worker.text()  # it took the finished build
