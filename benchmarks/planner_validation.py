"""The planner's measured validation on this machine (issue 14, phase 2): one `distserve up` per
placement, then every point of a plan of (workload, seed, rate, requests) measured on it with
`bench serve`'s own code, one after the other, each point written as its own JSON.

    python benchmarks/planner_validation.py --placement 1p1d --weights int8 \
        --point cal:chat:1:1.2:40 --point val:chat:0:0.8:60 ... --out-dir benchmarks/results/planner_validation

A point is KIND:WORKLOAD:SEED:RATE:REQUESTS (KIND: `cal` for calibration runs, `val` for validation
runs; the kinds only label the files). The machine is shared: before each point the script waits
(30 s at a time, up to --max-wait-s) until the 1-minute load average is below --max-load, then takes
/tmp/distserve-cpu.lock (flock, the project's convention for benchmarks) for the run itself, and
records the load average before and after beside the point. The suite stays up, idle, between points.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distserve.bench.serve import RunConfig, build_requests, git_commit, measure, parse_target, tokenizer_for, warm_up  # noqa: E402
from distserve.planner.placement import parse_placement  # noqa: E402
from distserve.planner.validate import up_args  # noqa: E402

LOCK = "/tmp/distserve-cpu.lock"
SLO = {"chat": (4.0, 0.08), "code": (1.1, 0.082), "summarize": (12.0, 0.1)}  # DESIGN.md's chat bar; slo.env for the others


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(max_load: float, max_wait_s: float) -> tuple[float, float]:
    """Sleeps 30 s at a time until the 1-minute load is below max_load (or max_wait_s passed): (load, waited s)."""
    t0 = time.monotonic()
    while load1() >= max_load and time.monotonic() - t0 < max_wait_s:
        print(f"  load {load1():.2f} >= {max_load}: waiting", flush=True)
        time.sleep(30)
    return load1(), time.monotonic() - t0


def _tree(root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


def _part(pid: int, root: int) -> str:
    """Which part of the suite a process is: `client` (this script), a worker or the router by the log
    file its stdout goes to (forked children share up's command line), else its command name."""
    if pid == root:
        return "client"
    try:
        out = os.readlink(f"/proc/{pid}/fd/1")
        if out.endswith(".log"):
            return Path(out).stem
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


def cpu_ticks(root: int) -> tuple[int, int, dict[str, int]]:
    """(busy ticks of the whole machine, ticks of `root`'s process tree, those ticks per part of the
    suite): their difference over a run is the CPU that others used meanwhile, and what each part of
    the suite used (children that exited count neither way)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # less idle and iowait
    parts: dict[str, int] = {}
    for pid in _tree(root):
        try:
            f = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            name = _part(pid, root)
            parts[name] = parts.get(name, 0) + int(f[11]) + int(f[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return busy, sum(parts.values()), parts


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


async def session(args, points: list[tuple[str, str, int, float, int]]) -> None:
    from distserve.up import UpProcess

    placement = parse_placement(args.placement, threads=args.threads, weights=args.weights, chunked=args.chunked)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="distserve-plan-validate-"))
    t_start = time.monotonic()
    extra = [] if args.prefix_cache == "on" else ["--worker-arg=--prefix-cache=off"]
    up = UpProcess(tmp, *up_args(placement, args.model), *extra, "--http-port", "-1")
    print(f"{placement.label()}: up in {time.monotonic() - t_start:.0f} s (logs in {tmp})", flush=True)
    if up.tls_ca:
        os.environ["DISTSERVE_TLS_CA"] = up.tls_ca
    target = parse_target(f"distserve://{up.target}", args.model, 600.0, None)
    tok = tokenizer_for(args.model)
    try:
        warmed = False
        for kind, workload, seed, rate, n in points:
            base = build_requests(workload, n, tok, seed)
            if not warmed:
                await warm_up(target, base, 2)
                warmed = True
            load_before, waited = wait_quiet(args.max_load, args.max_wait_s)
            slo_ttft, slo_tpot = SLO[workload]
            cfg = RunConfig(workload=workload, num_requests=n, rate=rate, seed=seed, slo_ttft=slo_ttft, slo_tpot=slo_tpot)
            with open(LOCK, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                load_locked = load1()
                busy0, mine0, parts0 = cpu_ticks(os.getpid())
                t0 = time.time()
                run = await measure(target, base, cfg)
                t1 = time.time()
                busy1, mine1, parts1 = cpu_ticks(os.getpid())
            hz = os.sysconf("SC_CLK_TCK")
            foreign = max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / hz / (t1 - t0))  # cores others used, on average
            suite_cores = (mine1 - mine0) / hz / (t1 - t0)
            part_cores = {k: round((v - parts0.get(k, 0)) / hz / (t1 - t0), 3) for k, v in sorted(parts1.items())}
            s = run["summary"]
            name = f"{kind}_{placement.label().replace(' ', '').replace('+', '')}_{workload}_s{seed}_r{rate:g}_n{n}.json"
            doc = {"kind": kind, "placement": placement.label(), "placement_spec": asdict(placement), "model": args.model,
                   "workload": workload, "seed": seed, "rate": rate, "num_requests": n, "slo_ttft": slo_ttft, "slo_tpot": slo_tpot,
                   "load1_before": round(load_before, 2), "load1_locked": round(load_locked, 2), "load1_after": round(load1(), 2),
                   "waited_s": round(waited), "prefix_cache": args.prefix_cache, "foreign_cores": round(foreign, 3), "suite_cores": round(suite_cores, 3),
                   "part_cores": part_cores, "unix_start": t0, "seconds": round(t1 - t0, 1), "commit": git_commit(),
                   "cpu": cpu_model(), "config": asdict(cfg), **run}
            (out_dir / name).write_text(json.dumps(doc))
            print(f"  {kind} {workload} seed {seed} @ {rate:g} req/s x{n}: attainment {s['attainment']:.0%} "
                  f"(TTFT p90 {s['ttft']['p90']:.2f}s, TPOT p90 {s['tpot']['p90'] * 1e3:.0f}ms), load {load_before:.2f}->{load1():.2f}, "
                  f"others {foreign:.2f} cores, suite {part_cores}, "
                  f"{t1 - t0:.0f} s -> {name}", flush=True)
    finally:
        await target.close()
        code = up.stop()
        if code not in (0, None):
            print(f"warning: distserve up exited with {code} (logs in {tmp})", flush=True)


def parse_point(text: str) -> tuple[str, str, int, float, int]:
    kind, workload, seed, rate, n = text.split(":")
    return kind, workload, int(seed), float(rate), int(n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--placement", required=True, help="1p1d, 2c, ...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default="int8")
    p.add_argument("--chunked", action="store_true")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--point", action="append", default=[], help="KIND:WORKLOAD:SEED:RATE:REQUESTS, in the order to run")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results" / "planner_validation"))
    p.add_argument("--max-load", type=float, default=0.6)
    p.add_argument("--max-wait-s", type=float, default=300.0)
    p.add_argument("--prefix-cache", choices=("on", "off"), default="off",
                   help="the workers' prefix cache (default off: the simulator models no reuse, and a plan that repeats a "
                        "seed at several rates on one suite would find 92-95%% of each later point's prompts cached)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the suite on TERM too (a background job ignores INT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    asyncio.run(session(args, [parse_point(x) for x in args.point]))


if __name__ == "__main__":
    main()
