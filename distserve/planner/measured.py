"""Measured runs beside the simulation, and the serving costs fitted to calibration runs (issue 14, phase 2).

A measured point is one `bench serve` run on the real suite at one placement (the JSON that
benchmarks/planner_validation.py writes: placement, workload, seed, rate, request count, SLOs, the run's
summary and every request). `simulate_point` replays the very same request list (workload, n, seed,
rate: `plan simulate`'s `workload_trace`) on the placement with a profile and returns the simulated
side; `compare` pairs them; `fit_costs` chooses the serving costs outside the engine model
(`ServingCosts`: per-step and per-decoding-sequence overheads, and a token's trip to the client) on a
grid, by the same loss `plan reference` fits its overheads with (squared log ratios of the TTFT and
TPOT p50 and p90), over calibration runs only: the validation points are then out of sample.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from distserve.bench.metrics import RequestResult, attainment
from distserve.planner.placement import Placement, suite_spec
from distserve.planner.profile import Profile, ServingCosts
from distserve.planner.reference import Side, loss
from distserve.planner.simulator import simulate
from distserve.planner.trace import workload_trace

# Grids of the fitted costs (seconds). A step of the 135M model on one core takes 20-80 ms decoding and
# 0.1-4 s prefilling; what the suite spends beside its engine thread (the worker's gRPC stream of each
# token, the router's relay, the load generator on the same two cores) is charged per step and per
# decoding sequence per step.
STEP_GRID = (0.0, 0.001, 0.002, 0.004, 0.006, 0.008, 0.012)
SEQ_GRID = (0.0, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004)
TOKEN_GRID = (0.0003, 0.002, 0.005)


@dataclass(slots=True)
class Point:
    """One measured run: what was sent and what came back."""

    kind: str  # cal | val
    placement: Placement
    workload: str
    seed: int
    rate: float
    num_requests: int
    slo_ttft: float
    slo_tpot: float
    results: list[RequestResult]
    load1_before: float  # the machine's 1-minute load average before the run
    foreign_cores: float = 0.0  # CPU that processes outside the suite and the load generator used during the run, in cores
    name: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Point:
        d = json.loads(Path(path).read_text())
        return cls(d["kind"], Placement(**d["placement_spec"]), d["workload"], int(d["seed"]), float(d["rate"]), int(d["num_requests"]),
                   float(d["slo_ttft"]), float(d["slo_tpot"]), [RequestResult.from_dict(x) for x in d["requests"]],
                   float(d.get("load1_before", 0.0)), float(d.get("foreign_cores", 0.0)), Path(path).stem)

    @property
    def side(self) -> Side:
        return side_of(self.results, self.slo_ttft, self.slo_tpot)


def side_of(results: list[RequestResult], slo_ttft: float, slo_tpot: float) -> Side:
    ok = [r for r in results if r.ok]
    s = Side.of([r.ttft for r in ok], [r.tpot for r in ok], slo_ttft, slo_tpot)
    s.attainment = attainment(results, slo_ttft, slo_tpot)  # failed requests count as misses
    return s


def load_points(paths: Iterable[str | Path]) -> list[Point]:
    return [Point.load(p) for p in sorted(paths)]


def slowdown(pt: Point, cores: int = 2) -> float:
    """How much slower the suite's engines ran for the CPU that others took during the run: `cores` /
    (`cores` - others' cores), the share of the machine left to the suite (capped at 4x)."""
    return min(4.0, cores / max(cores - pt.foreign_cores, cores / 4))


def simulate_point(profile: Profile, pt: Point, shared: bool = False) -> Side:
    """The point simulated; `shared`: with the engines slowed by the CPU that others used meanwhile."""
    trace = workload_trace(pt.workload, pt.num_requests, pt.rate, pt.seed)
    suite = suite_spec(profile, pt.placement)
    if shared:
        suite = replace(suite, slowdown=slowdown(pt, int(profile.machine.get("cores") or 2)))
    res = simulate(suite, trace.requests, pt.seed, keep_token_times=False)
    return side_of(res, pt.slo_ttft, pt.slo_tpot)


@dataclass(slots=True)
class Comparison:
    point: Point
    measured: Side
    simulated: Side

    @property
    def error_points(self) -> float:
        """Simulated minus measured attainment, in percentage points."""
        return 100 * (self.simulated.attainment - self.measured.attainment)


def compare(profile: Profile, points: list[Point], shared: bool = False) -> list[Comparison]:
    return [Comparison(p, p.side, simulate_point(profile, p, shared)) for p in points]


def mean_abs_error(rows: list[Comparison]) -> float:
    return sum(abs(c.error_points) for c in rows) / max(1, len(rows))


def fit_costs(profile: Profile, calibration: list[Point], steps=STEP_GRID, seqs=SEQ_GRID, tokens=TOKEN_GRID,
              shared: bool = False) -> tuple[ServingCosts, float]:
    """The (step_s, seq_s, token_s) on the grids whose simulation best matches the calibration runs'
    latency percentiles (the sum of `reference.loss` over them); the other costs stay the profile's."""
    if not calibration:
        raise ValueError("no calibration runs to fit on")
    measured = [p.side for p in calibration]
    best: tuple[float, ServingCosts] | None = None
    for a, b, t in itertools.product(steps, seqs, tokens):
        costs = replace(profile.costs, step_s=a, seq_s=b, token_s=t)
        prof = profile.with_costs(costs)
        total = sum(loss(m, simulate_point(prof, p, shared)) for m, p in zip(measured, calibration))
        if best is None or total < best[0]:
            best = (total, costs)
    return best[1], best[0]


def table(rows: list[Comparison], markdown: bool = False) -> str:
    head = ["placement", "workload", "rate", "load before", "others' cores", "TTFT p90 meas/sim s", "TPOT p90 meas/sim ms", "attainment meas", "sim", "error (points)"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append(f"{'placement':22}{'workload':>9}{'rate':>6}{'load':>6}{'other':>6}{'TTFT p90 m/s':>14}{'TPOT p90 m/s':>14}{'meas':>6}{'sim':>6}{'err':>6}")
    for c in rows:
        p, m, s = c.point, c.measured, c.simulated
        tt = f"{m.ttft_p90:.2f} / {s.ttft_p90:.2f}"
        tp = f"{m.tpot_p90 * 1e3:.0f} / {s.tpot_p90 * 1e3:.0f}"
        if markdown:
            lines.append(f"| {p.placement.label()} | {p.workload} | {p.rate:g} | {p.load1_before:.2f} | {p.foreign_cores:.2f} | {tt} | {tp} | "
                         f"{m.attainment:.0%} | {s.attainment:.0%} | {c.error_points:+.1f} |")
        else:
            lines.append(f"{p.placement.label()[:21]:22}{p.workload:>9}{p.rate:>6g}{p.load1_before:>6.2f}{p.foreign_cores:>6.2f}{tt:>14}{tp:>14}"
                         f"{m.attainment:>6.0%}{s.attainment:>6.0%}{c.error_points:>+6.1f}")
    lines.append(f"mean |attainment error| {mean_abs_error(rows):.1f} points over {len(rows)} points")
    return "\n".join(lines)


def crossing(points: list[tuple[float, float]], target: float = 0.9) -> float:
    """Goodput read off (rate, attainment) points: the rate where attainment falls through `target`,
    linear between the last rate at or above it and the next one below (0 if the lowest rate fails,
    the highest rate if none fails)."""
    pts = sorted(points)
    if not pts or pts[0][1] < target:
        return 0.0
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if a1 < target:
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    return pts[-1][0]


def goodputs(rows: list[Comparison], target: float = 0.9) -> list[dict]:
    """Per (placement, workload): measured and simulated goodput from the measured rates (the highest
    passing rate, and the interpolated crossing of the target)."""
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in rows:
        groups.setdefault((c.point.placement.label(), c.point.workload), []).append(c)
    out = []
    for (label, workload), cs in sorted(groups.items()):
        meas = [(c.point.rate, c.measured.attainment) for c in cs]
        sim = [(c.point.rate, c.simulated.attainment) for c in cs]
        out.append({"placement": label, "workload": workload,
                    "measured_highest_passing": max((r for r, a in meas if a >= target), default=0.0),
                    "simulated_highest_passing": max((r for r, a in sim if a >= target), default=0.0),
                    "measured_crossing": round(crossing(meas, target), 3), "simulated_crossing": round(crossing(sim, target), 3)})
    return out
