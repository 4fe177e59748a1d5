"""`distserve bench goodput`: the highest rate at which >= 90% of requests meet both SLOs, and the
smallest SLO scale that reaches 90% at a fixed rate (DistServe, section 6).

Per system (target): the request list is built once from the seed -> a coarse sweep runs rates in
ascending order until one fails -> bisection between the last passing and the first failing rate
for a few steps -> goodput is the highest passing rate measured. The SLO-scale variant needs no
extra runs: at a fixed rate the schedule does not depend on the SLO, so one run gives every
request's required factor (see metrics.slo_scale); the run at that rate is reused when the sweep
already measured it. Several targets are measured one after the other with the same requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from distserve.bench.metrics import RequestResult, attainment, slo_scale
from distserve.bench.serve import RunConfig, build_requests, git_commit, measure, parse_target, resolve_model, tokenizer_for, warm_up, warm_up_list

TARGET_ATTAINMENT = 0.9
SCALES = [round(0.1 * i, 2) for i in range(1, 31)]  # the attainment-vs-scale curve, 0.1x .. 3.0x


class GoodputSearch:
    """Which rate to measure next: coarse sweep upwards until a failure, then bisection.

    Usage: `while (r := s.next_rate()) is not None: s.record(r, attainment_at(r))`; then `s.goodput`.
    Attainment is assumed to fall as the rate rises; `goodput` is the highest passing rate measured
    (0 when none passed), and `bounded` says whether a failing rate was found above it.
    """

    def __init__(self, rates: list[float], target: float = TARGET_ATTAINMENT, bisect_steps: int = 3, rel_tol: float = 0.05):
        if not rates or min(rates) <= 0:
            raise ValueError(f"need at least one rate > 0, got {rates}")
        self.coarse = sorted(set(rates))
        self.target = target
        self.steps_left = bisect_steps
        self.rel_tol = rel_tol
        self.lo = 0.0  # highest passing rate so far
        self.hi: float | None = None  # lowest failing rate so far
        self.points: list[tuple[float, float]] = []  # (rate, attainment) in the order measured

    def next_rate(self) -> float | None:
        if self.hi is None:
            i = len(self.points)
            return self.coarse[i] if i < len(self.coarse) else None
        if self.steps_left <= 0 or (self.hi - self.lo) <= self.rel_tol * self.hi:
            return None
        return round((self.lo + self.hi) / 2, 4)

    def record(self, rate: float, att: float) -> None:
        bisecting = self.hi is not None
        self.points.append((rate, att))
        if att >= self.target:
            self.lo = max(self.lo, rate)
        else:
            self.hi = rate if self.hi is None else min(self.hi, rate)
        if bisecting:
            self.steps_left -= 1

    @property
    def goodput(self) -> float:
        return self.lo

    @property
    def bounded(self) -> bool:
        return self.hi is not None


def scale_curve(results: list[RequestResult], slo_ttft: float, slo_tpot: float) -> list[tuple[float, float]]:
    return [(f, attainment(results, f * slo_ttft, f * slo_tpot)) for f in SCALES]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


async def measure_system(target_spec: str, label: str, args, progress_factory) -> dict:
    target = parse_target(target_spec, args.model, args.timeout, args.token_ids)
    try:
        model = await resolve_model(target, args.model)
        tok = tokenizer_for(model)
        base = build_requests(args.workload, args.num_requests, tok, args.seed)
        await warm_up(target, warm_up_list(args.workload, base, args.warmup, tok, args.seed), args.warmup)
        cfg = RunConfig(workload=args.workload, num_requests=args.num_requests, arrival=args.arrival, cv=args.cv,
                        seed=args.seed, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot)
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        search = GoodputSearch(rates, TARGET_ATTAINMENT, args.bisect_steps)
        runs: dict[float, dict] = {}

        async def run_at(rate: float) -> dict:
            # each point its own words (same lengths and arrivals): no point finds another's prompts cached
            reqs = build_requests(args.workload, args.num_requests, tok, args.seed, variant=len(runs)) if runs else base
            with progress_factory(len(base), f"{label} @ {rate:g} req/s") as bar:
                run = await measure(target, reqs, replace(cfg, rate=rate), bar.update, tok.decode, args.scrape)
                bar.suffix = f"attainment {run['summary']['attainment']:.0%}"
            return run

        while (rate := search.next_rate()) is not None:
            runs[rate] = await run_at(rate)
            search.record(rate, runs[rate]["summary"]["attainment"])
        also = []
        for slo_ttft, slo_tpot in args.also_slo:  # more SLO pairs, each its own search over the same runs
            other = GoodputSearch(rates, TARGET_ATTAINMENT, args.bisect_steps)
            while (rate := other.next_rate()) is not None:
                if rate not in runs:
                    runs[rate] = await run_at(rate)
                other.record(rate, attainment([RequestResult.from_dict(d) for d in runs[rate]["requests"]], slo_ttft, slo_tpot))
            also.append({"slo_ttft": slo_ttft, "slo_tpot": slo_tpot, "goodput_rps": other.goodput, "bounded": other.bounded,
                         "points": [{"rate": r, "attainment": a} for r, a in other.points]})
        scale_rate = args.scale_rate or min(rates)
        if scale_rate not in runs:
            runs[scale_rate] = await run_at(scale_rate)
    finally:
        await target.close()
    at_scale = [RequestResult.from_dict(d) for d in runs[scale_rate]["requests"]]
    ok = [r for r in at_scale if r.ok]
    return {
        "label": label, "target": target_spec, "model": model,
        "goodput_rps": search.goodput, "bounded": search.bounded,
        "points": [{"rate": r, "attainment": a, "summary": runs[r]["summary"]} for r, a in search.points],
        "also_slo": also,
        "scale": {
            "rate": scale_rate,
            "factor": _finite(slo_scale(at_scale, args.slo_ttft, args.slo_tpot)),
            "curve": scale_curve(at_scale, args.slo_ttft, args.slo_tpot),
            "summary": runs[scale_rate]["summary"],
            "ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok], "e2e": [r.e2e for r in ok],
        },
    }


async def goodput_main(args) -> dict:
    from distserve.bench.report import Progress

    if args.scrape and len(args.target) > 1:
        raise SystemExit("--scrape names the workers of one system: measure one --target with it")
    labels = list(args.label or [])
    systems = []
    for i, t in enumerate(args.target):
        label = labels[i] if i < len(labels) else t
        systems.append(await measure_system(t, label, args, lambda n, what: Progress(n, what, enabled=not args.no_progress)))
    return {
        "commit": git_commit(), "unix_time": time.time(), "workload": args.workload, "num_requests": args.num_requests,
        "seed": args.seed, "arrival": args.arrival, "cv": args.cv, "slo_ttft": args.slo_ttft, "slo_tpot": args.slo_tpot,
        "target_attainment": TARGET_ATTAINMENT, "note": args.note, "systems": systems,
    }


def merge(paths: list[str]) -> dict:
    """Several `bench goodput` JSON files (same workload and SLOs) as one result with all their systems."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(docs[0])
    out["systems"] = []
    for d in docs:
        if (d["workload"], d["slo_ttft"], d["slo_tpot"]) != (out["workload"], out["slo_ttft"], out["slo_tpot"]):
            raise SystemExit(f"cannot merge: {paths} differ in workload or SLOs")
        for s in d["systems"]:
            out["systems"].append(s | {"commit": d["commit"]})
    return out


def main(args) -> None:
    from distserve.bench.report import goodput_table, plot_goodput

    if args.from_json:
        out = merge(args.from_json)
    elif not args.target:
        raise SystemExit("give at least one --target (or --from-json FILES)")
    else:
        out = asyncio.run(goodput_main(args))
    if args.out:
        Path(args.out).write_text(json.dumps(out))
    if args.plot_dir:
        for path in plot_goodput(out, Path(args.plot_dir), args.plot_prefix or out["workload"]):
            print(f"wrote {path}")
    print(json.dumps(out) if args.json else goodput_table(out))


def slo_pair(text: str) -> tuple[float, float]:
    """`4,0.08` -> (4.0, 0.08): TTFT and TPOT objectives in seconds, both > 0."""
    import argparse

    try:
        ttft, tpot = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want TTFT,TPOT in seconds (e.g. 8,0.2), got {text!r}") from None
    if not (ttft > 0 and tpot > 0 and math.isfinite(ttft) and math.isfinite(tpot)):
        raise argparse.ArgumentTypeError(f"SLOs must be finite and > 0, got {text!r}")
    return ttft, tpot


def add_goodput_arguments(p) -> None:
    from distserve.bench.serve import add_common_arguments

    p.add_argument("--target", action="append", default=[], help="distserve://host:port or openai://host:port; repeat for several systems")
    p.add_argument("--label", action="append", default=[], help="a name per --target, in order")
    p.add_argument("--rates", default="0.25,0.5,1,2", help="coarse sweep, req/s, comma-separated")
    p.add_argument("--bisect-steps", type=int, default=3)
    p.add_argument("--also-slo", type=slo_pair, action="append", default=[], metavar="TTFT,TPOT",
                   help="another SLO pair (seconds), searched over the same runs and measuring only the rates they lack; repeatable")
    p.add_argument("--scale-rate", type=float, default=0.0, help="fixed rate of the SLO-scale variant (default: the lowest coarse rate)")
    add_common_arguments(p)
    p.add_argument("--note", default="", help="free text recorded in the JSON (e.g. the suite's configuration)")
    p.add_argument("--out", default="", help="write the JSON here")
    p.add_argument("--from-json", nargs="+", default=[], help="no runs: merge these goodput JSON files, print and plot them")
    p.add_argument("--plot-dir", default="", help="write PNG plots here")
    p.add_argument("--plot-prefix", default="", help="file name prefix of the plots (default: the workload)")
