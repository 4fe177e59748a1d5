"""`distserve plan --validate`: the real suite at the planner's top placements, beside the simulation.

Per placement: `distserve up` with its counts, threads and weights (distserve.up.UpProcess) -> the
same request list the simulation used (workload, n, seed) measured at a few rates through
`distserve bench goodput`'s own code (warm-up, then one `measure` per rate, bisection included when
no rates are given) -> every measured rate simulated too -> one table: rate, measured and simulated
attainment, goodput. The suite is stopped before the next placement starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from distserve.planner.placement import Placement, suite_spec
from distserve.planner.profile import Profile
from distserve.planner.search import Goodput, Objective, _stats
from distserve.planner.simulator import simulate


def up_args(p: Placement, model: str) -> list[str]:
    args = ["--model", model, "--threads", str(p.threads), "--weights", p.weights]
    if p.disaggregated:
        args += ["--prefill", str(p.prefill), "--decode", str(p.decode)]
    else:
        args += ["--prefill", "0", "--decode", "0", "--colocated", str(p.colocated)]
        if p.chunked:
            args.append("--worker-arg=--chunked-prefill=true")
    return args


def goodput_args(o: Objective, rates: list[float], model: str, requests: int, scrape: list[str] = ()) -> argparse.Namespace:
    """What `bench goodput` would parse; `scrape`: the suite's metrics URLs (each point then says where
    each process's time went)."""
    return argparse.Namespace(
        model=model, timeout=600.0, token_ids=False, workload=o.workload, num_requests=requests, seed=o.seed, warmup=1,
        arrival=o.arrival, cv=o.cv, slo_ttft=o.slo_ttft, slo_tpot=o.slo_tpot, rates=",".join(f"{r:g}" for r in rates),
        bisect_steps=0 if len(rates) > 1 else 2, scale_rate=rates[0], also_slo=[], scrape=list(scrape),
    )


def measure_placement(p: Placement, o: Objective, rates: list[float], model: str, requests: int, out=print) -> dict:
    from distserve.bench import cores
    from distserve.bench.goodput import measure_system
    from distserve.bench.report import Progress
    from distserve.up import UpProcess

    tmp = Path(tempfile.mkdtemp(prefix="distserve-validate-"))
    up = UpProcess(tmp, *up_args(p, model), "--http-port", "-1")
    saved = os.environ.get("DISTSERVE_TLS_CA")
    try:
        if up.tls_ca:  # the suite serves TLS (up's default): the SDK finds its CA here
            os.environ["DISTSERVE_TLS_CA"] = up.tls_ca
        args = goodput_args(o, rates, model, requests, [cores.normalize(a) for a in up.metrics.values()])
        t0 = time.monotonic()
        result = asyncio.run(measure_system(f"distserve://{up.target}", p.label(), args,
                                            lambda n, what: Progress(n, what, enabled=False)))
        result["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        if saved is None:
            os.environ.pop("DISTSERVE_TLS_CA", None)
        else:
            os.environ["DISTSERVE_TLS_CA"] = saved
        code = up.stop()
    if code not in (0, None):
        out(f"warning: distserve up exited with {code} (logs in {tmp})")
    return result


def validate(profile: Profile, top: list[Goodput], o: Objective, args, out=print) -> list[dict]:
    if o.trace is not None:
        raise SystemExit("--validate measures the bench workloads; a trace: workload has no prompts to send")
    model = args.validate_model or profile.model.name
    requests = args.validate_requests or o.num_requests
    fixed = [float(r) for r in args.validate_rates.split(",") if r.strip()]
    rows = []
    for g in top:
        rates = fixed or sorted({round(f * g.rate, 3) for f in (0.5, 1.0, 1.5)})
        out(f"validating {g.placement.label()} ({model}, {requests} requests at {', '.join(f'{r:g}' for r in rates)} req/s) ...")
        measured = measure_placement(g.placement, o, rates, model, requests, out)
        suite = suite_spec(profile, g.placement)
        small = Objective(o.slo_ttft, o.slo_tpot, o.target, o.workload, requests, o.seed, o.arrival, o.cv)
        points = []
        for pt in sorted(measured["points"], key=lambda x: x["rate"]):
            sim = _stats(simulate(suite, small.requests_at(pt["rate"]), o.seed, keep_token_times=False), small)
            points.append({"rate": pt["rate"], "measured": pt["attainment"], "simulated": sim["attainment"],
                           "measured_ttft_p90": pt["summary"]["ttft"]["p90"], "simulated_ttft_p90": sim["ttft_p90"],
                           "measured_tpot_p90": pt["summary"]["tpot"]["p90"], "simulated_tpot_p90": sim["tpot_p90"]})
        rows.append({"placement": g.placement.label(), "simulated_goodput": g.rate, "measured_goodput": measured["goodput_rps"],
                     "measured_bounded": measured["bounded"], "points": points, "seconds": measured.get("seconds")})
    out(validation_table(rows, o))
    if getattr(args, "json", False):
        out(json.dumps(rows))
    return rows


def validation_table(rows: list[dict], o: Objective) -> str:
    lines = ["", f"simulated vs measured (SLO TTFT <= {o.slo_ttft:g}s, TPOT <= {o.slo_tpot * 1e3:g}ms)",
             f"{'placement':30}{'rate':>7}{'attainment meas/sim':>21}{'TTFT p90 meas/sim':>19}{'TPOT p90 meas/sim ms':>22}"]
    errs = []
    for r in rows:
        for p in r["points"]:
            errs.append(abs(p["measured"] - p["simulated"]))
            tt = f"{_f(p['measured_ttft_p90'])}/{_f(p['simulated_ttft_p90'])}"
            tp = f"{_f(p['measured_tpot_p90'], 1e3, 0)}/{_f(p['simulated_tpot_p90'], 1e3, 0)}"
            lines.append(f"{r['placement'][:29]:30}{p['rate']:>7g}{p['measured']:>11.0%} /{p['simulated']:>5.0%}{tt:>19}{tp:>22}")
        gp = f"{r['measured_goodput']:.3f}" + ("" if r["measured_bounded"] else "+")
        lines.append(f"{'':30}goodput measured {gp} req/s, simulated {r['simulated_goodput']:.3f} req/s")
    if errs:
        lines.append(f"mean |attainment error| {100 * sum(errs) / len(errs):.1f} points over {len(errs)} points")
    return "\n".join(lines)


def _f(x, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"
