"""Request traces for the simulator: the bench workloads, or files of recorded requests.

- `workload_trace("chat", n, rate, seed=...)`: the very lengths and arrival times `distserve bench
  serve --workload chat --num-requests n --rate r --seed s` sends (bench.workloads: the length mix
  from `lengths`, arrivals from `arrival_times`), without building prompts.
- `load_trace(path)` reads
  * the reference format `{"columns": [prompt_len, output_len, issue_time_s, ttft_ms, tpot_ms, ...],
    "rows": [...]}` (../shared/reference/distserve-opt13b-a100/runs/*.json);
  * a `distserve bench serve --out` JSON (`requests` with prompt_len, output_len, send_s and the
    measured token times), so a real run's exact send times replay;
  * JSON lines of `{"prompt_len", "output_len", "arrival_s"}`.
  Where the file holds measurements, they come back as `Measured` records beside the trace.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from distserve.bench.metrics import RequestResult
from distserve.bench.workloads import arrival_times, lengths
from distserve.planner.sim_engine import TraceRequest


@dataclass(frozen=True, slots=True)
class Measured:
    """What a real run measured for one request (seconds)."""

    ttft: float
    tpot: float


@dataclass(slots=True)
class Trace:
    requests: list[TraceRequest]
    measured: list[Measured] | None = None  # per request, when the file holds a real run
    name: str = ""

    @property
    def rate(self) -> float:
        """Mean arrival rate over the trace (requests / span of send times)."""
        if len(self.requests) < 2:
            return 0.0
        span = self.requests[-1].arrival_s - self.requests[0].arrival_s
        return (len(self.requests) - 1) / span if span > 0 else 0.0


def workload_trace(workload: str, n: int, rate: float, seed: int = 0, arrival: str = "poisson", cv: float = 1.0) -> Trace:
    times = arrival_times(n, rate, arrival, cv, seed)
    reqs = [TraceRequest(i, p, o, t) for i, ((p, o), t) in enumerate(zip(lengths(workload, n, seed), times))]
    return Trace(reqs, name=f"{workload} n={n} @ {rate:g} req/s seed {seed}")


def with_rate(trace: Trace, rate: float, seed: int = 0, n: int = 0) -> Trace:
    """The trace's lengths with fresh Poisson arrivals at `rate` (to find the goodput of a recorded length
    mix); with `n`, that many requests: the trace's own first, then lengths drawn from it (seeded)."""
    n = n or len(trace.requests)
    rng = random.Random(f"trace-lengths:{seed}")
    pairs = [(r.prompt_len, r.output_len) for r in trace.requests]
    pairs += [(lambda r: (r.prompt_len, r.output_len))(rng.choice(trace.requests)) for _ in range(n - len(pairs))]
    times = arrival_times(n, rate, "poisson", 1.0, seed)
    reqs = [TraceRequest(i, p, o, t) for i, ((p, o), t) in enumerate(zip(pairs[:n], times))]
    return Trace(reqs, name=f"{trace.name} lengths @ {rate:g} req/s")


def _from_reference(d: dict, name: str) -> Trace:
    cols = d["columns"]
    ix = {c: cols.index(c) for c in cols}
    rows = sorted(d["rows"], key=lambda r: r[ix["issue_time_s"]])
    t0 = rows[0][ix["issue_time_s"]] if rows else 0.0
    reqs = [TraceRequest(i, int(r[ix["prompt_len"]]), int(r[ix["output_len"]]), float(r[ix["issue_time_s"]]) - t0)
            for i, r in enumerate(rows)]
    measured = None
    if "ttft_ms" in ix and "tpot_ms" in ix:
        measured = [Measured(r[ix["ttft_ms"]] / 1e3, r[ix["tpot_ms"]] / 1e3) for r in rows]
    return Trace(reqs, measured, name)


def _from_bench(d: dict, name: str) -> Trace:
    results = sorted((RequestResult.from_dict(x) for x in d["requests"]), key=lambda r: r.send_s)
    t0 = results[0].send_s if results else 0.0
    reqs = [TraceRequest(i, r.prompt_len, r.output_len, r.send_s - t0) for i, r in enumerate(results)]
    measured = [Measured(r.ttft, r.tpot) for r in results]
    return Trace(reqs, measured, name)


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    text = path.read_text()
    name = path.stem
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        d = None
    if isinstance(d, dict) and "rows" in d and "columns" in d:
        return _from_reference(d, name)
    if isinstance(d, dict) and "requests" in d:
        return _from_bench(d, name)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows or not all(isinstance(r, dict) and {"prompt_len", "output_len", "arrival_s"} <= r.keys() for r in rows):
        raise ValueError(f"{path}: not a trace (reference rows/columns JSON, a bench serve --out JSON, "
                         "or JSON lines of prompt_len, output_len, arrival_s)")
    rows.sort(key=lambda r: r["arrival_s"])
    t0 = rows[0]["arrival_s"]
    return Trace([TraceRequest(i, int(r["prompt_len"]), int(r["output_len"]), float(r["arrival_s"]) - t0) for i, r in enumerate(rows)], name=name)
