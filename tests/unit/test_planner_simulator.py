"""The planner's simulator on synthetic step models: exact single-request timelines, determinism,
queueing behaviour that must hold, batching by token budget, and memory-limited admission."""

import math

import pytest

from distserve.bench.metrics import percentile, summarize
from distserve.planner.latency import StepModel
from distserve.planner.placement import Placement, parse_placement
from distserve.planner.profile import ServingCosts
from distserve.planner.sim_engine import EngineSpec, TraceRequest
from distserve.planner.simulator import SuiteSpec, simulate
from distserve.planner.trace import workload_trace

STEP = StepModel(prefill=(0.010, 0.001, 1e-6, 0.002), decode=(0.020, 1e-5, 0.001))
COSTS = ServingCosts(router_s=0.001, prefill_call_s=0.004, decode_call_s=0.002, token_s=0.0005)


def transfer(tokens: int) -> float:
    return 0.003 + tokens * 1e-5


def disagg(p=1, d=1, blocks=10_000, prefill_blocks=10_000, costs=COSTS, **kw) -> SuiteSpec:
    return SuiteSpec(prefill=(EngineSpec(STEP, prefill_blocks, **kw),) * p, decode=(EngineSpec(STEP, blocks, **kw),) * d,
                     transfer_s=transfer, costs=costs)


def coloc(c=1, chunked=False, blocks=10_000, **kw) -> SuiteSpec:
    return SuiteSpec(colocated=(EngineSpec(STEP, blocks, chunked_prefill=chunked, **kw),) * c, transfer_s=transfer, costs=COSTS)


def test_one_request_disaggregated_follows_the_latency_model_exactly():
    (r,) = simulate(disagg(), [TraceRequest(0, 100, 5, 2.0)])
    c = COSTS
    prefill_end = 2.0 + c.router_s + c.prefill_call_s / 2 + STEP.prefill_s([(0, 100)])
    first = prefill_end + c.prefill_call_s / 2 + c.token_s
    assert r.token_times[0] == pytest.approx(first, abs=1e-12)
    assert r.ttft == pytest.approx(first - 2.0, abs=1e-12)
    # the router routes the decode leg when the first token is back; the worker reserves, pulls, imports
    t = prefill_end + c.prefill_call_s / 2 + c.decode_call_s + transfer(100)
    for i in range(1, 5):  # decode steps: context = prompt + tokens so far
        t += STEP.decode_s(1, 100 + i)
        assert r.token_times[i] == pytest.approx(t + c.token_s, abs=1e-12)
    assert r.completion_tokens == 5 and r.ok
    assert r.tpot == pytest.approx((r.token_times[-1] - r.token_times[0]) / 4)
    assert r.phases["kv_transfer_s"] == pytest.approx(transfer(100))
    assert r.phases["prefill_compute_s"] == pytest.approx(STEP.prefill_s([(0, 100)]))


def test_one_request_colocated_follows_the_latency_model_exactly():
    (r,) = simulate(coloc(), [TraceRequest(0, 64, 3, 0.0)])
    c = COSTS
    t = c.router_s + c.decode_call_s + STEP.prefill_s([(0, 64)])
    expect = [t]
    for i in range(1, 3):
        t += STEP.decode_s(1, 64 + i)
        expect.append(t)
    assert r.token_times == pytest.approx([x + c.token_s for x in expect], abs=1e-12)


def test_one_token_request_ends_at_the_prefill_worker():
    (r,) = simulate(disagg(), [TraceRequest(0, 50, 1, 0.0)])
    assert r.completion_tokens == 1 and len(r.token_times) == 1 and r.tpot == 0.0


def test_same_trace_same_records():
    trace = workload_trace("chat", 80, 3.0, seed=4).requests
    a = [r.to_dict() for r in simulate(disagg(2, 2), trace, seed=1)]
    b = [r.to_dict() for r in simulate(disagg(2, 2), trace, seed=1)]
    assert a == b


def test_more_prefill_instances_never_raise_ttft():
    trace = workload_trace("summarize", 120, 4.0, seed=2).requests
    means, p90s = [], []
    for p in (1, 2, 3, 4):
        ok = [r for r in simulate(disagg(p, 4), trace) if r.ok]
        assert len(ok) == len(trace)
        ttft = [r.ttft for r in ok]
        means.append(sum(ttft) / len(ttft))
        p90s.append(percentile(ttft, 90))
    assert all(a >= b - 1e-9 for a, b in zip(means, means[1:])), means
    assert all(a >= b - 1e-9 for a, b in zip(p90s, p90s[1:])), p90s
    assert means[0] > 2 * means[-1]  # at this load one prefill worker queues


def test_more_decode_instances_never_raise_tpot():
    trace = workload_trace("code", 120, 8.0, seed=3).requests
    tpots = []
    for d in (1, 2, 4):
        res = simulate(disagg(4, d), trace)
        tpots.append(sum(r.tpot for r in res) / len(res))
    assert tpots[0] >= tpots[1] >= tpots[2]


def test_prefill_batches_whole_prompts_up_to_the_token_budget():
    # two 800-token prompts fit one 2048-token step: both first tokens at the same time
    a, b = simulate(disagg(costs=ServingCosts()), [TraceRequest(0, 800, 2, 0.0), TraceRequest(1, 800, 2, 0.0)])
    assert a.token_times[0] == b.token_times[0] == pytest.approx(STEP.prefill_s([(0, 800), (0, 800)]))
    # two 1500-token prompts do not: the second waits for the first step
    a, b = simulate(disagg(costs=ServingCosts()), [TraceRequest(0, 1500, 2, 0.0), TraceRequest(1, 1500, 2, 0.0)])
    assert a.token_times[0] == pytest.approx(STEP.prefill_s([(0, 1500)]))
    assert b.token_times[0] == pytest.approx(2 * STEP.prefill_s([(0, 1500)]))


def test_decode_admission_waits_for_free_blocks():
    # each request needs ceil((64 + 32 - 1) / 16) = 6 blocks; 12 blocks hold two at a time
    reqs = [TraceRequest(i, 64, 32, 0.0) for i in range(4)]
    res = simulate(disagg(blocks=12, costs=ServingCosts()), reqs)
    assert all(r.ok for r in res)
    by_end = sorted(res, key=lambda r: r.end_s)
    first_two_end = by_end[1].end_s
    for r in res:
        decoding = [x for x in res if x is not r and x.token_times[1] <= r.token_times[1] < x.end_s]
        assert len(decoding) <= 1  # never more than two decode at once
    waited = [r for r in res if r.phases["decode_queue_s"] > 0]
    assert len(waited) == 2 and all(r.token_times[1] >= by_end[0].end_s for r in waited)
    assert max(r.end_s for r in res) > first_two_end


def test_prefill_memory_holds_kv_until_the_decode_side_pulls_it():
    # the prefill worker holds one 64-token prompt (4 blocks); the decode worker one request at a time:
    # the next prompt waits on prefill until the previous KV is pulled, which waits for decode room
    reqs = [TraceRequest(i, 64, 20, 0.0) for i in range(3)]
    res = simulate(disagg(blocks=6, prefill_blocks=4, costs=ServingCosts()), reqs)
    firsts = sorted(r.token_times[0] for r in res)
    ends = sorted(r.end_s for r in res)
    assert firsts[2] > ends[0]  # the third prompt could only be prefilled after the first left decode


def test_requests_that_can_never_fit_fail_instead_of_hanging():
    res = simulate(disagg(blocks=3), [TraceRequest(0, 64, 64, 0.0), TraceRequest(1, 16, 4, 0.0)])
    assert not res[0].ok and "KV blocks" in res[0].error
    assert res[1].ok
    s = summarize(res, 10, 1)
    assert s["failed"] == 1


def test_chunked_prefill_keeps_decodes_moving_behind_long_prompts():
    long = [TraceRequest(i, 1500, 4, 0.2 * i) for i in range(1, 6)]
    chatty = [TraceRequest(0, 32, 60, 0.0)]
    plain = simulate(coloc(max_num_batched_tokens=2048), chatty + long)[0]
    chunked = simulate(coloc(chunked=True, max_num_batched_tokens=256), chatty + long)[0]
    gaps = lambda r: max(b - a for a, b in zip(r.token_times, r.token_times[1:]))  # noqa: E731
    assert gaps(chunked) < gaps(plain) / 2


def test_pipeline_stages_keep_one_request_latency_and_overlap_batches():
    pp2 = StepModel(STEP.prefill, STEP.decode, pp=2)
    one = SuiteSpec(colocated=(EngineSpec(pp2, 10_000),))
    (r,) = simulate(one, [TraceRequest(0, 256, 2, 0.0)])
    assert r.token_times[0] == pytest.approx(STEP.prefill_s([(0, 256)]))  # two stages of half the time each
    many = [TraceRequest(i, 512, 1, 0.0) for i in range(4)]
    flat = simulate(SuiteSpec(colocated=(EngineSpec(STEP, 10_000, max_num_batched_tokens=512),)), many)
    piped = simulate(SuiteSpec(colocated=(EngineSpec(pp2, 10_000, max_num_batched_tokens=512),)), many)
    assert max(r.end_s for r in piped) < 0.7 * max(r.end_s for r in flat)


def test_engine_overheads_add_to_every_step():
    costs = ServingCosts(step_s=0.005, seq_s=0.001)
    (r,) = simulate(SuiteSpec(colocated=(EngineSpec(STEP, 10_000),), costs=costs), [TraceRequest(0, 10, 3, 0.0)])
    assert r.token_times[0] == pytest.approx(STEP.prefill_s([(0, 10)]) + 0.005)
    assert r.token_times[1] - r.token_times[0] == pytest.approx(STEP.decode_s(1, 11) + 0.006)


def test_workload_trace_is_bench_serves_request_list():
    from distserve.bench.workloads import arrival_times, lengths

    t = workload_trace("code", 25, 2.0, seed=7).requests
    assert [(r.prompt_len, r.output_len) for r in t] == lengths("code", 25, 7)
    assert [r.arrival_s for r in t] == arrival_times(25, 2.0, "poisson", 1.0, 7)


def test_placements_parse_and_print_their_up_command():
    p = parse_placement("2p3d", threads=1, weights="int8")
    assert (p.prefill, p.decode, p.units("cpu")) == (2, 3, 5)
    assert p.up_command("smollm2-135m") == "distserve up --model smollm2-135m --prefill 2 --decode 3 --threads 1 --weights int8"
    c = parse_placement("2c", threads=1, weights="fp32", chunked=True)
    assert "--colocated 2" in c.up_command("m") and "--chunked-prefill=true" in c.up_command("m")
    assert c.compose_command() is None
    g = parse_placement("c21d11")
    assert (g.tp_prefill, g.pp_prefill, g.tp_decode, g.pp_decode, g.units("gpu")) == (2, 1, 1, 1, 3)
    with pytest.raises(ValueError):
        parse_placement("3x")
    with pytest.raises(ValueError):
        Placement(prefill=1)


def test_no_request_waits_forever_when_nothing_is_served():
    res = simulate(disagg(), [])
    assert res == []
    assert math.isfinite(STEP.decode_s(1, 1))


def test_chunked_steps_with_decodes_keep_within_the_tpot_target():
    """The engine's chunk cap (engine.chunk_cap): a step that carries running decodes takes only the prompt
    tokens that keep its predicted time within the target, and at least a block's worth when the decodes
    alone pass it. The prediction, like the engine's planar fit, knows a chunk's tokens, not where in its
    prompt it starts: a step model without the squared term makes it exact here."""
    flat = StepModel(prefill=(0.010, 0.001, 0.0, 0.0), decode=STEP.decode)
    spec = lambda **kw: SuiteSpec(colocated=(EngineSpec(flat, 10_000, chunked_prefill=True, **kw),), costs=COSTS)  # noqa: E731
    reqs = [TraceRequest(0, 32, 80, 0.0), TraceRequest(1, 1500, 2, 0.1)]
    target = 0.075  # a decode step of the short request takes ~21 ms: room for ~44 prompt tokens beside it
    capped, free = simulate(spec(tpot_target_s=target), reqs), simulate(spec(), reqs)
    gaps = lambda r: [b - a for a, b in zip(r.token_times, r.token_times[1:])]  # noqa: E731
    assert max(gaps(capped[0])) <= target + 1e-9 < max(gaps(free[0]))
    assert capped[1].ttft > free[1].ttft  # the long prompt advances in small chunks while the short one decodes
    floor = simulate(spec(tpot_target_s=0.015), reqs)  # the decode alone passes it: a block (16 tokens) a step
    assert floor[1].ok and floor[1].ttft > capped[1].ttft


def test_a_slowdown_stretches_every_engine_step_and_nothing_else():
    """SuiteSpec.slowdown: cores shared with other work make every step take longer, not the costs between them."""
    from dataclasses import replace

    (r,) = simulate(coloc(), [TraceRequest(0, 100, 3, 0.0)])
    (s,) = simulate(replace(coloc(), slowdown=2.0), [TraceRequest(0, 100, 3, 0.0)])
    c = COSTS
    assert r.token_times[0] == pytest.approx(c.router_s + c.decode_call_s + STEP.prefill_s([(0, 100)]) + c.token_s)
    assert s.token_times[0] == pytest.approx(c.router_s + c.decode_call_s + 2 * STEP.prefill_s([(0, 100)]) + c.token_s)
    assert s.token_times[1] - s.token_times[0] == pytest.approx(2 * (r.token_times[1] - r.token_times[0]))
