"""Memory of `distserve up --prefill 1 --decode 1`: PSS of the worker processes with and without
sharing.

For each weights format (fp32, int8) the script starts the suite twice and sends a few requests:
- unshared: `--share-weights off --preload off`: every worker a fresh interpreter with its own copy of
  the weights;
- shared: `--share-weights on --preload on` (the defaults for int8): the workers map one read-only
  weight file and are forked from the `up` process after it imported torch and the engine, so they
  also share those pages.
It reads /proc/PID/smaps_rollup of the workers: Pss (proportional set size: a page mapped by two
processes counts half in each), Pss_Anon (private memory: Python, torch, the runner's own copies),
Pss_File (mapped files: libraries and, when shared, the weight file). With preload the `up` process
holds its share of the pages its workers inherited, so its Pss is added to the sum (`up` in the
figures); a spawned-workers run leaves it out (there `up` holds nothing of theirs).
The figure the issue asks for is `ratio = shared sum / one unshared worker`.

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
    """role -> pid of the prefill/decode worker children of the up process: forked ones are named
    ds-<role>-N, spawned ones run `distserve serve <role>`."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != parent:
            continue
        if comm.startswith("ds-"):
            role = comm[3:].rsplit("-", 1)[0]
        elif b"serve" in cmd:
            role = cmd[cmd.index(b"serve") + 1].decode()
        else:
            continue
        if role in ("prefill", "decode"):
            found[role] = int(d.name)
    return found


def measure(model: str, weights: str, shared: bool, requests: int = 4) -> dict:
    flag = "on" if shared else "off"
    with tempfile.TemporaryDirectory() as tmp:
        up = UpProcess(Path(tmp), "--model", model, "--prefill", "1", "--decode", "1", "--weights", weights,
                       "--share-weights", flag, "--preload", flag)
        try:
            with Client(up.target, timeout_s=300, **up.client_tls) as c:
                for i in range(requests):
                    c.generate(f"Tell me about the number {i}.", max_tokens=16, temperature=0.0, chat=True)
            time.sleep(1.0)
            pids = workers_of(up.proc.pid)
            per = {role: rollup(pid) for role, pid in sorted(pids.items())}
            if shared:
                per["up"] = rollup(up.proc.pid)
        finally:
            up.stop()
    mb = lambda v: round(v / 2**20, 1)  # noqa: E731
    return {
        "weights": weights,
        "share_weights": flag,
        "preload": flag,
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
        off = measure(args.model, fmt, shared=False)
        on = measure(args.model, fmt, shared=True)
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
            print(f"{run['weights']:>5} shared={run['share_weights']:<3} sum Pss {run['pss_sum_mib']:7.1f} MiB  [{ws}]")
        for fmt in args.formats.split(","):
            print(f"{fmt}: shared sum / single unshared worker = {result[f'{fmt}_ratio_shared_sum_to_single']}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("DISTSERVE_LOG_LEVEL", "warning")
    main()
