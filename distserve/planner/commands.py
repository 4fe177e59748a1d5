"""`distserve profile` and `distserve plan` (search, `simulate`, `reference`, `--watch`, `--validate`):
their flags and what each prints. distserve/cli.py only wires them in."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PROFILE = REPO / "benchmarks" / "results" / "profile_smollm2-135m.json"
DEFAULT_REFERENCE = REPO.parent / "shared" / "reference" / "distserve-opt13b-a100"  # as planner.reference.DEFAULT_DIR


def _csv(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


# -- distserve profile -----------------------------------------------------------------------------


def add_profile_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="", help="profile JSON to write (default: profile_<model>.json here)")
    p.add_argument("--quick", action="store_true", help="a small grid (tests, CI): about a minute per configuration on smollm2-135m")
    p.add_argument("--threads", default="", help="thread counts per worker, comma-separated (default: this machine's cores)")
    p.add_argument("--weights", default="fp32,int8", help="weight formats, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda[:N]: a GPU profile (one engine per GPU, weights in the model's dtype, bf16 by default; --threads and --weights are ignored)")
    p.add_argument("--dtype", default="auto", help="with --device cuda: auto (bfloat16), bfloat16, float16 or float32")
    p.add_argument("--update", action="store_true",
                   help="keep the configurations already in --out that this run does not measure (add a thread count, re-measure one format)")
    p.add_argument("--refit", action="store_true", help="measure nothing: fit --out's configurations again from the raw points it holds")
    p.add_argument("--json", action="store_true", help="print the profile (without raw points) as JSON")
    return p


def profile_main(args) -> None:
    from distserve.planner.profile import load_profile
    from distserve.planner.profiler import profile, refit

    out = Path(args.out or f"profile_{args.model.replace('/', '_').replace(':', '-')}.json")
    if args.refit:
        prof = refit(load_profile(out))
        prof.save(out)
        print(profile_table(prof))
        print(f"refitted {out}")
        return
    threads = _csv(args.threads, int) or None
    prof = profile(args.model, threads, _csv(args.weights), args.quick, args.seed, progress=lambda s: print(s, file=sys.stderr, flush=True),
                   device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", "auto"))
    if args.update and out.exists():
        prof = merged(load_profile(out), prof)
    prof.save(out)
    if args.json:
        d = prof.to_dict()
        d.pop("points")
        print(json.dumps(d, indent=1))
        return
    print(profile_table(prof))
    print(f"wrote {out}")


def merged(old, new):
    """`new` with the engine configurations (and their raw points) of `old` that `new` did not measure."""
    if old.model.name != new.model.name or old.machine.get("cpu") != new.machine.get("cpu"):
        raise SystemExit(f"cannot update a profile of {old.model.name} on {old.machine.get('cpu')} with {new.model.name} on {new.machine.get('cpu')}")
    have = {(e.threads, e.weights) for e in new.engines}
    kept = [e for e in old.engines if (e.threads, e.weights) not in have]
    new.engines = sorted(kept + new.engines, key=lambda e: (e.threads, e.weights))
    for key, pts in old.points.items():
        new.points.setdefault(key, pts)
    new.source = f"{new.source}; kept from {old.created}: " + ", ".join(f"threads={e.threads}/{e.weights}" for e in kept) if kept else new.source
    return new


def profile_table(prof) -> str:
    m = prof.machine
    lines = [f"{prof.model.name} on {m.get('cpu') or m.get('gpu')} ({m.get('cores', '?')} cores; {' '.join(m.get('flags', []))})",
             f"{'threads':>7} {'weights':>7}  {'prefill err mean/max':>21}  {'decode err mean/max':>20}  {'mixed err mean/max':>19}"]
    for e in prof.engines:
        f = e.fit

        def cell(k):
            return f"{f[k]['mean_rel_err']:.1%} / {f[k]['max_rel_err']:.1%}" if k in f and f[k].get("points") else "-"

        lines.append(f"{e.threads:>7} {e.weights:>7}  {cell('prefill'):>21}  {cell('decode'):>20}  {cell('mixed'):>19}")
    for name, t in prof.transfer.items():
        lines.append(f"KV transfer {name}: {t.fixed_s * 1e3:.2f} ms + bytes / {t.bytes_per_s / 1e9:.2f} GB/s")
    return "\n".join(lines)


# -- distserve plan ---------------------------------------------------------------------------------


def _objective_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="chat", help="chat, code, summarize (the bench workloads), or trace:PATH (a trace's lengths)")
    p.add_argument("--num-requests", type=int, default=0,
                   help="requests per simulated rate (default: 200 for a CPU profile, 1000 for a GPU profile, whose batches are larger; a trace: its lengths, then drawn from them)")
    p.add_argument("--seed", type=int, default=0, help="the bench workloads' seed: same lengths and arrivals as `bench serve --seed`")
    p.add_argument("--arrival", default="poisson", choices=("poisson", "gamma"))
    p.add_argument("--cv", type=float, default=1.0)
    p.add_argument("--slo-ttft", type=float, default=4.0, help="seconds")
    p.add_argument("--slo-tpot", type=float, default=0.08, help="seconds per output token")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet both SLOs")


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=str(DEFAULT_PROFILE), help="a `distserve profile` JSON, or reference coefficients (latency-coefficients-*.json)")
    p.add_argument("--model", default="", help="with reference coefficients: which model (default: the file's first)")
    p.add_argument("--max-num-batched-tokens", type=int, default=0, help="engine token budget per step (0 = the workers' default: 256 for prefill workers on CPU, else 2048)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine sequences per step (the workers' default)")
    p.add_argument("--kv-dtype", default="auto", choices=("auto", "int8"))


def add_plan_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _profile_arguments(p)
    _objective_arguments(p)
    p.add_argument("--cores", type=int, default=0, help="CPU cores to place workers on (default: this machine's)")
    p.add_argument("--gpus", type=int, default=8, help="GPU profile: devices to place instances on")
    p.add_argument("--node-gpus", type=int, default=8, help="GPU profile: devices per node (an instance stays within one)")
    p.add_argument("--affinity", default="high", choices=("high", "low"),
                   help="GPU profile: high = KV may cross nodes (Algorithm 1), low = prefill and decode segments share nodes (Algorithm 2)")
    p.add_argument("--weights", default="", help="restrict to these weight formats (comma-separated)")
    p.add_argument("--threads", default="", help="restrict to these thread counts per worker")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    p.add_argument("--ceiling", action="store_true",
                   help="CPU profile: only the ceiling, the most any placement of the cores could serve (planner/ceiling.py); no search")
    p.add_argument("--against", type=float, default=0.0, help="with the ceiling: a measured goodput (req/s) to give the highest reachable ratio over")
    p.add_argument("--json", action="store_true")
    p.add_argument("--validate", action="store_true", help="run the real suite (distserve up + bench goodput) at the top placements, beside the simulation")
    p.add_argument("--validate-top", type=int, default=3)
    p.add_argument("--validate-rates", default="", help="rates to measure (default: 0.5x, 1x, 1.5x each placement's simulated goodput)")
    p.add_argument("--validate-model", default="", help="model the real suite serves (default: the profile's)")
    p.add_argument("--validate-requests", type=int, default=0, help="requests per measured rate (default: --num-requests)")
    p.add_argument("--watch", action="store_true", help="watch the pool's load in Redis and recommend role counts")
    p.add_argument("--redis-url", default=os.environ.get("DISTSERVE_REDIS_URL", "redis://127.0.0.1:6379/0"), help="[env DISTSERVE_REDIS_URL]")
    p.add_argument("--interval", type=float, default=5.0, help="--watch: seconds between reads")
    p.add_argument("--window", type=int, default=3, help="--watch: reads a change must persist before it is recommended")
    p.add_argument("--iterations", type=int, default=0, help="--watch: stop after this many reads (0 = until interrupted)")
    p.add_argument("--apply", action="store_true",
                   help="--watch: a recommendation that moves a worker between prefill and decode asks an elastic worker of that role to "
                        "change (distserve up --elastic); any other, or with no elastic worker there, prints the command that applies it")
    p.add_argument("--min-prefill", type=int, default=1, choices=(0, 1),
                   help="--watch: 0 lets the last prefill worker move to decode, the decode workers then prefilling every prompt "
                        "themselves (only for routers in --disagg-mode conditional or local)")
    p.add_argument("--watch-model", default="", help="--watch: the model whose workers to read (default: every worker)")
    sub = p.add_subparsers(dest="plan_cmd")
    add_simulate_arguments(sub.add_parser("simulate", help="replay a trace or workload on one placement; per-request TTFT/TPOT and attainment"))
    add_reference_arguments(sub.add_parser("reference", help="replay the DistServe authors' A100 runs; simulated vs real, and the goodput ratio"))
    add_measured_arguments(sub.add_parser("measured", help="measured runs of this machine (benchmarks/planner_validation.py) beside the simulation; serving costs fitted to some"))
    return p


def add_measured_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="point JSON files written by benchmarks/planner_validation.py")
    p.add_argument("--profile", default=str(DEFAULT_PROFILE))
    p.add_argument("--model", default="")
    p.add_argument("--fit", default="none", choices=("none", "cal", "all", "other-workload"),
                   help="serving costs: the profile's (none), fitted to the `cal` runs and judged on the `val` runs, fitted to all runs "
                        "(in sample), or per workload fitted to the other workload's runs (out of sample)")
    p.add_argument("--shared", action="store_true",
                   help="simulate each point with its engines slowed by the CPU others used during it (cores / (cores - others' cores))")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", default="", help="write every point, measured and simulated, and the fitted costs as JSON")


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    _profile_arguments(p)
    _objective_arguments(p)
    p.add_argument("--placement", required=True, help="NpMd (e.g. 1p1d), Nc (e.g. 2c) or the paper's c<tp><pp>d<tp><pp> (e.g. c21d11)")
    p.add_argument("--trace", default="", help="a trace file: reference runs JSON, a `bench serve --out` JSON, or JSONL of prompt_len/output_len/arrival_s")
    p.add_argument("--rate", type=float, default=1.0, help="without --trace: the workload's arrival rate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default="", help="weight format (CPU profiles; default: the profile's int8, else its first)")
    p.add_argument("--chunked", action="store_true", help="colocated workers use chunked prefill")
    for name in ("tp-prefill", "pp-prefill", "tp-decode", "pp-decode"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--transport", default="", help="KV transport of the profile (default: the profile's default)")
    p.add_argument("--step-overhead", type=float, default=None, help="seconds per engine step outside the latency model")
    p.add_argument("--seq-overhead", type=float, default=None, help="seconds per decoding sequence per step outside the latency model")
    p.add_argument("--per-request", action="store_true", help="print every request's TTFT and TPOT")
    p.add_argument("--out", default="", help="write the run as `bench serve --out` JSON (summary and every request)")
    p.add_argument("--json", action="store_true")


def add_reference_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=str(DEFAULT_REFERENCE), help="the reference folder (README.md, latency-coefficients-*.json, runs/)")
    p.add_argument("--mode", default="raw", choices=("raw", "fitted", "loo"),
                   help="raw: the coefficients alone; fitted: plus engine overheads and a prefill factor fitted to all runs; loo: fitted to the other runs")
    p.add_argument("--slo-ttft", type=float, default=0.2)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--only", default="", help="runs whose name contains this")
    p.add_argument("--goodput", action="store_true", help="also the simulated goodput per GPU of DistServe c21d11 and vLLM, and their ratio")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--plot", default="", help="write a PNG of attainment vs rate, real and simulated")
    p.add_argument("--json", action="store_true")


def _load(args):
    from distserve.planner.profile import load_profile

    path = Path(args.profile)
    if not path.exists():
        raise SystemExit(f"no profile at {path}: make one with `distserve profile --model ... --out {path}`")
    return load_profile(path, args.model or None)


def _limits(args):
    from distserve.planner.placement import EngineLimits

    return EngineLimits(args.max_num_batched_tokens, args.max_num_seqs, args.kv_dtype)


def _objective(args, device: str = "cpu"):
    from distserve.planner.search import Objective
    from distserve.planner.trace import load_trace

    trace = load_trace(args.workload[len("trace:"):]) if args.workload.startswith("trace:") else None
    n = args.num_requests or (1000 if device == "gpu" else 200)
    return Objective(args.slo_ttft, args.slo_tpot, args.attainment, args.workload, n, args.seed, args.arrival, args.cv, trace)


def plan_main(args) -> None:
    if args.plan_cmd == "simulate":
        return simulate_main(args)
    if args.plan_cmd == "reference":
        return reference_main(args)
    if args.plan_cmd == "measured":
        return measured_main(args)
    if args.watch:
        from distserve.planner.watch import watch_main

        return watch_main(args, _load(args))
    search_main(args)


def _ceiling(prof, o, cores: int, args):
    from distserve.planner.ceiling import ceiling

    lengths = [(r.prompt_len, r.output_len) for r in o.requests_at(1.0)]
    return ceiling(prof, lengths, cores, o.slo_tpot, _csv(args.weights) or None, args.max_num_seqs)


def search_main(args) -> None:
    from distserve.planner.ceiling import ceiling_line
    from distserve.planner.search import plan_cpu, plan_gpu

    prof = _load(args)
    o = _objective(args, prof.device)
    limits = _limits(args)
    notes: dict = {}
    cores = args.cores or prof.machine.get("cores") or os.cpu_count()
    ceil = _ceiling(prof, o, cores, args) if prof.device == "cpu" else None
    if args.ceiling:
        if ceil is None:
            raise SystemExit("--ceiling counts core-seconds: it needs a CPU profile")
        print(json.dumps(ceil.to_dict() | {"against": args.against or None}) if args.json
              else ceiling_line(ceil, o.workload, o.slo_tpot, args.against))
        return
    if prof.device == "gpu":
        ranked, notes = plan_gpu(prof, args.gpus, o, limits, args.node_gpus, args.affinity)
        budget = f"{args.gpus} GPUs ({args.node_gpus} per node, {args.affinity} node affinity)"
    else:
        ranked = plan_cpu(prof, cores, o, limits, _csv(args.weights) or None, _csv(args.threads, int) or None)
        budget = f"{cores} cores"
    if args.json:
        print(json.dumps({"budget": budget, "objective": _objective_dict(o), "ranked": [_goodput_dict(g, prof) for g in ranked[: args.top]],
                          "ceiling": ceil.to_dict() if ceil else None}))
    else:
        print(plan_table(prof, ranked[: args.top], o, budget, notes))
        if ceil is not None:
            print(ceiling_line(ceil, o.workload, o.slo_tpot, args.against))
    if args.validate and prof.device == "cpu":
        from distserve.planner.validate import validate

        validate(prof, [g for g in ranked if g.rate > 0][: args.validate_top], o, args)
    elif args.validate:
        print("--validate runs the real suite on this machine; a GPU profile has nothing here to run", file=sys.stderr)


def _objective_dict(o) -> dict:
    d = asdict(o)
    d.pop("trace")
    return d


def _goodput_dict(g, prof) -> dict:
    return {"placement": g.placement.label(prof.device), "units": g.units, "goodput_rps": g.rate, "per_unit": g.per_unit, "bounded": g.bounded,
            "at_goodput": {k: (v if isinstance(v, float) and math.isfinite(v) else None) for k, v in g.at_goodput.items()},
            "command": g.placement.up_command(prof.model.name) if prof.device == "cpu" else None, "points": g.points}


def plan_table(prof, ranked, o, budget: str, notes: dict | None = None) -> str:
    unit = "core" if prof.device == "cpu" else "GPU"
    src = (f"lengths of {o.trace.name} ({o.num_requests} requests, seed {o.seed}, poisson)" if o.trace is not None
           else f"{o.workload} ({o.num_requests} requests, seed {o.seed}, {o.arrival})")
    lines = [f"{prof.model.name}, profile of {prof.machine.get('cpu') or prof.machine.get('gpu')}; {budget}; workload {src}",
             f"SLO TTFT <= {o.slo_ttft:g}s, TPOT <= {o.slo_tpot * 1e3:g}ms for {o.target:.0%} of requests", ""]
    if notes:
        for phase in ("prefill", "decode"):
            best = notes.get(phase) or []
            if best:
                lines.append(f"{phase} alone (Algorithm 1), per GPU: " + ", ".join(f"tp{c.tp}pp{c.pp} {c.per_gpu:.2f}" for c in best[:4]))
        lines.append("")
    lines.append(f"{'#':>2}  {'placement':46}{unit + 's':>6}{'goodput':>9}{'per ' + unit:>10}{'TTFT p90':>10}{'TPOT p90':>10}  meets TTFT/TPOT")
    for i, g in enumerate(ranked, 1):
        a = g.at_goodput
        ttft = f"{a['ttft_p90']:.2f}s" if a else "-"
        tpot = f"{a['tpot_p90'] * 1e3:.0f}ms" if a else "-"
        meets = f"{a['ttft_attainment']:.0%}/{a['tpot_attainment']:.0%}" if a else "-"
        rate = f"{g.rate:.3f}" + ("" if g.bounded else "+")
        lines.append(f"{i:>2}  {g.placement.label(prof.device):46}{g.units:>6}{rate:>9}{g.per_unit:>10.3f}{ttft:>10}{tpot:>10}  {meets}")
    if ranked and ranked[0].rate > 0:
        best = ranked[0].placement
        lines.append("")
        if prof.device == "cpu":
            lines.append(f"best: {best.up_command(prof.model.name)}")
            if best.compose_command():
                lines.append(f"  or: {best.compose_command()}")
        else:
            lines.append(f"best: {best.label('gpu')}")
    elif ranked:
        lines.append("\nno placement reaches the attainment target at any rate: the SLOs are tighter than an idle worker serves")
    return "\n".join(lines)


# -- distserve plan simulate --------------------------------------------------------------------


def simulate_main(args) -> None:
    from dataclasses import replace

    from distserve.bench.metrics import summarize
    from distserve.bench.report import serve_table
    from distserve.bench.serve import RunConfig, git_commit
    from distserve.planner.placement import parse_placement, suite_spec
    from distserve.planner.simulator import simulate
    from distserve.planner.trace import load_trace, workload_trace

    prof = _load(args)
    if args.step_overhead is not None or args.seq_overhead is not None:
        c = prof.costs
        prof = prof.with_costs(replace(c, step_s=c.step_s if args.step_overhead is None else args.step_overhead,
                                       seq_s=c.seq_s if args.seq_overhead is None else args.seq_overhead))
    weights = args.weights or ("int8" if "int8" in prof.weight_formats else prof.weight_formats[0])
    placement = parse_placement(args.placement, threads=args.threads, weights=weights, chunked=args.chunked,
                                tp_prefill=args.tp_prefill, pp_prefill=args.pp_prefill, tp_decode=args.tp_decode, pp_decode=args.pp_decode)
    if args.trace:
        trace = load_trace(args.trace)
    else:
        trace = workload_trace(args.workload, args.num_requests or 200, args.rate, args.seed, args.arrival, args.cv)
    suite = suite_spec(prof, placement, _limits(args), args.transport or None)
    results = simulate(suite, trace.requests, args.seed)
    cfg = RunConfig(workload=args.trace or args.workload, num_requests=len(results), rate=trace.rate if args.trace else args.rate, arrival=args.arrival, cv=args.cv,
                    seed=args.seed, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot,
                    extra={"simulated": True, "profile": str(args.profile), "placement": placement.label(prof.device)})
    doc = {"commit": git_commit(), "target": f"simulated {placement.label(prof.device)}", "model": prof.model.name, "config": asdict(cfg),
           "rate": cfg.rate, "summary": summarize(results, args.slo_ttft, args.slo_tpot), "requests": [r.to_dict() for r in results]}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    if args.json:
        print(json.dumps(doc if args.per_request else {k: v for k, v in doc.items() if k != "requests"}))
        return
    print(serve_table(doc))
    if trace.measured:
        print("\n" + measured_table(trace, results, args.slo_ttft, args.slo_tpot))
    if args.per_request:
        print(f"\n{'#':>5}{'prompt':>8}{'output':>8}{'arrival s':>11}{'TTFT ms':>10}{'TPOT ms':>9}" + ("  real TTFT/TPOT ms" if trace.measured else ""))
        for i, r in enumerate(results):
            real = f"  {trace.measured[i].ttft * 1e3:.1f}/{trace.measured[i].tpot * 1e3:.1f}" if trace.measured else ""
            print(f"{r.index:>5}{r.prompt_len:>8}{r.output_len:>8}{r.send_s:>11.3f}{r.ttft * 1e3:>10.1f}{r.tpot * 1e3:>9.1f}{real}")


def measured_table(trace, results, slo_ttft: float, slo_tpot: float) -> str:
    from distserve.planner.reference import Side

    real = Side.of([m.ttft for m in trace.measured], [m.tpot for m in trace.measured], slo_ttft, slo_tpot)
    ok = [r for r in results if r.ok]
    sim = Side.of([r.ttft for r in ok], [r.tpot for r in ok], slo_ttft, slo_tpot)
    sim.attainment = sum(r.ok and r.ttft <= slo_ttft and r.tpot <= slo_tpot for r in results) / max(1, len(results))
    rows = [("TTFT p50", real.ttft_p50, sim.ttft_p50), ("TTFT p90", real.ttft_p90, sim.ttft_p90),
            ("TPOT p50", real.tpot_p50, sim.tpot_p50), ("TPOT p90", real.tpot_p90, sim.tpot_p90)]
    lines = ["the trace's own measurements against the simulation:", f"{'':10}{'real ms':>10}{'sim ms':>10}"]
    lines += [f"{k:10}{a * 1e3:>10.1f}{b * 1e3:>10.1f}" for k, a, b in rows]
    lines.append(f"attainment (TTFT <= {slo_ttft:g}s, TPOT <= {slo_tpot * 1e3:g}ms): real {real.attainment:.1%}, simulated {sim.attainment:.1%} "
                 f"({100 * (sim.attainment - real.attainment):+.1f} points)")
    return "\n".join(lines)


# -- distserve plan reference ---------------------------------------------------------------------


def reference_main(args) -> None:
    from distserve.planner import reference as ref

    folder = Path(args.dir)
    rows, notes = ref.compare(folder, args.mode, args.slo_ttft, args.slo_tpot, args.only)
    out = {"mode": args.mode, "slo_ttft": args.slo_ttft, "slo_tpot": args.slo_tpot,
           "overheads": {e: {"step_s": n["step_s"], "seq_s": n["seq_s"], "prefill_scale": n["prefill_scale"]} for e, n in notes.items()},
           "mean_abs_error_points": {e: ref.mean_abs_error(rows, e) for e in ("distserve", "vllm")},
           "runs": [{"run": c.run.name, "engine": c.run.engine, "placement": c.run.placement, "labelled": c.run.labelled,
                     "real": asdict(c.real), "sim": asdict(c.sim), "error_points": c.error_points} for c in rows]}
    if args.goodput:
        out["goodput"] = ref.goodput_ratio(folder, out["overheads"] if args.mode != "raw" else None, args.slo_ttft, args.slo_tpot)
    if args.plot:
        ref.plot(rows, Path(args.plot), f"OPT-13B on A100s, real vs simulated ({args.mode})")
    if args.json:
        print(json.dumps(out))
        return
    print(ref.table(rows, args.slo_ttft, args.slo_tpot, markdown=args.markdown))
    print()
    for e in ("distserve", "vllm"):
        if e in notes:
            o = notes[e]
            extra = "" if args.mode == "raw" else (f"; fitted to all its runs: {o['step_s'] * 1e3:g} ms per step, {o['seq_s'] * 1e3:g} ms per "
                                                   f"sequence per step, prefill at {o['prefill_scale']:g}x the coefficients")
            loo = "" if args.mode != "loo" else " (each run with overheads and prefill factor fitted to the others)"
            print(f"{e}: mean |attainment error| {out['mean_abs_error_points'][e]:.1f} points over its labelled runs{loo}{extra}")
    if "goodput" in out:
        g = out["goodput"]
        print(f"\nsimulated goodput (>= 90% of requests meet both SLOs; lengths of {g['lengths_from']}, Poisson arrivals):")
        print(f"{'SLO TTFT/TPOT':>16}{'DistServe c21d11 req/s (per GPU)':>34}{'vLLM req/s (per GPU)':>22}{'ratio per GPU':>15}")
        for row in g["scales"]:
            d, v = row["distserve"], row["vllm"]
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
            print(f"{row['slo_ttft'] * 1e3:>9.0f}/{row['slo_tpot'] * 1e3:.0f}ms{d['goodput_rps']:>22.2f} ({d['per_gpu']:.2f}){v['goodput_rps']:>16.2f} ({v['per_gpu']:.2f}){ratio:>15}")
        print(f"(the paper: about {g['paper_ratio']:g}x for OPT-13B on the chatbot workload; '-': vLLM meets the target at no rate)")


# -- distserve plan measured ----------------------------------------------------------------------


def measured_main(args) -> None:
    from distserve.planner import measured as ms

    prof = _load(args)
    points = ms.load_points(args.runs)
    fitted: dict[str, dict] = {}
    if args.fit == "none":
        rows = ms.compare(prof, [p for p in points if p.kind != "cal"] or points, args.shared)
    elif args.fit in ("cal", "all"):
        fit_on = [p for p in points if args.fit == "all" or p.kind == "cal"]
        costs, total = ms.fit_costs(prof, fit_on, shared=args.shared)
        fitted["all" if args.fit == "all" else "cal"] = asdict(costs) | {"loss": total, "runs": len(fit_on)}
        rows = ms.compare(prof.with_costs(costs), points if args.fit == "all" else [p for p in points if p.kind != "cal"], args.shared)
    else:
        rows = []
        for w in sorted({p.workload for p in points}):
            costs, total = ms.fit_costs(prof, [p for p in points if p.workload != w], shared=args.shared)
            fitted[w] = asdict(costs) | {"loss": total, "fitted_on": "the other workloads"}
            rows += ms.compare(prof.with_costs(costs), [p for p in points if p.workload == w], args.shared)
    print(ms.table(rows, markdown=args.markdown))
    for name, c in fitted.items():
        print(f"costs for {name}: {c['step_s'] * 1e3:g} ms per step, {c['seq_s'] * 1e3:g} ms per decoding sequence per step, "
              f"{c['token_s'] * 1e3:g} ms per token to the client")
    gp = ms.goodputs(rows)
    print(f"\n{'placement':24}{'workload':>9}{'goodput meas/sim (highest passing)':>36}{'(crossing of 90%)':>20}")
    for g in gp:
        print(f"{g['placement']:24}{g['workload']:>9}{g['measured_highest_passing']:>18g} / {g['simulated_highest_passing']:<15g}"
              f"{g['measured_crossing']:>9.2f} / {g['simulated_crossing']:.2f}")
    if args.out:
        doc = {"profile": args.profile, "fit": args.fit, "shared": args.shared, "costs": fitted, "mean_abs_error_points": ms.mean_abs_error(rows), "goodput": gp,
               "points": [{"name": c.point.name, "placement": c.point.placement.label(), "workload": c.point.workload, "seed": c.point.seed,
                           "rate": c.point.rate, "num_requests": c.point.num_requests, "load1_before": c.point.load1_before, "foreign_cores": c.point.foreign_cores,
                           "measured": asdict(c.measured), "simulated": asdict(c.simulated), "error_points": c.error_points} for c in rows]}
        Path(args.out).write_text(json.dumps(doc, indent=1))
