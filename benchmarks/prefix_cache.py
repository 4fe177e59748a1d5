"""Prefix caching and KV-aware routing, measured on this machine (docs/prefix-caching.md).

Parts (each starts its own `distserve up` suites, one after the other):
- cache: 1P+1D with `--prefix-cache on` and `off`, same seeds: `bench goodput` on the shared-prefix
  and multiturn workloads (goodput and, at the lowest rate both measured, TTFT p50), and one
  `bench serve` run of the random chat workload (no regression where nothing repeats).
- routing: 2P+1D with `--routing kv` and `--routing load`: one `bench serve` run of the multiturn
  workload each, prefix-cache hit rate and TTFT side by side.

Prints one table per part and writes every run's JSON under --out-dir. Timings are figures, not asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distserve.up import UpProcess

SUITES = {
    "cache-on": ("--prefill", "1", "--decode", "1"),
    "cache-off": ("--prefill", "1", "--decode", "1", "--worker-arg=--prefix-cache=off"),
    "route-kv": ("--prefill", "2", "--decode", "1"),
    "route-load": ("--prefill", "2", "--decode", "1", "--router-arg=--routing=load"),
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def bench(argv: list[str], up: UpProcess, out: Path) -> dict:
    env = dict(os.environ)
    if up.tls_ca:
        env["DISTSERVE_TLS_CA"] = up.tls_ca
    cmd = [sys.executable, "-m", "distserve.cli", "bench", *argv, "--target", f"distserve://{up.target}", "--no-progress", "--out", str(out)]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def with_suite(name: str, args, body) -> None:
    with tempfile.TemporaryDirectory(prefix=f"prefix-{name}-") as tmp:
        up = UpProcess(Path(tmp), "--model", args.model, *SUITES[name], timeout_s=300)
        try:
            body(up)
        except BaseException:
            up.dump()
            raise
        finally:
            up.stop()


def common(args, workload: str) -> list[str]:
    return ["--workload", workload, "--num-requests", str(args.num_requests), "--seed", str(args.seed),
            "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot)]


def part_cache(args, out_dir: Path) -> dict:
    res: dict = {}
    for name in ("cache-on", "cache-off"):
        def body(up, name=name):
            for wl in ("shared-prefix", "multiturn"):
                res[(name, wl)] = bench(["goodput", *common(args, wl), "--rates", args.rates, "--bisect-steps", str(args.bisect_steps),
                                         "--label", name], up, out_dir / f"{name}-{wl}-goodput.json")
            res[(name, "chat")] = bench(["serve", *common(args, "chat"), "--rate", str(args.chat_rate)], up, out_dir / f"{name}-chat.json")
        with_suite(name, args, body)
    rows = []
    for wl in ("shared-prefix", "multiturn"):
        on, off = (res[(n, wl)]["systems"][0] for n in ("cache-on", "cache-off"))
        rate = min(float(r) for r in args.rates.split(","))
        p_on = next(p for p in on["points"] if p["rate"] == rate)["summary"]
        p_off = next(p for p in off["points"] if p["rate"] == rate)["summary"]
        rows.append({
            "workload": wl, "rate": rate,
            "ttft_p50_on": p_on["ttft"]["p50"], "ttft_p50_off": p_off["ttft"]["p50"],
            "ttft_p50_ratio": p_off["ttft"]["p50"] / p_on["ttft"]["p50"] if p_on["ttft"]["p50"] else None,
            "hit_rate_on": p_on.get("cache_hit_rate"), "hit_rate_off": p_off.get("cache_hit_rate"),
            "goodput_on": on["goodput_rps"], "goodput_on_bounded": on["bounded"],
            "goodput_off": off["goodput_rps"], "goodput_off_bounded": off["bounded"],
            "goodput_ratio": on["goodput_rps"] / off["goodput_rps"] if off["goodput_rps"] else None,
        })
    chat = {n: res[(n, "chat")]["summary"] for n in ("cache-on", "cache-off")}
    rows.append({"workload": "chat", "rate": args.chat_rate,
                 **{f"{k}_{n.split('-')[1]}": v for n, s in chat.items() for k, v in
                    (("ttft_p50", s["ttft"]["p50"]), ("tpot_p50", s["tpot"]["p50"]), ("attainment", s["attainment"]),
                     ("hit_rate", s.get("cache_hit_rate")))}})
    return {"rows": rows}


def part_routing(args, out_dir: Path) -> dict:
    rows = []
    for name in ("route-kv", "route-load"):
        def body(up, name=name):
            run = bench(["serve", *common(args, "multiturn"), "--rate", str(args.routing_rate)], up, out_dir / f"{name}-multiturn.json")
            s = run["summary"]
            rows.append({"routing": name.split("-")[1], "rate": args.routing_rate, "hit_rate": s.get("cache_hit_rate"),
                         "ttft_p50": s["ttft"]["p50"], "ttft_p90": s["ttft"]["p90"], "tpot_p50": s["tpot"]["p50"],
                         "attainment": s["attainment"], "failed": s["failed"]})
        with_suite(name, args, body)
    return {"rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--parts", default="cache,routing")
    p.add_argument("--num-requests", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rates", default="0.5,1,2,4", help="bench goodput's coarse sweep (req/s)")
    p.add_argument("--bisect-steps", type=int, default=2)
    p.add_argument("--chat-rate", type=float, default=0.8)
    p.add_argument("--routing-rate", type=float, default=1.5)
    p.add_argument("--slo-ttft", type=float, default=4.0)
    p.add_argument("--slo-tpot", type=float, default=0.08)
    p.add_argument("--out-dir", default="benchmarks/results/prefix_cache")
    args = p.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "model": args.model,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "unix_time": time.time()}
    for part in args.parts.split(","):
        result[part] = {"cache": part_cache, "routing": part_routing}[part](args, out_dir)
        for row in result[part]["rows"]:
            print(json.dumps(row), flush=True)
    (out_dir / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
