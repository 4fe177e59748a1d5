"""A router, started for real and serving requests over gRPC and HTTP, never imports torch
(issue 16): its interpreter reports every import (`PYTHONPROFILEIMPORTTIME`) into its log, and
/proc shows which shared libraries it mapped. The workers beside it do load torch, and the same
two checks see it there."""

import asyncio
import json
import urllib.request

from distserve.client import AsyncClient
from distserve.state.redis_server import RedisServer
from tests.integration.service_procs import Cluster

WORKER = ["--model", "tiny-llama", "--num-blocks", "64", "--threads", "1", "--heartbeat-s", "0.2", "--ttl-s", "2", "--metrics-port", "-1"]
IMPORTS = {"PYTHONPROFILEIMPORTTIME": "1"}


def imported(log: str) -> set[str]:
    """Top-level packages a process imported, from `-X importtime` lines in its log."""
    out = set()
    for line in log.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            out.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return out


def mapped(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_a_serving_router_never_loads_torch(tmp_path):
    with RedisServer() as redis, Cluster(tmp_path) as c:
        common = ["--redis-url", redis.url]
        prefill = c.start("prefill", "prefill", [*common, *WORKER], env=IMPORTS)
        decode = c.start("decode", "decode", [*common, *WORKER], env=IMPORTS)
        router = c.start("router", "router", [*common, "--model", "tiny-llama", "--port", "0", "--metrics-port", "0",
                                              "--http-port", "0"], env=IMPORTS)
        for s in (prefill, decode, router):
            s.wait_ready()

        async def run():
            async with AsyncClient(router.address) as client:
                text = await client.generate("Hello there", max_tokens=6, temperature=0.0, ignore_eos=True, stop=["zz"])
                ids = await client.generate([5, 6, 7, 8], max_tokens=4, temperature=0.0, ignore_eos=True)
                return text, ids

        text, ids = asyncio.run(run())
        assert len(text.token_ids) == 6 and len(ids.token_ids) == 4 and text.metrics.kv_bytes > 0  # both legs, KV moved
        body = json.dumps({"model": "tiny-llama", "prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{router.http_port}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 3

        routed = imported(router.text())
        assert "grpc" in routed and "tokenizers" in routed  # the probe reads the log
        assert not routed & {"torch", "transformers", "numpy"}, routed & {"torch", "transformers", "numpy"}
        assert "libtorch" not in mapped(router.popen.pid)
        worker = imported(prefill.text())
        assert "torch" in worker and "libtorch" in mapped(prefill.popen.pid)  # the checks do see torch where it is
