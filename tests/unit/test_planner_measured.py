"""planner.measured: measured points against the simulation, and the serving costs fitted to calibration runs.

The "measured" points here are simulations themselves, written in the format benchmarks/planner_validation.py
writes, so the expected answers are exact: the same costs give zero error, and the fit finds the costs
the points were made with."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from distserve.planner.measured import Point, compare, crossing, fit_costs, goodputs, load_points, mean_abs_error, simulate_point, slowdown, table
from distserve.planner.placement import parse_placement, suite_spec
from distserve.planner.profile import load_profile
from distserve.planner.simulator import simulate
from distserve.planner.trace import workload_trace

PROFILE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "profile_smollm2-135m.json"


@pytest.fixture(scope="module")
def profile():
    return load_profile(PROFILE)


def write_point(path: Path, profile, placement: str, workload: str, rate: float, n: int = 24, seed: int = 3, kind: str = "cal",
                foreign: float = 0.0, **pl) -> Path:
    p = parse_placement(placement, threads=1, weights="int8", **pl)
    suite = replace(suite_spec(profile, p), slowdown=2 / (2 - foreign))
    res = simulate(suite, workload_trace(workload, n, rate, seed).requests, seed)
    doc = {"kind": kind, "placement": p.label(), "placement_spec": asdict(p), "workload": workload, "seed": seed, "rate": rate,
           "num_requests": n, "slo_ttft": 4.0, "slo_tpot": 0.08, "load1_before": 0.1, "foreign_cores": foreign, "requests": [r.to_dict() for r in res]}
    path.write_text(json.dumps(doc))
    return path


def test_a_point_replayed_with_its_own_costs_has_no_error(profile, tmp_path):
    paths = [write_point(tmp_path / "a.json", profile, "1p1d", "chat", 1.0), write_point(tmp_path / "b.json", profile, "2c", "code", 2.0, chunked=True)]
    points = load_points(paths)
    assert [p.placement.label() for p in points] == ["1P+1D x1t int8", "2C-chunked x1t int8"]
    rows = compare(profile, points)
    assert all(c.error_points == 0 for c in rows) and mean_abs_error(rows) == 0
    assert all(c.measured.ttft_p90 == pytest.approx(c.simulated.ttft_p90) for c in rows)
    assert "mean |attainment error| 0.0 points over 2 points" in table(rows)
    assert all(g["measured_crossing"] == g["simulated_crossing"] for g in goodputs(rows))
    assert table(rows, markdown=True).startswith("| placement |")


def test_fit_recovers_the_costs_the_runs_were_made_with(profile, tmp_path):
    truth = profile.with_costs(replace(profile.costs, step_s=0.004, seq_s=0.0015, token_s=0.002))
    paths = [write_point(tmp_path / f"{i}.json", truth, pl, wl, rate) for i, (pl, wl, rate) in
             enumerate([("1p1d", "chat", 1.2), ("2c", "chat", 1.5), ("2c", "code", 2.5)])]
    costs, total = fit_costs(profile, load_points(paths), steps=(0.0, 0.004, 0.008), seqs=(0.0, 0.0015, 0.003), tokens=(0.0003, 0.002))
    assert (costs.step_s, costs.seq_s, costs.token_s) == (0.004, 0.0015, 0.002)
    assert total == pytest.approx(0.0, abs=1e-12)
    assert costs.router_s == profile.costs.router_s  # costs outside the grid stay the profile's


def test_a_point_knows_its_measured_attainment(profile, tmp_path):
    pt = Point.load(write_point(tmp_path / "p.json", profile, "1c", "chat", 4.0, n=30))
    assert 0 <= pt.side.attainment < 1  # one worker at 4 req/s misses the SLOs for some requests
    with pytest.raises(ValueError):
        fit_costs(profile, [])


def test_a_shared_machine_is_simulated_with_the_cpu_others_left(profile, tmp_path):
    """A run during which others used a core of two: simulated with that share, it matches; without, it does not."""
    pt = Point.load(write_point(tmp_path / "s.json", profile, "2c", "chat", 1.2, n=30, foreign=1.0))
    assert slowdown(pt) == 2.0
    shared = simulate_point(profile, pt, shared=True)
    assert shared.ttft_p90 == pytest.approx(pt.side.ttft_p90) and shared.attainment == pt.side.attainment
    assert simulate_point(profile, pt).ttft_p90 < 0.75 * pt.side.ttft_p90
    pt.foreign_cores = 1.99
    assert slowdown(pt) == 4.0  # capped


def test_goodput_read_off_measured_rates():
    assert crossing([(1.0, 1.0), (2.0, 0.8), (3.0, 0.2)]) == pytest.approx(1.5)
    assert crossing([(1.0, 0.5), (2.0, 0.2)]) == 0.0 and crossing([(1.0, 1.0), (2.0, 0.95)]) == 2.0
