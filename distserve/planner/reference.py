"""The simulator at GPU scale, against the DistServe authors' real OPT-13B runs on A100s.

Reference data (../shared/reference/distserve-opt13b-a100/, see its README): fitted latency
coefficients per engine (latency-coefficients-{distserve,vllm}.json) and per-request measurements of
real runs (runs/ENGINE[-PLACEMENT]-N-RATE.json). Each run is replayed with the exact prompt/output
lengths and send times on the placement it ran:

- `vllm-*`: one colocated instance, TP 1, prefill priority (vLLM's scheduler), vLLM's coefficients;
- `distserve-c21d11-*`: one prefill instance of TP 2 and one decode instance of TP 1, DistServe's;
- `distserve-N-RATE` (placement not stated): replayed as c21d11 and reported apart, never scored.

For each run: simulated against real TTFT and TPOT (p50, p90) and attainment at the SLOs (TTFT <= 200
ms, TPOT <= 100 ms). The coefficients time a model's forward pass; the real engines also spend time per
step outside it (scheduling, sampling, detokenizing and streaming each sequence's token). Three modes:
`raw` (no such overhead), `fitted` (per engine, the overhead per step and per decoding sequence that
best matches the TTFT/TPOT p50/p90 of all its labelled runs; a grid search) and `loo` (leave one out:
each run is replayed with the overheads fitted to the engine's *other* runs, so its error is out of
sample). The goodput ratio: each system's simulated goodput (90% attainment) on the reference length
mix with Poisson arrivals, per GPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from distserve.bench.metrics import RequestResult, attainment, percentile
from distserve.planner.placement import EngineLimits, parse_placement, suite_spec
from distserve.planner.profile import Profile, load_profile
from distserve.planner.search import Objective, goodput
from distserve.planner.simulator import simulate
from distserve.planner.trace import Trace, load_trace

DEFAULT_DIR = Path(__file__).resolve().parents[3] / "shared" / "reference" / "distserve-opt13b-a100"
MODEL = "facebook/opt-13b"
SLO_TTFT, SLO_TPOT = 0.2, 0.1
# vLLM's and DistServe's schedulers of the time: a step's prompt tokens up to 2048 (OPT's context), up
# to 256 sequences; the KV room is what each instance's GPUs hold (Profile.num_blocks).
LIMITS = EngineLimits(max_num_batched_tokens=2048, max_num_seqs=256)
PAPER_RATIO = 2.0  # DistServe's per-GPU goodput over vLLM's, OPT-13B chatbot (the paper, section 6.2)
_NAME = re.compile(r"(?P<engine>vllm|distserve)(?:-(?P<placement>c\d\dd\d\d))?-(?P<n>\d+)-(?P<rate>[\d.]+)")


@dataclass(slots=True)
class RunSpec:
    name: str
    engine: str  # vllm | distserve
    placement: str  # 1c | c21d11
    labelled: bool  # the source states the placement
    n: int
    rate: float
    path: Path


def runs(folder: Path = DEFAULT_DIR) -> list[RunSpec]:
    out = []
    for p in sorted((folder / "runs").glob("*.json")):
        m = _NAME.fullmatch(p.stem)
        if not m:
            continue
        engine = m["engine"]
        placement = "1c" if engine == "vllm" else (m["placement"] or "c21d11")
        out.append(RunSpec(p.stem, engine, placement, engine == "vllm" or m["placement"] is not None, int(m["n"]), float(m["rate"]), p))
    return sorted(out, key=lambda r: (r.engine, not r.labelled, r.n != 300 if r.engine == "distserve" else False, r.rate, r.n))


@dataclass(slots=True)
class Side:
    ttft_p50: float
    ttft_p90: float
    tpot_p50: float
    tpot_p90: float
    attainment: float

    @classmethod
    def of(cls, ttft: list[float], tpot: list[float], slo_ttft: float, slo_tpot: float) -> Side:
        att = sum(a <= slo_ttft and b <= slo_tpot for a, b in zip(ttft, tpot)) / max(1, len(ttft))
        return cls(percentile(ttft, 50), percentile(ttft, 90), percentile(tpot, 50), percentile(tpot, 90), att)


@dataclass(slots=True)
class Comparison:
    run: RunSpec
    real: Side
    sim: Side

    @property
    def error_points(self) -> float:
        return 100 * (self.sim.attainment - self.real.attainment)


def profiles(folder: Path = DEFAULT_DIR) -> dict[str, Profile]:
    return {e: load_profile(folder / f"latency-coefficients-{e}.json", MODEL) for e in ("vllm", "distserve")}


STEP_GRID = (0.0, 0.00125, 0.0025, 0.005, 0.0075, 0.01)  # seconds per engine step
SEQ_GRID = (0.0, 0.00005, 0.0001, 0.0002, 0.0003, 0.0004)  # seconds per decoding sequence per step
# the authors' prefill coefficients times this: on a lone prompt, vLLM's real prefill ran at about 0.85x
# of its coefficients' time (plus ~15 ms outside the engine; docs/planner.md)
PREFILL_SCALE_GRID = (0.8, 0.85, 0.9, 0.95, 1.0)


def with_overheads(profile: Profile, step_s: float, seq_s: float, prefill_scale: float = 1.0) -> Profile:
    p = profile.with_costs(replace(profile.costs, step_s=step_s, seq_s=seq_s))
    if prefill_scale == 1.0:
        return p

    def scaled(step):
        big = step.prefill_large
        return replace(step, prefill=tuple(c * prefill_scale for c in step.prefill),
                       prefill_large=None if big is None else tuple(c * prefill_scale for c in big))

    return replace(p, engines=[replace(e, step=scaled(e.step)) for e in p.engines])


# vLLM as the authors served it (DistServe's evaluation/2-benchmark-serving/2-start-api-server.py):
# `--max-num-batched-tokens 16384 --max-num-seqs 1024 --gpu-memory-utilization 0.95 --block-size 16`,
# and vLLM v0.2's scheduler: KV blocks on demand with a 1% watermark, preemption by recompute,
# prefill batches padded to their longest prompt with at most 256 pad tokens.
VLLM_LIMITS = EngineLimits(max_num_batched_tokens=16384, max_num_seqs=1024)
VLLM_MEMORY_UTILIZATION = 0.95
VLLM_SCHEDULER = {"kv_on_demand": True, "watermark": 0.01, "max_paddings": 256}


def replay(profile: Profile, placement: str, trace: Trace, engine: str = "distserve", vllm_v02: bool = False) -> list[RequestResult]:
    """One reference run replayed. `vllm_v02`: vLLM runs with the authors' flags and v0.2's scheduler
    (else, the default: 2048 tokens and 256 sequences a step, KV reserved for prompt + output at
    admission, 90% of the GPU). Off by default: out of sample it fits the real runs worse (docs/planner.md)."""
    return simulate(reference_suite(profile, placement, engine, vllm_v02), trace.requests, keep_token_times=False)


def reference_suite(profile: Profile, placement: str, engine: str, vllm_v02: bool = False):
    if engine != "vllm" or not vllm_v02:
        return suite_spec(profile, parse_placement(placement), LIMITS)
    profile = replace(profile, memory=dict(profile.memory, utilization=VLLM_MEMORY_UTILIZATION))
    suite = suite_spec(profile, parse_placement(placement), VLLM_LIMITS)
    return replace(suite, colocated=tuple(replace(e, **VLLM_SCHEDULER) for e in suite.colocated))


def _sides(trace: Trace, res: list[RequestResult], slo_ttft: float, slo_tpot: float) -> tuple[Side, Side]:
    real = Side.of([m.ttft for m in trace.measured], [m.tpot for m in trace.measured], slo_ttft, slo_tpot)
    ok = [x for x in res if x.ok]
    sim = Side.of([x.ttft for x in ok], [x.tpot for x in ok], slo_ttft, slo_tpot)
    sim.attainment = attainment(res, slo_ttft, slo_tpot)
    return real, sim


def loss(real: Side, sim: Side) -> float:
    """Squared log ratios of the four latency percentiles (not the attainment the replay is judged by)."""
    pairs = ((sim.ttft_p50, real.ttft_p50), (sim.ttft_p90, real.ttft_p90), (sim.tpot_p50, real.tpot_p50), (sim.tpot_p90, real.tpot_p90))
    return sum(math.log(max(s, 1e-9) / max(r, 1e-9)) ** 2 for s, r in pairs)


def compare(folder: Path = DEFAULT_DIR, mode: str = "raw", slo_ttft: float = SLO_TTFT, slo_tpot: float = SLO_TPOT,
            only: str = "", vllm_v02: bool = False) -> tuple[list[Comparison], dict]:
    """Every run (whose name contains `only`) replayed; `notes` holds the overheads used per engine."""
    if mode not in ("raw", "fitted", "loo"):
        raise ValueError(f"mode must be raw, fitted or loo, got {mode!r}")
    profs = profiles(folder)
    chosen = [r for r in runs(folder) if only in r.name]
    traces = {r.name: load_trace(r.path) for r in chosen}
    # (step_s, seq_s, prefill_scale)
    grid = [(0.0, 0.0, 1.0)] if mode == "raw" else [(a, b, f) for a in STEP_GRID for b in SEQ_GRID for f in PREFILL_SCALE_GRID]
    cache: dict[tuple, tuple[Side, Side]] = {}
    for g in grid:
        for r in chosen:
            res = replay(with_overheads(profs[r.engine], *g), r.placement, traces[r.name], r.engine, vllm_v02)
            cache[(*g, r.name)] = _sides(traces[r.name], res, slo_ttft, slo_tpot)

    def best(engine: str, exclude: str = "") -> tuple[float, float, float]:
        fit_on = [r.name for r in chosen if r.engine == engine and r.labelled and r.name != exclude]
        return min(grid, key=lambda g: (sum(loss(*cache[(*g, n)]) for n in fit_on), -g[2], g))

    notes: dict = {}
    out = []
    for engine in ("distserve", "vllm"):
        if not any(r.engine == engine for r in chosen):
            continue
        fitted = best(engine)
        notes[engine] = {"mode": mode, "step_s": fitted[0], "seq_s": fitted[1], "prefill_scale": fitted[2], "loo": {}}
    for r in chosen:
        g = notes[r.engine]["step_s"], notes[r.engine]["seq_s"], notes[r.engine]["prefill_scale"]
        if mode == "loo" and r.labelled:
            g = best(r.engine, exclude=r.name)
            notes[r.engine]["loo"][r.name] = g
        real, sim = cache[(*g, r.name)]
        out.append(Comparison(r, real, sim))
    return out, notes


def mean_abs_error(rows: list[Comparison], engine: str) -> float:
    errs = [abs(c.error_points) for c in rows if c.run.engine == engine and c.run.labelled]
    return sum(errs) / len(errs) if errs else float("nan")


def real_goodput(rows: list[Comparison], engine: str, target: float = 0.9) -> tuple[float, float]:
    """(highest rate that met the target, lowest rate that missed it) among the labelled real runs."""
    pts = [(c.run.rate, c.real.attainment) for c in rows if c.run.engine == engine and c.run.labelled]
    ok = [r for r, a in pts if a >= target]
    bad = [r for r, a in pts if a < target]
    return (max(ok) if ok else 0.0), (min(bad) if bad else float("inf"))


def goodput_ratio(folder: Path = DEFAULT_DIR, overheads: dict | None = None, slo_ttft: float = SLO_TTFT,
                  slo_tpot: float = SLO_TPOT, scales: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0)) -> dict:
    """Simulated goodput per GPU of DistServe c21d11 (3 GPUs) and vLLM (1 GPU) on the reference length
    mix (the largest run's lengths, Poisson arrivals), at the SLOs times each scale."""
    profs = profiles(folder)
    for engine, c in (overheads or {}).items():
        profs[engine] = with_overheads(profs[engine], c["step_s"], c["seq_s"], c.get("prefill_scale", 1.0))
    biggest = max(runs(folder), key=lambda r: r.n)
    trace = load_trace(biggest.path)
    out: dict = {"lengths_from": biggest.name, "paper_ratio": PAPER_RATIO, "scales": []}
    for f in scales:
        o = Objective(slo_ttft=f * slo_ttft, slo_tpot=f * slo_tpot, trace=trace, num_requests=biggest.n)
        row: dict = {"scale": f, "slo_ttft": f * slo_ttft, "slo_tpot": f * slo_tpot}
        for engine, placement in (("distserve", "c21d11"), ("vllm", "1c")):
            g = goodput(profs[engine], parse_placement(placement), o, LIMITS)
            row[engine] = {"placement": placement, "gpus": g.units, "goodput_rps": round(g.rate, 3), "per_gpu": round(g.per_unit, 3)}
        v = row["vllm"]["per_gpu"]
        row["ratio"] = round(row["distserve"]["per_gpu"] / v, 2) if v > 0 else None
        out["scales"].append(row)
    return out


# -- presentation -----------------------------------------------------------------------------------


def table(rows: list[Comparison], slo_ttft: float = SLO_TTFT, slo_tpot: float = SLO_TPOT, markdown: bool = False) -> str:
    ms = lambda x: f"{x * 1e3:.0f}"  # noqa: E731
    head = ["run", "placement", "TTFT p50 real/sim ms", "TTFT p90 real/sim ms", "TPOT p50 real/sim ms", "TPOT p90 real/sim ms",
            f"attainment real/sim (TTFT<={slo_ttft * 1e3:g}ms, TPOT<={slo_tpot * 1e3:g}ms)", "error (points)"]
    lines = []
    for c in rows:
        name = c.run.name + ("" if c.run.labelled else " (placement not stated)")
        lines.append([name, c.run.placement, f"{ms(c.real.ttft_p50)} / {ms(c.sim.ttft_p50)}", f"{ms(c.real.ttft_p90)} / {ms(c.sim.ttft_p90)}",
                      f"{ms(c.real.tpot_p50)} / {ms(c.sim.tpot_p50)}", f"{ms(c.real.tpot_p90)} / {ms(c.sim.tpot_p90)}",
                      f"{c.real.attainment:.0%} / {c.sim.attainment:.0%}", f"{c.error_points:+.0f}"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(r) for r in lines])


def plot(rows: list[Comparison], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    groups = (("vllm", "vLLM (1 GPU, colocated)", axes[0]), ("distserve", "DistServe c21d11 (3 GPUs), 300-request runs", axes[1]))
    for engine, label, ax in groups:
        sel = [c for c in rows if c.run.engine == engine and c.run.labelled and (engine == "vllm" or c.run.n == 300)]
        sel.sort(key=lambda c: c.run.rate)
        ax.plot([c.run.rate for c in sel], [100 * c.real.attainment for c in sel], "o-", label="real")
        ax.plot([c.run.rate for c in sel], [100 * c.sim.attainment for c in sel], "s--", label="simulated")
        ax.axhline(90, color="grey", ls=":", lw=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("rate (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
