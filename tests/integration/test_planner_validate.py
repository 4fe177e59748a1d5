"""`distserve plan --validate` in its smallest form: the planner's top placement for tiny-llama run for real
(distserve up + bench goodput's measurement, a handful of requests), printed beside the simulation."""

import argparse

from distserve.planner.placement import Placement
from distserve.planner.search import Objective, goodput
from distserve.planner.validate import up_args, validate
from tests.unit.test_planner_latency import synthetic_profile


def test_up_args_run_the_placement():
    assert up_args(Placement(prefill=1, decode=2, threads=1, weights="fp32"), "tiny-llama") == [
        "--model", "tiny-llama", "--threads", "1", "--weights", "fp32", "--prefill", "1", "--decode", "2"]
    assert up_args(Placement(colocated=2, chunked=True), "m")[-4:] == ["--decode", "0", "--colocated", "2", "--worker-arg=--chunked-prefill=true"][-4:]


def test_validate_measures_the_top_placement_beside_the_simulation(capsys):
    profile = synthetic_profile()
    o = Objective(slo_ttft=5.0, slo_tpot=0.5, workload="code", num_requests=4, seed=1)
    top = [goodput(profile, Placement(prefill=1, decode=1, threads=1, weights="fp32"), o)]
    args = argparse.Namespace(validate_model="tiny-llama", validate_requests=4, validate_rates="2", json=False)
    rows = validate(profile, top, o, args)
    out = capsys.readouterr().out
    (row,) = rows
    (pt,) = row["points"]
    assert pt["rate"] == 2 and 0 <= pt["measured"] <= 1 and 0 <= pt["simulated"] <= 1
    assert pt["measured_ttft_p90"] is not None
    assert "simulated vs measured" in out and "goodput measured" in out
