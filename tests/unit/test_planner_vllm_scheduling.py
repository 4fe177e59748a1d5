"""vLLM v0.2's scheduling as the simulator models it for the reference runs (EngineSpec.kv_on_demand,
watermark, max_paddings): blocks taken as the context grows, preemption of the newest request with a
recompute over its prompt and output so far, padded prefill batches, and the per-context-token cost."""

import pytest

from distserve.planner.latency import StepModel
from distserve.planner.profile import ServingCosts
from distserve.planner.sim_engine import EngineSpec, TraceRequest
from distserve.planner.simulator import Simulation, SuiteSpec, simulate

STEP = StepModel(prefill=(0.010, 0.001, 1e-6), decode=(0.020, 1e-5, 0.001))


def vllm(blocks=10_000, **kw) -> SuiteSpec:
    return SuiteSpec(colocated=(EngineSpec(STEP, blocks, kv_on_demand=True, **kw),))


def test_on_demand_blocks_admit_what_a_full_reservation_would_not():
    # 3 blocks: reserving prompt + output up front takes ceil(19 / 16) = 2 blocks per request, so the
    # second prompt waits; on demand each prompt starts with 1 block and both prefill in one step
    reqs = [TraceRequest(i, 16, 4, 0.0) for i in range(2)]
    reserved = simulate(SuiteSpec(colocated=(EngineSpec(STEP, 3),)), reqs)
    on_demand = simulate(vllm(blocks=3), reqs)
    assert on_demand[0].token_times[0] == on_demand[1].token_times[0] == pytest.approx(STEP.prefill_s([(0, 16), (0, 16)]))
    assert reserved[0].token_times[0] < reserved[1].token_times[0]


def test_out_of_blocks_preempts_the_newest_request_and_recomputes_it():
    # 3 blocks: two 16-token prompts take 1 each; both need a second block at their first decode step
    # (context 17): one is left, so the newer request is preempted and recomputed later over its prompt
    # and its first token (17 tokens), which produces its second token
    reqs = [TraceRequest(0, 16, 6, 0.0), TraceRequest(1, 16, 6, 0.001)]
    sim = Simulation(vllm(blocks=3))
    old, new = sim.run(reqs)
    assert sim.colocated[0].preemptions >= 1
    assert old.ok and new.ok and new.completion_tokens == 6
    assert new.end_s > old.end_s
    # the newer request's second token came from a 17-token prefill after the older one finished
    t_second = new.token_times[1]
    assert t_second > old.end_s
    assert t_second - old.end_s == pytest.approx(STEP.prefill_s([(0, 17)]), rel=1e-9)


def test_watermark_keeps_a_share_of_blocks_free_at_admission():
    # 10 blocks, watermark 20%: a 128-token prompt (8 blocks) would leave 2 = 20%: admitted; a 144-token
    # one (9 blocks) would leave 1 < 2: it waits... for ever here, so it is reported as never finished
    (ok,) = simulate(vllm(blocks=10, watermark=0.2), [TraceRequest(0, 128, 2, 0.0)])
    assert ok.ok
    (stuck,) = simulate(vllm(blocks=10, watermark=0.2), [TraceRequest(0, 144, 2, 0.0)])
    assert not stuck.ok


def test_prefill_batches_are_padded_and_limited_by_padding():
    # 100 and 300 tokens: 200 pad tokens <= 256, one step costing two 300-token prompts
    a, b = simulate(vllm(max_paddings=256), [TraceRequest(0, 100, 2, 0.0), TraceRequest(1, 300, 2, 0.0)])
    assert a.token_times[0] == b.token_times[0] == pytest.approx(STEP.prefill_s([(0, 300), (0, 300)]))
    # 100 and 400: 300 pad tokens > 256, two steps
    a, b = simulate(vllm(max_paddings=256), [TraceRequest(0, 100, 2, 0.0), TraceRequest(1, 400, 2, 0.0)])
    assert a.token_times[0] == pytest.approx(STEP.prefill_s([(0, 100)]))
    assert b.token_times[0] == pytest.approx(STEP.prefill_s([(0, 100)]) + STEP.prefill_s([(0, 400)]))
    # the padded budget: 3 x 800 > 2048 tokens, so the third prompt waits
    res = simulate(vllm(max_paddings=256), [TraceRequest(i, 800, 2, 0.0) for i in range(3)])
    assert res[0].token_times[0] == res[1].token_times[0] < res[2].token_times[0]


def test_context_token_overhead_grows_with_each_decoding_context():
    costs = ServingCosts(ctx_s=1e-5)
    (r,) = simulate(SuiteSpec(colocated=(EngineSpec(STEP, 10_000),), costs=costs), [TraceRequest(0, 100, 3, 0.0)])
    assert r.token_times[1] - r.token_times[0] == pytest.approx(STEP.decode_s(1, 101) + 101 * 1e-5)
    assert r.token_times[2] - r.token_times[1] == pytest.approx(STEP.decode_s(1, 102) + 102 * 1e-5)


def test_reference_suite_runs_vllm_with_the_authors_flags_when_asked():
    from distserve.planner import reference as ref

    if not (ref.DEFAULT_DIR / "latency-coefficients-vllm.json").exists():
        pytest.skip("no reference data")
    prof = ref.profiles()["vllm"]
    old = ref.reference_suite(prof, "1c", "vllm").colocated[0]
    v02 = ref.reference_suite(prof, "1c", "vllm", vllm_v02=True).colocated[0]
    assert not old.kv_on_demand and old.max_num_batched_tokens == 2048
    assert v02.kv_on_demand and v02.max_paddings == 256 and v02.watermark == 0.01
    assert (v02.max_num_batched_tokens, v02.max_num_seqs) == (16384, 1024)
    assert v02.num_blocks > old.num_blocks  # 95% of the GPU, not 90%
    assert ref.reference_suite(prof, "c21d11", "distserve", vllm_v02=True).prefill  # DistServe untouched
