"""A scrape of every service's Prometheus endpoint after a short run shows the issue's series, with
values that match the run: router, one prefill and one decode worker (tiny-llama) as processes."""

from __future__ import annotations

import asyncio
import time

import pytest

from distserve.client import AsyncClient
from distserve.errors import InvalidRequest, Unavailable
from distserve.state.redis_server import RedisServer
from tests.integration.service_procs import Cluster, names, scrape, total

pytestmark = pytest.mark.timeout(600)

N = 6  # requests sent
MAX_TOKENS = 8
BLOCKS = 256
WORKER = ["--model", "tiny-llama", "--num-blocks", str(BLOCKS), "--threads", "1", "--heartbeat-s", "0.2", "--ttl-s", "2",
          "--metrics-port", "0"]

ROUTER_SERIES = {
    "distserve_requests_total", "distserve_ttft_seconds_bucket", "distserve_tpot_seconds_bucket", "distserve_e2e_seconds_bucket",
    "distserve_disaggregation_decisions_total", "distserve_retries_total", "distserve_generated_tokens_total",
    "distserve_inflight_requests", "distserve_draining", "distserve_pool_workers", "distserve_pool_queue_depth",
    "distserve_pool_queued_tokens", "distserve_pool_running_requests", "distserve_pool_kv_blocks_free",
    "distserve_pool_kv_blocks_total", "distserve_info",
}
WORKER_SERIES = {
    "distserve_requests_total", "distserve_queue_depth", "distserve_queued_tokens", "distserve_running_requests",
    "distserve_kv_blocks_used", "distserve_kv_blocks_total", "distserve_queue_seconds_bucket", "distserve_inflight_requests",
    "distserve_draining", "distserve_generated_tokens_total", "distserve_info",
}
PREFILL_SERIES = WORKER_SERIES | {"distserve_kv_leases_held"}
DECODE_SERIES = WORKER_SERIES | {"distserve_kv_transfer_seconds_bucket", "distserve_kv_transfer_bytes_total",
                                 "distserve_disaggregation_decisions_total", "distserve_retries_total"}


def wait_for(fn, timeout_s: float = 10.0):
    """Polls fn() until it returns a truthy value (gauges follow the 0.2 s heartbeat)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_each_service_exports_the_named_series_with_values_matching_the_run(tmp_path):
    with RedisServer() as redis, Cluster(tmp_path) as c:
        common = ["--redis-url", redis.url]
        router = c.start("router", "router", [*common, "--model", "tiny-llama", "--port", "0", "--metrics-port", "0"])
        router.wait_ready()

        async def too_early():  # no worker has registered: refused as unavailable, not counted as invalid
            async with AsyncClient(router.address, max_failovers=0) as client:
                with pytest.raises(Unavailable, match="no worker serves model"):
                    await client.generate([5, 6], max_tokens=2)

        asyncio.run(too_early())
        prefill = c.start("prefill", "prefill", [*common, *WORKER, "--worker-id", "prefill-m"])
        decode = c.start("decode", "decode", [*common, *WORKER, "--worker-id", "decode-m"])
        for s in (prefill, decode, router):
            s.wait_ready()
            assert s.metrics_port, f"{s.name} printed no metrics port"

        def router_sees_both():  # READY is each worker's; the router learns of them at its next registry read
            s = scrape("127.0.0.1", router.metrics_port)
            return total(s, "distserve_pool_workers", role="prefill") == 1 and total(s, "distserve_pool_workers", role="decode") == 1

        # else a request can meet "no prefill worker is available", which the SDK retries and the router counts
        assert wait_for(router_sees_both), "the router never saw both workers"

        async def run():
            async with AsyncClient(router.address) as client:
                outs = await asyncio.gather(*(client.generate([3 + i] * (10 + 7 * i), max_tokens=MAX_TOKENS, temperature=0.0,
                                                              ignore_eos=True) for i in range(N)))
                with pytest.raises(InvalidRequest):
                    await client.generate([5, 6], max_tokens=0)
                return outs

        outs = asyncio.run(run())
        assert [len(o.token_ids) for o in outs] == [MAX_TOKENS] * N
        kv_bytes = sum(o.metrics.kv_bytes for o in outs)
        assert kv_bytes > 0

        r = scrape("127.0.0.1", router.metrics_port)
        assert ROUTER_SERIES <= names(r), ROUTER_SERIES - names(r)
        assert total(r, "distserve_requests_total", role="router", outcome="finished") == N
        assert total(r, "distserve_requests_total", role="router", outcome="rejected") == 1
        # each attempt of the channel's retry policy (rpc/channels.py) reached the router: at least one
        unavailable = total(r, "distserve_requests_total", role="router", outcome="unavailable")
        assert unavailable >= 1
        assert total(r, "distserve_requests_total", role="router") == N + 1 + unavailable  # nothing failed or cancelled
        for hist in ("distserve_ttft_seconds_count", "distserve_tpot_seconds_count", "distserve_e2e_seconds_count"):
            assert total(r, hist) == N, hist
        assert total(r, "distserve_ttft_seconds_sum") == pytest.approx(sum(o.metrics.ttft_s for o in outs), rel=1e-3)
        assert total(r, "distserve_e2e_seconds_sum") == pytest.approx(sum(o.metrics.e2e_s for o in outs), rel=1e-3)
        assert total(r, "distserve_generated_tokens_total", role="router") == N * MAX_TOKENS
        assert total(r, "distserve_disaggregation_decisions_total", decision="disaggregated") == N
        assert total(r, "distserve_disaggregation_decisions_total", decision="colocated") == 0
        assert total(r, "distserve_retries_total") == 0
        assert total(r, "distserve_inflight_requests", role="router") == 0
        assert total(r, "distserve_pool_workers", role="prefill") == 1 and total(r, "distserve_pool_workers", role="decode") == 1
        assert total(r, "distserve_pool_kv_blocks_total", role="decode") == BLOCKS

        def idle_prefill():
            s = scrape("127.0.0.1", prefill.metrics_port)
            return s if total(s, "distserve_kv_leases_held") == 0 and total(s, "distserve_kv_blocks_used") == 0 else None

        p = wait_for(idle_prefill)
        assert p, "prefill still holds KV after the run"
        assert PREFILL_SERIES <= names(p), PREFILL_SERIES - names(p)
        assert total(p, "distserve_requests_total", role="prefill", outcome="held") == N  # handed to decode
        assert total(p, "distserve_requests_total", role="prefill") == N
        assert total(p, "distserve_queue_seconds_count", role="prefill") == N
        assert total(p, "distserve_generated_tokens_total", role="prefill") == N  # the first token of each
        assert total(p, "distserve_kv_blocks_total", role="prefill") == BLOCKS
        assert total(p, "distserve_queue_depth", role="prefill") == 0 and total(p, "distserve_queued_tokens", role="prefill") == 0
        assert total(p, "distserve_info", role="prefill", model="tiny-llama", instance_id="prefill-m") == 1

        def idle_decode():  # the count follows the stream's end, which can come after the router's last token
            s = scrape("127.0.0.1", decode.metrics_port)
            idle = total(s, "distserve_kv_blocks_used") == 0 and total(s, "distserve_running_requests") == 0
            return s if idle and total(s, "distserve_requests_total", role="decode") == N else None

        d = wait_for(idle_decode)
        assert d, "decode still holds KV blocks after the run, or has not counted every request"
        assert DECODE_SERIES <= names(d), DECODE_SERIES - names(d)
        assert total(d, "distserve_requests_total", role="decode", outcome="finished") == N
        assert total(d, "distserve_requests_total", role="decode") == N
        assert total(d, "distserve_generated_tokens_total", role="decode") == N * (MAX_TOKENS - 1)
        by_transport = {}  # transport -> (pulls, bytes) as the responses report them
        for o in outs:
            n, b = by_transport.get(o.metrics.kv_transport, (0, 0))
            by_transport[o.metrics.kv_transport] = (n + 1, b + o.metrics.kv_bytes)
        for transport, (n, b) in by_transport.items():
            assert total(d, "distserve_kv_transfer_seconds_count", transport=transport) == n, transport
            assert total(d, "distserve_kv_transfer_bytes_total", transport=transport) == b, transport
        assert total(d, "distserve_kv_transfer_seconds_count") == N and total(d, "distserve_kv_transfer_bytes_total") == kv_bytes
        assert total(d, "distserve_disaggregation_decisions_total", decision="disaggregated") == N
        assert total(d, "distserve_queue_seconds_count", role="decode") == N
        assert total(d, "distserve_kv_blocks_total", role="decode") == BLOCKS
        assert total(d, "distserve_retries_total", leg="kv_pull") == 0
