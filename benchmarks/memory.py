"""Memory of `distserve up --prefill 1 --decode 1`: PSS of the worker processes with and without
shared weights.

For each weights format (fp32, int8) and sharing (off, on) the script starts the suite, sends a few
requests, and reads /proc/PID/smaps_rollup of the two workers: Pss (proportional set size: a page
mapped by two processes counts half in each), Pss_Anon (private memory: Python, torch, the runner's
own copies), Pss_File (mapped files: libraries and, when shared, the weight file). The figure the
issue asks for is `ratio = shared sum / one unshared worker`: two workers that share their weights
should cost about one model's worth of weight memory, not two.

    python benchmarks/memory.py [--model smollm2-135m] [--formats fp32,int8] [--json]

The KV cache is an anonymous mapping committed page by page (`distserve.engine.kv_cache`), so its
capacity (--kv-cache-bytes) costs only what requests touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distserve.client import Client  # noqa: E402
from distserve.up import UpProcess  # noqa: E402


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup fields in bytes."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def workers_of(parent: int) -> dict[str, int]:
    """role -> pid of the `distserve serve prefill|decode` children of the up process."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"serve" in cmd:
            role = cmd[cmd.index(b"serve") + 1].decode()
            if role in ("prefill", "decode"):
                found[role] = int(d.name)
    return found


def measure(model: str, weights: str, share: str, requests: int = 4) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        up = UpProcess(Path(tmp), "--model", model, "--prefill", "1", "--decode", "1", "--weights", weights,
                       "--share-weights", share)
        try:
            with Client(up.target, timeout_s=300) as c:
                for i in range(requests):
                    c.generate(f"Tell me about the number {i}.", max_tokens=16, temperature=0.0, chat=True)
            time.sleep(1.0)
            pids = workers_of(up.proc.pid)
            per = {role: rollup(pid) for role, pid in sorted(pids.items())}
        finally:
            up.stop()
    mb = lambda v: round(v / 2**20, 1)  # noqa: E731
    return {
        "weights": weights,
        "share_weights": share,
        "workers": {role: {k: mb(r.get(k, 0)) for k in ("Rss", "Pss", "Pss_Anon", "Pss_File")} for role, r in per.items()},
        "pss_sum_mib": mb(sum(r["Pss"] for r in per.values())),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", default="fp32,int8")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = {"model": args.model, "runs": []}
    for fmt in args.formats.split(","):
        off = measure(args.model, fmt, "off")
        on = measure(args.model, fmt, "on")
        single = sum(w["Pss"] for w in off["workers"].values()) / max(1, len(off["workers"]))
        result["runs"] += [off, on]
        result[f"{fmt}_single_worker_pss_mib"] = round(single, 1)
        result[f"{fmt}_unshared_sum_pss_mib"] = off["pss_sum_mib"]
        result[f"{fmt}_shared_sum_pss_mib"] = on["pss_sum_mib"]
        result[f"{fmt}_ratio_shared_sum_to_single"] = round(on["pss_sum_mib"] / single, 2)
    if args.json:
        print(json.dumps(result))
    else:
        for run in result["runs"]:
            ws = ", ".join(f"{role} Pss {w['Pss']} MiB (anon {w['Pss_Anon']}, file {w['Pss_File']})" for role, w in run["workers"].items())
            print(f"{run['weights']:>5} share={run['share_weights']:<3} sum Pss {run['pss_sum_mib']:7.1f} MiB  [{ws}]")
        for fmt in args.formats.split(","):
            print(f"{fmt}: shared sum / single unshared worker = {result[f'{fmt}_ratio_shared_sum_to_single']}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("DISTSERVE_LOG_LEVEL", "warning")
    main()
