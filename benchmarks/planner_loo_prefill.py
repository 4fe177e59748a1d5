"""Which fitted terms bring the A100 replay's leave-one-out attainment error down (docs/planner.md,
"At GPU scale"): the step and sequence overheads alone, plus a per-request constant outside the engine
(ServingCosts.router_s), plus a factor on the prefill coefficients, and all of them.

    python benchmarks/planner_loo_prefill.py vllm [--coarse]
    python benchmarks/planner_loo_prefill.py distserve-c21d11

Each term set is fitted, per held-out run, on the other runs by reference.loss (latency percentiles)
and scored on the held-out run's attainment. --coarse uses 4 step x 5 sequence overheads instead of
reference's 6 x 6 (how much the figure rests on the grid). ~1 minute for vllm, ~3 for distserve.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace

from distserve.planner import reference as R

COARSE_STEP = (0.0, 0.0025, 0.005, 0.0075)
COARSE_SEQ = (0.0, 0.0001, 0.0002, 0.0003, 0.0004)
ROUTER = (0.0, 0.01, 0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("only", help="runs whose name contains this (vllm, distserve-c21d11)")
    ap.add_argument("--coarse", action="store_true")
    a = ap.parse_args()
    steps, seqs = (COARSE_STEP, COARSE_SEQ) if a.coarse else (R.STEP_GRID, R.SEQ_GRID)
    routers = ROUTER if a.coarse else (0.0,)  # the constant was tried on the coarse grid
    profs = R.profiles()
    chosen = [r for r in R.runs() if a.only in r.name and r.labelled]
    traces = {r.name: R.load_trace(r.path) for r in chosen}
    grid = list(itertools.product(steps, seqs, routers, R.PREFILL_SCALE_GRID))
    cache = {}
    for g in grid:
        step_s, seq_s, router_s, scale = g
        for r in chosen:
            p = R.with_overheads(profs[r.engine], step_s, seq_s, scale)
            p = p.with_costs(replace(p.costs, router_s=router_s))
            cache[(g, r.name)] = R._sides(traces[r.name], R.replay(p, r.placement, traces[r.name], r.engine), R.SLO_TTFT, R.SLO_TPOT)
    names = [r.name for r in chosen]

    def loo(sub: list) -> list[tuple[float, tuple]]:
        out = []
        for n in names:
            g = min(sub, key=lambda g: (sum(R.loss(*cache[(g, m)]) for m in names if m != n), -g[3], g))
            real, sim = cache[(g, n)]
            out.append((100 * (sim.attainment - real.attainment), g))
        return out

    sets = (("overheads", lambda g: g[2] == 0 and g[3] == 1.0), ("+ constant", lambda g: g[3] == 1.0),
            ("+ prefill factor", lambda g: g[2] == 0), ("all", lambda g: True))
    for label, keep in sets:
        if label in ("+ constant", "all") and not a.coarse:
            continue
        e = loo([g for g in grid if keep(g)])
        print(f"{a.only} {'coarse' if a.coarse else 'standard'} grid, {label}: leave-one-out mean abs "
              f"{sum(abs(x) for x, _ in e) / len(e):.2f} points {[round(x) for x, _ in e]}; fits {sorted({g for _, g in e})}")


if __name__ == "__main__":
    main()
