"""`distserve bench serve`: one load run against a serving system, with per-request timelines.

A run: build the request list from (workload, n, seed) -> give it arrival times (Poisson or gamma at
a rate) or hand it to C closed-loop clients -> send each request at its time through the target
(`distserve://host:port` via the SDK, `openai://host:port` via streaming HTTP) -> record send time,
every token's time, the real token count and, for distserve, the server's per-phase timings ->
summarize against the SLOs. Requests still running when the run ends are awaited, never dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from distserve.bench import cores
from distserve.bench.metrics import PHASES, RequestResult, summarize
from distserve.bench.workloads import MIXES, RequestSpec, build_requests, conversations, with_arrivals


class DistserveTarget:
    """A distserve router through `AsyncClient`; prompts go as token ids, so their lengths are exact."""

    def __init__(self, address: str, timeout_s: float = 600.0):
        from distserve.client import AsyncClient

        self.address = address
        self.client = AsyncClient(address, timeout_s=timeout_s)
        self.run_id = uuid.uuid4().hex[:8]

    async def model_name(self) -> str:
        return (await self.client.models())[0].name

    async def send(self, spec: RequestSpec, t0: float) -> RequestResult:
        res = RequestResult(spec.index, spec.prompt_len, spec.output_len, time.monotonic() - t0, ignore_eos=spec.ignore_eos)
        prompt = spec.prompt_ids if spec.prompt_ids is not None else spec.prompt_text
        try:
            c = await self.client.generate(prompt, max_tokens=spec.output_len, temperature=0.0, ignore_eos=spec.ignore_eos,
                                           request_id=f"bench-{self.run_id}-{spec.index}")
        except Exception as exc:  # a failed request is a result, not a crash of the run
            res.error = f"{type(exc).__name__}: {exc}"[:300]
            res.end_s = time.monotonic() - t0
            return res
        res.end_s = time.monotonic() - t0
        # the SDK's times count from its own start of the call, a few microseconds after send_s
        res.token_times = [res.send_s + t for t in c.token_times]
        res.completion_tokens = len(c.token_ids)
        res.output_ids = list(c.token_ids)
        res.finish_reason = c.finish_reason
        if c.metrics is not None and c.metrics.HasField("phases"):
            res.phases = {p: getattr(c.metrics.phases, p) for p in PHASES}
        if c.metrics is not None:
            res.cached_tokens = c.metrics.cached_tokens
            res.disagg, res.disagg_reason = c.metrics.disagg_decision, c.metrics.disagg_reason
            res.local_estimate_s, res.remote_estimate_s = c.metrics.local_estimate_s, c.metrics.remote_estimate_s
        return res

    async def close(self) -> None:
        await self.client.close()


def parse_target(target: str, model: str = "", timeout_s: float = 600.0, token_ids: bool | None = None):
    """`distserve://host:port` (or a bare host:port), `openai://host:port` or, over TLS, `https://host:port`
    (checked against $DISTSERVE_TLS_CA when set, else the system's CAs; the SDK reads it too)."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        scheme, rest = "distserve", target
    if scheme == "distserve":
        return DistserveTarget(rest, timeout_s)
    if scheme in ("openai", "http", "https"):
        from distserve.bench.openai_target import OpenAITarget

        host, _, port = rest.rstrip("/").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"openai target needs host:port, got {target!r}")
        tls = ssl.create_default_context(cafile=os.environ.get("DISTSERVE_TLS_CA") or None) if scheme == "https" else None
        return OpenAITarget(host, int(port), model or "smollm2-135m", timeout_s, send_token_ids=bool(token_ids), tls=tls)
    raise ValueError(f"unknown target scheme {scheme!r}: use distserve://host:port, openai://host:port or https://host:port")


@dataclass(slots=True)
class RunConfig:
    workload: str = "chat"
    num_requests: int = 30
    rate: float = 1.0  # req/s (open loop)
    arrival: str = "poisson"  # poisson | gamma | closed
    cv: float = 1.0  # gamma's coefficient of variation
    concurrency: int = 1  # clients (closed loop)
    seed: int = 0
    slo_ttft: float = 4.0
    slo_tpot: float = 0.08
    extra: dict = field(default_factory=dict)  # recorded as is (system description, ...)


async def run_requests(target, reqs: list[RequestSpec], arrival: str = "poisson", concurrency: int = 1,
                       on_done=None, decode=None) -> tuple[list[RequestResult], float]:
    """Sends every request (open loop at its arrival time, or closed loop); returns results and the run's span.
    Multi-turn conversations go turn after turn, each turn's prompt built from the answers before it
    (`decode(ids)` gives its text for targets that take text)."""
    t0 = time.monotonic()

    async def one(spec: RequestSpec) -> RequestResult:
        res = await target.send(spec, t0)
        if on_done:
            on_done(res)
        return res

    if any(r.conversation >= 0 for r in reqs):
        return await _run_conversations(reqs, arrival, concurrency, one, decode, t0)

    if arrival == "closed":
        queue = list(reversed(reqs))
        results: list[RequestResult] = []

        async def client():
            while queue:
                results.append(await one(queue.pop()))

        await asyncio.gather(*(client() for _ in range(max(1, concurrency))))
        results.sort(key=lambda r: r.index)
    else:
        async def timed(spec: RequestSpec) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.monotonic()))
            return await one(spec)

        results = list(await asyncio.gather(*(timed(s) for s in reqs)))
    return results, time.monotonic() - t0


async def _run_conversations(reqs, arrival, concurrency, one, decode, t0) -> tuple[list[RequestResult], float]:
    async def conversation(turns: list[RequestSpec]) -> list[RequestResult]:
        out, history = [], None
        for spec in turns:
            if spec.turn and spec.think_s:
                await asyncio.sleep(spec.think_s)
            if spec.prompt_ids is None:  # history (system prompt, earlier turns and their answers) + the new message
                ids = history + (spec.user_ids or [])
                spec = replace(spec, prompt_ids=ids, prompt_text=decode(ids) if decode else "", prompt_len=len(ids))
            res = await one(spec)
            out.append(res)
            history = spec.prompt_ids + (res.output_ids if res.ok and res.output_ids else (spec.reply_ids or []))
        return out

    convs = conversations(reqs)
    if arrival == "closed":
        queue = list(reversed(convs))
        results: list[RequestResult] = []

        async def client():
            while queue:
                results.extend(await conversation(queue.pop()))

        await asyncio.gather(*(client() for _ in range(max(1, concurrency))))
    else:
        async def timed(turns: list[RequestSpec]) -> list[RequestResult]:
            await asyncio.sleep(max(0.0, t0 + turns[0].arrival_s - time.monotonic()))
            return await conversation(turns)

        results = [r for rs in await asyncio.gather(*(timed(g) for g in convs)) for r in rs]
    results.sort(key=lambda r: r.index)
    return results, time.monotonic() - t0


def tokenizer_for(model: str):
    from distserve.tokenization import load_tokenizer

    return load_tokenizer(model)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


async def resolve_model(target, model: str) -> str:
    if model:
        return model
    if isinstance(target, DistserveTarget):
        return await target.model_name()
    return "smollm2-135m"


async def measure(target, base: list[RequestSpec], cfg: RunConfig, progress=None, decode=None, scrape: list[str] = ()) -> dict:
    """One run at cfg.rate (or closed loop): the summary plus every request's timeline; with `scrape`
    (workers' metrics URLs) also where each worker's time went (summary["cores"], bench.cores)."""
    reqs = base if cfg.arrival == "closed" else with_arrivals(base, cfg.rate, cfg.arrival, cfg.cv, cfg.seed)
    before = await cores.scrape(list(scrape)) if scrape else None
    cpu0 = time.process_time()
    results, span = await run_requests(target, reqs, cfg.arrival, cfg.concurrency, progress, decode)
    summary = summarize(results, cfg.slo_ttft, cfg.slo_tpot, span)
    if before is not None:  # and what this load generator cost, on the same machine as the suite or not
        summary["cores"] = cores.account(before, await cores.scrape(list(scrape)), client_cpu=(time.process_time() - cpu0) / span if span > 0 else None)
    return {
        "rate": cfg.rate if cfg.arrival != "closed" else None,
        "summary": summary,
        "requests": [r.to_dict() for r in results],
    }


def warm_up_list(workload: str, base: list[RequestSpec], n: int, tokenizer, seed: int) -> list[RequestSpec]:
    """What `warm_up` sends: for the synthetic workloads the first requests in other words (variant -1),
    so the warm-up leaves nothing in a prefix cache that the measured requests could use; else the
    list's first requests."""
    if workload in MIXES or workload in ("shared-prefix", "multiturn"):
        base = build_requests(workload, max(n, 1) * 8, tokenizer, seed, variant=-1)
    return [s for s in base if s.prompt_ids is not None or not s.user_ids][:n]


async def warm_up(target, base: list[RequestSpec], n: int) -> None:
    """`n` requests of the list one after another, not recorded: first-use costs stay out of the figures."""
    t0 = time.monotonic()
    for spec in [s for s in base if s.prompt_ids is not None or not s.user_ids][:n]:
        res = await target.send(spec, t0)
        if res.error:
            raise SystemExit(f"warm-up request failed: {res.error}")


def run_config(args) -> RunConfig:
    arrival = "closed" if args.concurrency else args.arrival
    return RunConfig(workload=args.workload, num_requests=args.num_requests, rate=args.rate, arrival=arrival, cv=args.cv,
                     concurrency=args.concurrency or 1, seed=args.seed, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot)


async def serve_main(args) -> dict:
    from distserve.bench.report import Progress

    cfg = run_config(args)
    target = parse_target(args.target, args.model, args.timeout, args.token_ids)
    try:
        model = await resolve_model(target, args.model)
        tok = tokenizer_for(model)
        base = build_requests(cfg.workload, cfg.num_requests, tok, cfg.seed)
        await warm_up(target, warm_up_list(cfg.workload, base, args.warmup, tok, cfg.seed), args.warmup)
        with Progress(len(base), f"{args.target} {cfg.workload}", enabled=not args.no_progress) as bar:
            run = await measure(target, base, cfg, bar.update, tok.decode, args.scrape)
    finally:
        await target.close()
    return {"commit": git_commit(), "target": args.target, "model": model, "config": asdict(cfg),
            "unix_time": time.time(), **run}


def main(args) -> None:
    from distserve.bench.report import serve_table

    out = asyncio.run(serve_main(args))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.json:
        print(json.dumps(out if args.per_request else {k: v for k, v in out.items() if k != "requests"}))
    else:
        print(serve_table(out))
    sys.stdout.flush()


def add_common_arguments(p) -> None:
    """Flags `bench serve` and `bench goodput` share."""
    p.add_argument("--workload", default="chat", help="chat, code, summarize, shared-prefix (one long system prompt, short questions), multiturn (conversations resending their history), rewrite (outputs that draw on the prompt: the standard library's functions and docstrings), or jsonl:PATH with {prompt, output_len} per line")
    p.add_argument("--num-requests", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="same seed, same request list (lengths, prompts, arrivals)")
    p.add_argument("--arrival", default="poisson", choices=("poisson", "gamma"))
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma inter-arrival times")
    p.add_argument("--slo-ttft", type=float, default=4.0, help="seconds")
    p.add_argument("--slo-tpot", type=float, default=0.08, help="seconds per output token")
    p.add_argument("--model", default="", help="tokenizer for the prompts and model name for openai targets (default: what a distserve target serves, else smollm2-135m)")
    p.add_argument("--token-ids", action="store_true", help="send token ids to openai targets too (distserve targets always get them)")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--warmup", type=int, default=2, help="requests sent one by one before measuring, not recorded")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--scrape", type=lambda v: [cores.normalize(u) for u in v.split(",") if u.strip()], default=[],
                   help="metrics endpoints of the suite's workers and routers (host:port or URL, comma-separated; `distserve up` "
                        "names them): read before and after each run, to report where each one's time went (steps by kind, CPU)")


def add_serve_arguments(p) -> None:
    p.add_argument("--target", default="distserve://localhost:50051", help="distserve://host:port or openai://host:port")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (open loop)")
    p.add_argument("--concurrency", type=int, default=0, help="closed loop with this many clients (overrides --rate)")
    add_common_arguments(p)
    p.add_argument("--per-request", action="store_true", help="with --json: print every request's timeline too")
    p.add_argument("--out", default="", help="write the full JSON (every request's timeline) here")
