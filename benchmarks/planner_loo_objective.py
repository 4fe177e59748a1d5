"""Does fitting the replay overheads to attainment (not only to latency percentiles) lower the A100
leave-one-out attainment error? (docs/planner.md, "Modelling vLLM v0.2 more closely").

    python benchmarks/planner_loo_objective.py vllm [--fine]
    python benchmarks/planner_loo_objective.py distserve-c21d11

For each lambda, the loss is `reference.loss + lambda * 100 * (attainment error)^2` and the
leave-one-out error is printed. Then comes a nested figure: for each held-out run, lambda is chosen by
an inner leave-one-out over the other runs. That figure is the honest one, since the plain rows choose
lambda on the same runs they are scored on. --fine searches an 8x8 grid of overheads instead of
reference's 6x6. Needs ../shared/reference; takes ~10-20 s.
"""

from __future__ import annotations

import argparse

from distserve.planner import reference as R

FINE_STEP = (0.0, 0.00125, 0.0025, 0.00375, 0.005, 0.00625, 0.0075, 0.01)
FINE_SEQ = (0.0, 0.000025, 0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004)
LAMBDAS = (0, 0.1, 0.3, 1, 3, 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("only", help="runs whose name contains this (vllm, distserve-c21d11)")
    ap.add_argument("--fine", action="store_true")
    a = ap.parse_args()
    grid = [(x, y) for x in (FINE_STEP if a.fine else R.STEP_GRID) for y in (FINE_SEQ if a.fine else R.SEQ_GRID)]
    profs = R.profiles()
    chosen = [r for r in R.runs() if a.only in r.name and r.labelled]
    traces = {r.name: R.load_trace(r.path) for r in chosen}
    cache = {}
    for x, y in grid:
        for r in chosen:
            res = R.replay(R.with_overheads(profs[r.engine], x, y), r.placement, traces[r.name], r.engine)
            cache[(x, y, r.name)] = R._sides(traces[r.name], res, R.SLO_TTFT, R.SLO_TPOT)
    names = [r.name for r in chosen]

    def fit(on: list[str], lam: float) -> tuple[float, float]:
        def total(ab):
            return sum(R.loss(*cache[(*ab, m)]) + lam * 100 * (cache[(*ab, m)][1].attainment - cache[(*ab, m)][0].attainment) ** 2 for m in on)
        return min(grid, key=lambda ab: (total(ab), ab))

    def loo(pool: list[str], lam: float) -> list[float]:
        out = []
        for n in pool:
            real, sim = cache[(*fit([m for m in pool if m != n], lam), n)]
            out.append(100 * (sim.attainment - real.attainment))
        return out

    for lam in LAMBDAS:
        e = loo(names, lam)
        print(f"{a.only} {'fine' if a.fine else 'standard'} grid, lambda {lam}: leave-one-out mean abs {sum(map(abs, e)) / len(e):.2f} "
              f"points {[round(v) for v in e]}")
    nested = []
    for n in names:
        rest = [m for m in names if m != n]
        lam = min(LAMBDAS, key=lambda v: (sum(map(abs, loo(rest, v))), v))
        real, sim = cache[(*fit(rest, lam), n)]
        nested.append(100 * (sim.attainment - real.attainment))
    print(f"{a.only} nested (lambda chosen by an inner leave-one-out): mean abs {sum(map(abs, nested)) / len(nested):.2f} points")


if __name__ == "__main__":
    main()
