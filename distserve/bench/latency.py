"""`distserve bench latency`: where a request's time goes, and what the router adds.

1. Breakdown: a batch of concurrent requests on the real model; for each phase of the paper's
   latency breakdown (router, prefill queue, prefill compute, KV transfer, decode queue, decode) the
   mean seconds and share of end-to-end latency, and the KV transfer share per request.
2. Router overhead: the same short prompt sent alternately through the router (max_tokens=1, so only
   the prefill leg runs) and straight to a prefill worker's Prefill RPC; the paired differences of
   the two latencies are the router's added latency (p50, p90).
3. HTTP overhead (with --http-url, or when it starts its own suite): the same prompt's first token
   alternately over gRPC and over the OpenAI API (streaming /v1/completions, a new connection each
   time, as the load generator sends them); the paired differences are what HTTP adds (p50, p90).

Without --target it starts its own suite with `distserve up` (1 prefill + 1 decode; TLS as `--tls` says)
and stops it after. Against a suite with TLS, --tls-ca/--tls-cert/--tls-key name a router's certificate
(the direct Prefill calls need the router role).
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from distserve.client import AsyncClient
from distserve.kv.release import LeaseClient
from distserve.rpc.channels import ChannelPool
from distserve.rpc.tls import Tls
from distserve.state.connect import connect
from distserve.state.registry import Registry
from distserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc

PHASES = ("router_s", "prefill_queue_s", "prefill_compute_s", "kv_transfer_s", "decode_queue_s", "decode_s")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A router's TLS files (empty: plaintext)."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def client(self) -> dict:
        return {"tls_ca": self.ca, "tls_cert": self.cert, "tls_key": self.key}

    def channel(self) -> Tls | None:
        return Tls.load(self.ca, self.cert, self.key)


async def breakdown(target: str, n: int, prompt_len: int, max_tokens: int, seed: int = 0, tls: TlsFiles = TlsFiles()) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 250) for _ in range(prompt_len)] for _ in range(n)]  # valid for every model here
    async with AsyncClient(target, **tls.client()) as c:
        await c.generate(prompts[0][:16], max_tokens=2, temperature=0.0)  # warm the path
        outs = await asyncio.gather(*(c.generate(p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True) for p in prompts))
    e2e = [o.metrics.e2e_s for o in outs]
    phases = {k: statistics.mean(getattr(o.metrics.phases, k) for o in outs) for k in PHASES}
    mean_e2e = statistics.mean(e2e)
    return {
        "requests": n,
        "prompt_tokens": prompt_len,
        "output_tokens": max_tokens,
        "mean_e2e_s": round(mean_e2e, 4),
        "mean_ttft_s": round(statistics.mean(o.metrics.ttft_s for o in outs), 4),
        "mean_tpot_s": round(statistics.mean(o.metrics.tpot_s for o in outs), 4),
        "phases_mean_s": {k: round(v, 5) for k, v in phases.items()},
        "phases_share": {k: round(v / mean_e2e, 4) for k, v in phases.items()},
        "kv_transfer_share_mean": round(statistics.mean(o.metrics.phases.kv_transfer_s / o.metrics.e2e_s for o in outs), 5),
        "kv_transfer_share_max": round(max(o.metrics.phases.kv_transfer_s / o.metrics.e2e_s for o in outs), 5),
        "kv_bytes_per_request": outs[0].metrics.kv_bytes,
        "kv_transport": outs[0].metrics.kv_transport,
    }


async def router_overhead(target: str, redis_url: str, n: int, prompt_len: int = 16, tls: TlsFiles = TlsFiles()) -> dict:
    r = connect(redis_url, role="bench")
    views = [v for v in await Registry(r).live_workers(role="prefill")]
    await r.aclose()
    if not views:
        raise SystemExit("no prefill worker registered")
    pool = ChannelPool(tls=tls.channel())
    leases = LeaseClient(pool)
    prompt = list(range(200, 200 + prompt_len))
    params = common_pb2.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    direct, routed = [], []
    async with AsyncClient(target, **tls.client()) as c:
        for i in range(n + 2):
            view = views[i % len(views)]
            stub = prefill_pb2_grpc.PrefillStub(pool.get(view.info.address))
            t = time.perf_counter()
            resp = await stub.Prefill(prefill_pb2.PrefillRequest(request_id=f"direct-{i}-{time.time_ns()}", token_ids=prompt, params=params), timeout=30)
            d = time.perf_counter() - t
            if resp.HasField("kv_handle"):
                await leases.release_handle(resp.kv_handle)
            t = time.perf_counter()
            async for chunk in c.stream(prompt, max_tokens=1, temperature=0.0):
                break  # the first token is the prefill leg's answer
            rt = time.perf_counter() - t
            if i >= 2:  # the first pairs warm channels and caches
                direct.append(d)
                routed.append(rt)
    await pool.close_all()
    diffs = [b - a for a, b in zip(direct, routed)]
    return {
        "pairs": len(diffs),
        "direct_prefill_p50_ms": round(1e3 * statistics.median(direct), 3),
        "via_router_first_token_p50_ms": round(1e3 * statistics.median(routed), 3),
        "router_added_p50_ms": round(1e3 * statistics.median(diffs), 3),
        "router_added_p90_ms": round(1e3 * _pct(diffs, 0.9), 3),
    }


async def http_overhead(target: str, http_url: str, model: str, n: int, prompt_len: int = 16, tls: TlsFiles = TlsFiles()) -> dict:
    from urllib.parse import urlsplit

    from distserve.bench.openai_target import OpenAITarget
    from distserve.bench.workloads import RequestSpec

    url = urlsplit(http_url)
    https = ssl.create_default_context(cafile=tls.ca or None) if url.scheme == "https" else None
    http = OpenAITarget(url.hostname, url.port or 80, model, timeout_s=60, send_token_ids=True, tls=https)
    prompt = list(range(200, 200 + prompt_len))
    spec = RequestSpec(0, prompt, "", prompt_len, 1)
    over_grpc, over_http = [], []
    async with AsyncClient(target, **tls.client()) as c:
        for i in range(n + 2):
            t = time.perf_counter()
            async for chunk in c.stream(prompt, max_tokens=1, temperature=0.0, ignore_eos=True):
                break
            g = time.perf_counter() - t
            t0 = time.monotonic()
            res = await http.send(spec, t0)
            if not res.ok:
                raise SystemExit(f"HTTP request failed: {res.error}")
            h = res.token_times[0]
            if i >= 2:
                over_grpc.append(g)
                over_http.append(h)
    diffs = [b - a for a, b in zip(over_grpc, over_http)]
    return {
        "pairs": len(diffs),
        "grpc_first_token_p50_ms": round(1e3 * statistics.median(over_grpc), 3),
        "http_first_token_p50_ms": round(1e3 * statistics.median(over_http), 3),
        "http_added_p50_ms": round(1e3 * statistics.median(diffs), 3),
        "http_added_p90_ms": round(1e3 * _pct(diffs, 0.9), 3),
    }


async def measure(target: str, redis_url: str, args, http_url: str | None = None, tls: TlsFiles = TlsFiles()) -> dict:
    out = {
        "tls": bool(tls.ca),
        "breakdown": await breakdown(target, args.num_requests, args.prompt_len, args.max_tokens, tls=tls),
        "router": await router_overhead(target, redis_url, args.pairs, tls=tls),
    }
    if http_url:
        out["http"] = await http_overhead(target, http_url, args.model, args.pairs, tls=tls)
    return out


def main(args) -> None:
    up = None
    target, redis_url, http_url = args.target, args.redis_url, args.http_url
    tls = TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)
    if not target:
        from distserve.rpc.certs import role_files
        from distserve.up import UpProcess

        up = UpProcess(Path(tempfile.mkdtemp(prefix="distserve-bench-")), "--model", args.model, "--tls", args.tls)
        target, redis_url, http_url = up.target, up.redis_url, up.http_url
        router = role_files(up.tls_dir, "router") if up.tls_dir else None
        tls = TlsFiles(str(router.ca), str(router.cert), str(router.key)) if router else TlsFiles()
    try:
        result = asyncio.run(measure(target, redis_url, args, http_url, tls))
    finally:
        if up is not None:
            up.stop()
    if args.json:
        print(json.dumps(result))
        return
    b, r = result["breakdown"], result["router"]
    print("TLS (mutual between services)" if result["tls"] else "plaintext")
    print(f"{b['requests']} concurrent requests, {b['prompt_tokens']} prompt + {b['output_tokens']} output tokens; mean e2e {b['mean_e2e_s']:.3f}s")
    for k in PHASES:
        print(f"  {k:<18} {b['phases_mean_s'][k]:9.4f}s  {100 * b['phases_share'][k]:6.2f}%")
    print(f"  KV transfer share of e2e: mean {100 * b['kv_transfer_share_mean']:.3f}%, max {100 * b['kv_transfer_share_max']:.3f}% ({b['kv_bytes_per_request']} bytes over {b['kv_transport']})")
    print(f"router added latency over a direct Prefill call: p50 {r['router_added_p50_ms']:.3f} ms, p90 {r['router_added_p90_ms']:.3f} ms ({r['pairs']} pairs)")
    if "http" in result:
        h = result["http"]
        print(f"HTTP (OpenAI API) added latency over gRPC, first token: p50 {h['http_added_p50_ms']:.3f} ms, "
              f"p90 {h['http_added_p90_ms']:.3f} ms ({h['pairs']} pairs; gRPC p50 {h['grpc_first_token_p50_ms']:.3f} ms)")
