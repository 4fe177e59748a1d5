"""The latency model's fit, profiles (ours and the reference coefficients), and the search's basics."""

import json
import random

import pytest

from distserve.planner.latency import DecodePoint, PrefillPoint, StepModel, fit_decode, fit_prefill, nonneg_lstsq_rel
from distserve.planner.placement import EngineLimits, Placement, suite_spec
from distserve.planner.profile import EngineProfile, ModelInfo, Profile, ServingCosts, TransferModel, load_profile, machine_info
from distserve.planner.search import Objective, cpu_candidates, goodput, plan_cpu


def test_fit_recovers_known_coefficients_without_noise():
    true = StepModel(prefill=(0.02, 0.001, 2e-7, 0.004), decode=(0.015, 3e-6, 0.0008))
    rng = random.Random(0)
    pre = []
    for _ in range(30):
        lens = tuple(rng.randrange(16, 1024) for _ in range(rng.randrange(1, 5)))
        pre.append(PrefillPoint(lens, true.prefill_s([(0, n) for n in lens])))
    dec = [DecodePoint(b, b * c, true.decode_s(b, b * c)) for b in (1, 2, 4, 8, 16, 32) for c in (16, 256, 1024)]
    pf, df = fit_prefill(pre), fit_decode(dec)
    assert pf.coef == pytest.approx(true.prefill, rel=1e-6)
    assert df.coef == pytest.approx(true.decode, rel=1e-6)
    assert pf.error.max_rel < 1e-9 and df.error.max_rel < 1e-9
    assert df.large is None


def test_fit_keeps_coefficients_non_negative():
    import numpy as np

    x = np.array([[1.0, t] for t in (1, 2, 3, 4)])
    y = np.array([5.0, 4.9, 4.8, 4.7])  # a falling line: its slope would be negative
    w = nonneg_lstsq_rel(x, y)
    assert (w >= 0).all() and w[1] == 0


def test_decode_fit_splits_at_a_batch_threshold_when_one_set_cannot_fit():
    small = StepModel((0, 0, 0), (0.02, 1e-6, 0.0005))
    large = StepModel((0, 0, 0), (0.005, 1e-6, 0.002))
    pts = []
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        for c in (64, 512):
            m = small if b < 16 else large
            pts.append(DecodePoint(b, b * c, m.decode_s(b, b * c)))
    f = fit_decode(pts)
    assert f.large is not None and f.large_batch == 16
    assert f.error.max_rel < 1e-6


def test_chunks_and_mixed_steps_compose_from_the_phases():
    m = StepModel(prefill=(0.01, 0.001, 1e-6, 0.002), decode=(0.02, 1e-5, 0.001))
    assert m.prefill_s([(0, 100)]) == pytest.approx(0.01 + 0.1 + 0.01 + 0.002)
    assert m.prefill_s([(100, 200)]) == pytest.approx(0.01 + 0.1 + 1e-6 * (200**2 - 100**2) + 0.002)
    mixed = m.step_s([(0, 100)], 4, 400)
    assert mixed == pytest.approx(m.prefill_s([(0, 100)]) + m.decode_s(4, 400) - 0.02)
    assert m.with_pp(2).decode_s(4, 400) == pytest.approx(m.decode_s(4, 400) / 2)


REF_COEFFICIENTS = {"facebook/opt-13b": {"1": {"decoding_large_small_bs_threshold": 95, "prefill": [18.1, 0.1019, 7.1e-06],
                                               "decoding_smallbs": [19.93, 0.000627, 0.0385], "decoding_largebs": [7.17, 0.00058, 0.158]}}}


def test_reference_coefficients_load_as_a_gpu_profile(tmp_path):
    path = tmp_path / "latency-coefficients-x.json"
    path.write_text(json.dumps(REF_COEFFICIENTS))
    p = load_profile(path)
    assert p.device == "gpu" and p.tp_degrees == [1]
    step = p.engine(tp=1).step
    assert step.prefill_s([(0, 1000)]) == pytest.approx((18.1 + 101.9 + 7.1) / 1e3)
    assert step.decode_s(10, 5000) == pytest.approx((19.93 + 0.000627 * 5000 + 0.0385 * 10) / 1e3)
    assert step.decode_s(100, 5000) == pytest.approx((7.17 + 0.00058 * 5000 + 0.158 * 100) / 1e3)
    # OPT-13B in fp16 on one 80 GB A100: ~50 GB left for KV at 0.8 MB a token
    tokens = p.num_blocks(1, 1) * p.block_size
    assert 50_000 < tokens < 70_000
    assert p.num_blocks(2, 1) > 2 * p.num_blocks(1, 1)


def synthetic_profile(prefill_tok_s: float = 500.0, step_s: float = 0.03) -> Profile:
    info = ModelInfo("synthetic", 30, 576, 9, 3, 64, 1536, 49152, 8192, 135_000_000, 4)
    engines = [EngineProfile(1, w, 1, StepModel((0.01, f / prefill_tok_s, 2e-7, 0.002), (f * step_s, 2e-6, 0.0008)))
               for w, f in (("int8", 1.0), ("fp32", 2.0))]
    return Profile(info, "cpu", machine_info(), engines, {"shm": TransferModel(0.002, 1e9)}, "shm",
                   ServingCosts(0.0005, 0.0015, 0.0015, 0.0003), {"kv_cache_bytes": 1 << 30, "block_size": 16})


def test_profile_round_trips_through_json(tmp_path):
    p = synthetic_profile()
    p.save(tmp_path / "p.json")
    q = load_profile(tmp_path / "p.json")
    assert q.to_dict() == p.to_dict()
    assert q.num_blocks() == (1 << 30) // (30 * 2 * 3 * 64 * 4 * 16)


def test_goodput_falls_with_tighter_slos_and_rises_with_workers():
    p = synthetic_profile()
    loose = Objective(slo_ttft=4.0, slo_tpot=0.1, workload="chat", num_requests=60)
    tight = Objective(slo_ttft=1.0, slo_tpot=0.05, workload="chat", num_requests=60)
    one = Placement(prefill=1, decode=1, threads=1, weights="int8")
    two = Placement(prefill=2, decode=2, threads=1, weights="int8")
    g_loose, g_tight = goodput(p, one, loose), goodput(p, one, tight)
    assert g_loose.rate > g_tight.rate >= 0
    assert goodput(p, two, loose).rate > g_loose.rate
    assert g_loose.at_goodput["attainment"] >= 0.9 and g_loose.bounded


def test_cpu_search_ranks_every_placement_up_can_run():
    p = synthetic_profile()
    cands = cpu_candidates(p, 2)
    labels = {c.label() for c in cands}
    assert {"1P+1D x1t int8", "1C x1t int8", "2C x1t int8", "2C-chunked x1t fp32"} <= labels
    assert all(c.units("cpu") <= 2 for c in cands)
    ranked = plan_cpu(p, 2, Objective(slo_ttft=3.0, slo_tpot=0.1, num_requests=40))
    assert len(ranked) == len(cands)
    per_core = [g.per_unit for g in ranked]
    assert per_core == sorted(per_core, reverse=True)
    assert ranked[0].placement.weights == "int8"  # twice as fast in this profile


def test_suite_spec_takes_memory_and_limits_from_the_profile():
    p = synthetic_profile()
    s = suite_spec(p, Placement(prefill=1, decode=2, weights="fp32"), EngineLimits(1024, 16))
    assert len(s.prefill) == 1 and len(s.decode) == 2 and not s.colocated
    assert s.decode[0].max_num_batched_tokens == 1024 and s.decode[0].max_num_seqs == 16
    assert s.decode[0].num_blocks == p.num_blocks()
    assert s.transfer_s(100) == pytest.approx(0.002 + 100 * 30 * 2 * 3 * 64 * 4 / 1e9)
    # by default the workers' step budgets: 256 tokens for a prefill worker on CPU, 2048 for the others
    d = suite_spec(p, Placement(prefill=1, decode=1))
    assert (d.prefill[0].max_num_batched_tokens, d.decode[0].max_num_batched_tokens) == (256, 2048)
    assert suite_spec(p, Placement(colocated=2)).colocated[0].max_num_batched_tokens == 2048


def test_gpu_search_balances_phase_instances_within_the_budget(tmp_path):
    from distserve.planner.search import plan_gpu

    coef = {"1": {"decoding_large_small_bs_threshold": 95, "prefill": [18.1, 0.1019, 7.1e-06],
                  "decoding_smallbs": [19.93, 0.000627, 0.0385], "decoding_largebs": [7.17, 0.00058, 0.158]},
            "2": {"decoding_large_small_bs_threshold": 95, "prefill": [14.7, 0.0686, 2.4e-06],
                  "decoding_smallbs": [13.3, 0.00034, 0.063], "decoding_largebs": [10.6, 0.00031, 0.0856]}}
    path = tmp_path / "latency-coefficients-x.json"
    path.write_text(json.dumps({"facebook/opt-13b": coef}))
    p = load_profile(path)
    o = Objective(slo_ttft=0.4, slo_tpot=0.15, workload="chat", num_requests=150)
    ranked, notes = plan_gpu(p, 4, o, EngineLimits(2048, 256), node_gpus=4)
    assert notes["prefill"] and notes["decode"]
    assert all(g.units <= 4 for g in ranked)
    disagg = [g for g in ranked if g.placement.disaggregated]
    assert disagg and all(g.rate > 0 for g in disagg)
    assert [g.per_unit for g in ranked] == sorted((g.per_unit for g in ranked), reverse=True)
