"""Overload: Poisson traffic at multiples of the measured capacity against `distserve up` (issue 20).

    python benchmarks/overload.py --json                      # 5x and 10x of 1.0 req/s, 60 s per point
    python benchmarks/overload.py --capacity 1.2 --multiples 5,10 --duration 60 --model smollm2-135m

One suite (`distserve up`, 1 prefill + 1 decode by default) for all points, started with the router's
admission settings. Per point it sends the chat workload at `multiple x capacity` req/s for
`--duration` seconds (so at most that many x rate requests, each with a `--timeout` deadline), waits
for the admitted ones to finish, and reports: requests sent, completed, refused with
RESOURCE_EXHAUSTED (and how many carried the retry-after hint), other errors by status, SLO
attainment of the admitted (completed) requests, refusal latency p50/p99 (send -> refusal at the
client), and the RSS of every process `up` started, before and after.

Admission settings, unless given (`--max-inflight`, `--max-queued-tokens`):
- max_inflight from Little's law: requests in flight at capacity = capacity x mean end-to-end latency
  there; the latency is estimated as TTFT + mean output tokens x TPOT at capacity (`--ttft-at-capacity`,
  `--tpot-at-capacity`, defaults from DESIGN.md section 7's 1P+1D int8 figures with queueing);
  rounded up.
- max_queued_tokens: what the prefill worker gets through in half the TTFT SLO
  (`--prefill-tok-s` x slo_ttft / 2), so a prompt admitted at the back of a full queue still has
  half its TTFT budget left for its own prefill, the KV transfer and the first decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from distserve.bench.metrics import percentile
from distserve.bench.serve import git_commit, tokenizer_for
from distserve.bench.workloads import MIXES, build_requests, with_arrivals
from distserve.up import UpProcess

BAD_STATUSES = ("INTERNAL", "UNKNOWN")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def suite_rss(up: UpProcess) -> dict[str, float | None]:
    """RSS (MiB) of every process in supervisor.json, by name."""
    return {name: (round(v, 1) if (v := rss_mb(p["pid"])) is not None else None) for name, p in up.status().items()}


def mean_output_tokens(workload: str, n: int = 4000, seed: int = 0) -> float:
    from distserve.bench.workloads import lengths

    outs = [o for _, o in lengths(workload, n, seed)]
    return sum(outs) / len(outs)


def admission_settings(args) -> tuple[int, int, dict]:
    mean_out = mean_output_tokens(args.workload)
    e2e = args.ttft_at_capacity + mean_out * args.tpot_at_capacity
    inflight = args.max_inflight or max(1, math.ceil(args.capacity * e2e))
    queued = args.max_queued_tokens or max(1, math.ceil(args.prefill_tok_s * args.slo_ttft / 2))
    how = {
        "max_inflight": f"ceil(capacity {args.capacity} req/s x e2e {e2e:.2f} s) = {math.ceil(args.capacity * e2e)}"
                        f" (e2e = ttft {args.ttft_at_capacity} s + mean output {mean_out:.1f} tok x tpot "
                        f"{args.tpot_at_capacity} s)" + ("; overridden" if args.max_inflight else ""),
        "max_queued_tokens": f"ceil(prefill {args.prefill_tok_s} tok/s x slo_ttft {args.slo_ttft} s / 2)"
                             + ("; overridden" if args.max_queued_tokens else ""),
    }
    return inflight, queued, how


async def run_point(address: str, tokenizer, args, rate: float, seed: int, tls: dict[str, str]) -> dict:
    from distserve.client import AsyncClient
    from distserve.errors import ResourceExhausted

    n = max(1, int(round(rate * args.duration)))
    reqs = with_arrivals(build_requests(args.workload, n, tokenizer, seed), rate, "poisson", 1.0, seed)
    reqs = [r for r in reqs if r.arrival_s < args.duration] or reqs[:1]
    client = AsyncClient(address, timeout_s=args.timeout, **tls)
    t0 = time.monotonic()
    out: list[dict] = []

    async def one(spec) -> None:
        await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.monotonic()))
        sent = time.monotonic()
        rec: dict = {"prompt_len": spec.prompt_len, "output_len": spec.output_len}
        try:
            c = await client.generate(spec.prompt_ids, max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)
        except ResourceExhausted as exc:
            rec.update(status="RESOURCE_EXHAUSTED", latency_s=time.monotonic() - sent,
                       retry_after_s=getattr(exc, "retry_after_s", None), message=str(exc)[:200])
        except Exception as exc:  # every other outcome is recorded by its status
            code = getattr(exc, "grpc_code", None)
            if code is None and isinstance(exc, grpc.RpcError):
                code = exc.code()
            rec.update(status=code.name if isinstance(code, grpc.StatusCode) else type(exc).__name__,
                       latency_s=time.monotonic() - sent, message=str(exc)[:200])
        else:
            times = list(c.token_times)
            ntok = len(c.token_ids)
            rec.update(status="OK", latency_s=time.monotonic() - sent, tokens=ntok,
                       ttft_s=times[0] if times else math.inf,
                       tpot_s=(times[-1] - times[0]) / (ntok - 1) if ntok > 1 and times else 0.0)
        out.append(rec)

    try:
        await asyncio.gather(*(one(s) for s in reqs))
    finally:
        await client.close()
    span = time.monotonic() - t0
    return summarize_point(out, rate, span, args)


def summarize_point(recs: list[dict], rate: float, span: float, args) -> dict:
    ok = [r for r in recs if r["status"] == "OK"]
    shed = [r for r in recs if r["status"] == "RESOURCE_EXHAUSTED"]
    other = Counter(r["status"] for r in recs if r["status"] not in ("OK", "RESOURCE_EXHAUSTED"))
    ttft_ok = [r for r in ok if r["ttft_s"] <= args.slo_ttft]
    both = [r for r in ok if r["ttft_s"] <= args.slo_ttft and r["tpot_s"] <= args.slo_tpot]
    lat = [r["latency_s"] for r in shed]
    q = lambda xs, p: round(percentile(xs, p), 4) if xs else None  # noqa: E731
    return {
        "rate_rps": rate,
        "sent": len(recs),
        "completed": len(ok),
        "refused_resource_exhausted": len(shed),
        "refused_with_retry_after": sum(r.get("retry_after_s") is not None for r in shed),
        "retry_after_s": sorted({r.get("retry_after_s") for r in shed if r.get("retry_after_s") is not None}),
        "other_errors": dict(other),
        "internal_or_unknown": sum(other[s] for s in BAD_STATUSES),
        "admitted_slo_attainment": round(len(both) / len(ok), 4) if ok else None,
        "admitted_ttft_attainment": round(len(ttft_ok) / len(ok), 4) if ok else None,
        "admitted_ttft_p50_s": q([r["ttft_s"] for r in ok], 50),
        "admitted_ttft_p99_s": q([r["ttft_s"] for r in ok], 99),
        "admitted_tpot_p50_s": q([r["tpot_s"] for r in ok], 50),
        "admitted_tpot_p99_s": q([r["tpot_s"] for r in ok], 99),
        "goodput_rps": round(len(both) / span, 3) if span > 0 else None,
        "refusal_latency_p50_ms": round(1000 * percentile(lat, 50), 2) if lat else None,
        "refusal_latency_p99_ms": round(1000 * percentile(lat, 99), 2) if lat else None,
        "refusal_latency_max_ms": round(1000 * max(lat), 2) if lat else None,
        "span_s": round(span, 1),
        "error_samples": sorted({r["message"] for r in recs if r["status"] not in ("OK", "RESOURCE_EXHAUSTED")})[:5],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--capacity", type=float, default=1.0, help="measured goodput, req/s (DESIGN.md section 7: ~1.0)")
    p.add_argument("--multiples", default="5,10")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per point")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, seconds")
    p.add_argument("--workload", default="chat", choices=sorted(MIXES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=4.0)
    p.add_argument("--slo-tpot", type=float, default=0.08)
    p.add_argument("--max-inflight", type=int, default=0, help="0: from Little's law (see the module docstring)")
    p.add_argument("--max-queued-tokens", type=int, default=0, help="0: prefill rate x slo_ttft / 2")
    p.add_argument("--ttft-at-capacity", type=float, default=1.5)
    p.add_argument("--tpot-at-capacity", type=float, default=0.05)
    p.add_argument("--prefill-tok-s", type=float, default=600.0,
                   help="prefill worker's rate with decode sharing the cores (985 alone, DESIGN.md section 7)")
    p.add_argument("--settle", type=float, default=5.0, help="idle seconds between points and before the last RSS")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args()

    inflight, queued, how = admission_settings(args)
    multiples = [float(m) for m in args.multiples.split(",") if m]
    result: dict = {
        "commit": git_commit(), "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
        "model": args.model, "suite": f"{args.prefill}P+{args.decode}D", "workload": args.workload,
        "capacity_rps": args.capacity, "duration_s": args.duration, "timeout_s": args.timeout,
        "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
        "admission": {"max_inflight": inflight, "max_queued_tokens": queued, "how": how},
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "points": [],
    }
    tokenizer = tokenizer_for(args.model)
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        up = UpProcess(Path(tmp), "--model", args.model, "--prefill", str(args.prefill), "--decode", str(args.decode),
                       f"--router-arg=--max-inflight={inflight}", f"--router-arg=--max-queued-tokens={queued}")
        try:
            # two warm-up requests, one by one: first-use costs stay out of the figures
            async def warm():
                from distserve.client import AsyncClient

                async with AsyncClient(up.target, timeout_s=120, **up.client_tls) as c:
                    for spec in build_requests(args.workload, 2, tokenizer, args.seed + 999):
                        await c.generate(spec.prompt_ids, max_tokens=spec.output_len, temperature=0.0, ignore_eos=True)

            asyncio.run(warm())
            time.sleep(args.settle)
            result["rss_mb_start"] = suite_rss(up)
            for i, m in enumerate(multiples):
                before = suite_rss(up)
                point = asyncio.run(run_point(up.target, tokenizer, args, m * args.capacity, args.seed + i, up.client_tls))
                time.sleep(args.settle)
                point.update(multiple=m, rss_mb_before=before, rss_mb_after=suite_rss(up))
                result["points"].append(point)
                if not args.json:
                    print(json.dumps(point), flush=True)
            result["restarts"] = {k: v.get("restarts") for k, v in up.status().items()}
        except BaseException:
            up.dump()
            raise
        finally:
            up.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1 if args.json else None))


if __name__ == "__main__":
    main()
