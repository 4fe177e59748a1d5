"""The ceiling (planner/ceiling.py): its arithmetic by hand, and no simulated placement above it."""

import pytest

from distserve.planner.ceiling import ceiling, ceiling_line, engine_ceiling, max_decode_batch, request_core_s
from distserve.planner.commands import DEFAULT_PROFILE
from distserve.planner.latency import StepModel
from distserve.bench.metrics import attainment
from distserve.planner.placement import Placement, suite_spec
from distserve.planner.profile import EngineProfile, ServingCosts, load_profile
from distserve.planner.search import Objective
from distserve.planner.simulator import simulate

STEP = StepModel(prefill=(0.01, 0.001, 1e-6, 0.002), decode=(0.02, 1e-5, 0.001))
LENGTHS = [(100, 11), (200, 21)]  # (prompt, output): 10 + 20 decode tokens


def test_decode_batch_is_the_largest_step_within_the_tpot():
    # mean context of the 30 decode tokens: (10*100 + 55 + 20*200 + 210) / 30 = 175.5, so a step of b
    # sequences takes 0.02 + b * (175.5e-5 + 0.001) = 0.02 + 0.002755 b <= 0.05 -> b <= 10.9
    assert max_decode_batch(STEP, 175.5, 0.05) == 10
    assert max_decode_batch(STEP, 175.5, 0.05, limit=4) == 4
    assert max_decode_batch(STEP, 175.5, 0.02) == 0  # the fixed cost alone fills the objective
    # a per-sequence serving cost shrinks the batch
    assert max_decode_batch(STEP, 175.5, 0.05, ServingCosts(seq_s=0.001)) == 7


def test_request_costs_by_hand():
    prefill, decode = request_core_s(STEP, 100, 11, 10)
    assert prefill == pytest.approx(0.001 * 100 + 1e-6 * 100**2 + 0.002)  # no step intercept: other prompts share it
    # 10 decode tokens at contexts 101..110: the smaller intercept (prefill's 0.01) shared by 10, c_d, b_d * context
    assert decode == pytest.approx(10 * (0.01 / 10 + 0.001) + 1e-5 * 1055)


def test_engine_ceiling_by_hand():
    c = engine_ceiling(EngineProfile(1, "int8", 1, STEP), ServingCosts(), LENGTHS, cores=2, slo_tpot=0.05)
    prefill = (0.112 + 0.242) / 2
    decode = (10 * 0.002 + 1e-5 * 1055 + 20 * 0.002 + 1e-5 * 4210) / 2
    assert c.batch == 10
    assert (c.prefill_s, c.decode_s) == (pytest.approx(prefill), pytest.approx(decode))
    assert c.rate == pytest.approx(2 / (prefill + decode))
    assert c.output_tok_s == pytest.approx(c.rate * 16)
    # a worker of two threads, no faster per step, costs two cores' time per request
    two = engine_ceiling(EngineProfile(2, "int8", 1, STEP), ServingCosts(), LENGTHS, cores=2, slo_tpot=0.05)
    assert two.rate == pytest.approx(c.rate / 2)
    assert engine_ceiling(EngineProfile(1, "int8", 1, STEP), ServingCosts(), LENGTHS, 2, 0.02).rate == 0.0
    assert "1.70x" in ceiling_line(c, "chat", 0.05, against=c.rate / 1.7)


def test_no_simulated_placement_sustains_the_ceiling():
    """With the committed profile of this machine and a long run (800 requests: a short one ends before
    its backlog shows): at the ceiling's rate every placement misses the target, and at 0.7 of it the
    best one meets it (a ceiling far above every placement would say nothing)."""
    prof = load_profile(DEFAULT_PROFILE)
    o = Objective(slo_ttft=4.0, slo_tpot=0.08, workload="chat", num_requests=800)
    c = ceiling(prof, [(r.prompt_len, r.output_len) for r in o.requests_at(1.0)], 2, o.slo_tpot)
    assert c.batch > 1 and c.engine.startswith("int8")

    def att(placement, rate):
        return attainment(simulate(suite_spec(prof, placement), o.requests_at(rate), o.seed, keep_token_times=False), 4.0, 0.08)

    placements = (Placement(prefill=1, decode=1), Placement(colocated=2, chunked=True), Placement(colocated=2))
    assert max(att(p, c.rate) for p in placements) < 0.9
    assert max(att(p, 0.7 * c.rate) for p in placements) >= 0.9
    with pytest.raises(ValueError, match="no engine"):
        ceiling(prof, [(10, 10)], 2, 0.08, weights=["fp16"])
