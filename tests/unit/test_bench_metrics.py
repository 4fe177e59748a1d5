"""The serving benchmark's arithmetic on synthetic timelines: TTFT/TPOT, percentiles, SLO attainment,
SLO scale, the goodput search, arrivals and request lists (no servers, no model)."""

from __future__ import annotations

import asyncio
import json
import math
import statistics

import pytest

from distserve.bench.goodput import GoodputSearch, scale_curve, slo_pair
from distserve.bench.metrics import RequestResult, attainment, percentile, required_scale, slo_scale, summarize
from distserve.bench.openai_target import sse_events
from distserve.bench.workloads import MIXES, SHARED_PREFIX, arrival_times, build_requests, lengths, with_arrivals

pytestmark = pytest.mark.timeout(60)


def timeline(index: int, send: float, ttft: float, tpot: float, n: int, phases=None) -> RequestResult:
    first = send + ttft
    times = [first + i * tpot for i in range(n)]
    return RequestResult(index, 100, n, send, times, times[-1] + 0.001, n, "length", "", phases)


def test_ttft_tpot_e2e_from_token_times():
    r = timeline(0, send=1.0, ttft=0.5, tpot=0.04, n=11)
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.04)  # (last - first) / (n - 1), the first token excluded
    assert r.e2e == pytest.approx(0.5 + 10 * 0.04 + 0.001)
    uneven = RequestResult(1, 10, 3, 0.0, [1.0, 1.1, 1.5], 1.5, 3)
    assert uneven.tpot == pytest.approx(0.25)
    one = timeline(2, 0.0, 0.3, 0.0, 1)
    assert one.tpot == 0.0 and one.ttft == pytest.approx(0.3)
    # a chunk carrying several tokens: the server's count is the divisor
    chunky = RequestResult(3, 10, 5, 0.0, [1.0, 2.0], 2.0, completion_tokens=5)
    assert chunky.tpot == pytest.approx(0.25)


def test_failed_request_meets_nothing_and_counts():
    bad = RequestResult(0, 10, 5, 0.0, error="Unavailable: no worker")
    good = timeline(1, 0.0, 0.1, 0.01, 5)
    assert not bad.ok and math.isinf(bad.ttft) and math.isinf(bad.e2e)
    assert attainment([bad, good], 1.0, 1.0) == 0.5
    s = summarize([bad, good], 1.0, 1.0)
    assert s["failed"] == 1 and s["requests"] == 2 and s["errors"] == ["Unavailable: no worker"]
    none_ok = summarize([bad], 1.0, 1.0)
    assert none_ok["slo_scale"] is None and none_ok["ttft"]["p50"] is None and none_ok["attainment"] == 0.0
    json.dumps(none_ok, allow_nan=False)  # standard JSON, no Infinity/NaN


def test_percentile_matches_statistics_inclusive():
    xs = [0.3, 1.7, 0.2, 5.0, 2.2, 0.9, 4.1]
    cuts = statistics.quantiles(xs, n=100, method="inclusive")
    for q in (50, 90, 99):
        assert percentile(xs, q) == pytest.approx(cuts[q - 1])
    assert percentile([2.0], 99) == 2.0
    assert math.isnan(percentile([], 50))


def test_attainment_needs_both_slos():
    rs = [
        timeline(0, 0.0, 0.5, 0.05, 10),  # meets both
        timeline(1, 0.0, 2.5, 0.05, 10),  # TTFT too slow
        timeline(2, 0.0, 0.5, 0.20, 10),  # TPOT too slow
        timeline(3, 0.0, 2.0, 0.10, 10),  # exactly at both limits: meets
    ]
    assert attainment(rs, slo_ttft=2.0, slo_tpot=0.1) == 0.5
    s = summarize(rs, 2.0, 0.1)
    assert s["ttft_attainment"] == 0.75 and s["tpot_attainment"] == 0.75 and s["attainment"] == 0.5


def test_slo_scale_is_the_smallest_factor_reaching_the_target():
    # required factors: 0.5, 1, 1.5, ..., 5 (ten requests); 90% needs the 9th smallest = 4.5
    rs = [timeline(i, 0.0, 0.5 * (i + 1), 0.01, 4) for i in range(10)]
    assert [required_scale(r, 1.0, 1.0) for r in rs] == pytest.approx([0.5 * (i + 1) for i in range(10)])
    f = slo_scale(rs, 1.0, 1.0, 0.9)
    assert f == pytest.approx(4.5)
    assert attainment(rs, f, f) >= 0.9 and attainment(rs, f * 0.999, f * 0.999) < 0.9
    # TPOT-bound requests: the factor is the larger of the two ratios
    r = timeline(0, 0.0, 0.1, 0.3, 5)
    assert required_scale(r, 1.0, 0.1) == pytest.approx(3.0)
    assert math.isinf(slo_scale([RequestResult(0, 1, 1, 0.0, error="x")] * 2 + rs[:1], 1.0, 1.0))
    curve = dict(scale_curve(rs, 1.0, 1.0))
    assert curve[1.0] == 0.2 and curve[3.0] == 0.6


def _search(att_of_rate, rates, steps=3):
    s = GoodputSearch(rates, 0.9, steps, rel_tol=0.0)
    seen = []
    while (r := s.next_rate()) is not None:
        seen.append(r)
        s.record(r, att_of_rate(r))
    return s, seen


def test_goodput_sweep_stops_at_first_failure_then_bisects():
    cliff = 1.3  # attainment falls below 90% above 1.3 req/s
    s, seen = _search(lambda r: 1.0 if r <= cliff else 0.5, [0.25, 0.5, 1, 2, 4], steps=3)
    assert seen == [0.25, 0.5, 1, 2, 1.5, 1.25, 1.375]  # 4 is never run
    assert s.goodput == 1.25 and s.bounded
    assert s.lo <= cliff < s.hi and s.hi - s.lo == pytest.approx(0.125)


def test_goodput_edge_cases():
    s, seen = _search(lambda r: 0.95, [1, 2])  # never fails: a lower bound
    assert s.goodput == 2 and not s.bounded and seen == [1, 2]
    s, seen = _search(lambda r: 0.0 if r > 0.2 else 1.0, [1, 2], steps=3)  # first rate already fails
    assert seen == [1, 0.5, 0.25, 0.125] and s.goodput == 0.125
    s, _ = _search(lambda r: 0.0, [1], steps=2)
    assert s.goodput == 0.0 and s.bounded
    with pytest.raises(ValueError):
        GoodputSearch([], 0.9)
    assert GoodputSearch([1, 2], 0.9, 3, rel_tol=0.6).next_rate() == 1  # tolerance only ends the bisection


def test_also_slo_pairs_parse_or_say_what_is_wrong():
    import argparse

    assert slo_pair("8,0.2") == (8.0, 0.2)
    for bad in ("8", "8,0.2,1", "a,b", "0,0.2", "8,-1", "inf,0.2", "nan,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            slo_pair(bad)


def test_summary_phases_and_throughput():
    ph = {"router_s": 0.001, "prefill_queue_s": 0.2, "prefill_compute_s": 0.3, "kv_transfer_s": 0.01, "decode_queue_s": 0.0, "decode_s": 1.0}
    rs = [timeline(i, float(i), 0.5, 0.05, 21, ph) for i in range(4)]
    s = summarize(rs, 1.0, 0.1, duration_s=10.0)
    assert s["throughput_rps"] == 0.4 and s["output_tok_s"] == pytest.approx(8.4)
    assert s["phases_mean"]["prefill_compute_s"] == pytest.approx(0.3)
    assert s["tpot"]["p50"] == pytest.approx(0.05) and s["attainment"] == 1.0
    assert RequestResult.from_dict(rs[0].to_dict()) == rs[0]
    assert "disagg_decisions" not in s  # a target that does not say where it prefilled
    rs[0].disagg, rs[1].disagg, rs[2].disagg = "local", "remote", "local"
    assert summarize(rs, 1.0, 0.1, duration_s=10.0)["disagg_decisions"] == {"local": 2, "remote": 1}
    assert RequestResult.from_dict(rs[0].to_dict()).disagg == "local"
    assert "disagg_reasons" not in summarize(rs, 1.0, 0.1, duration_s=10.0)  # none said why
    rs[0].disagg_reason, rs[1].disagg_reason, rs[2].disagg_reason = "estimate", "estimate", "kv_lost"
    rs[0].local_estimate_s, rs[0].remote_estimate_s = 0.4, 1.5
    assert summarize(rs, 1.0, 0.1, duration_s=10.0)["disagg_reasons"] == {"local:estimate": 1, "local:kv_lost": 1, "remote:estimate": 1}
    back = RequestResult.from_dict(rs[0].to_dict())
    assert (back.disagg_reason, back.local_estimate_s, back.remote_estimate_s) == ("estimate", 0.4, 1.5)


def test_arrivals_rate_cv_and_seed():
    n, rate = 4000, 2.0
    for cv in (1.0, 2.0, 0.5):
        t = arrival_times(n, rate, "gamma", cv, seed=1)
        gaps = [b - a for a, b in zip(t, t[1:])]
        assert t[0] == 0.0
        assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.1)
        assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(cv, rel=0.15)
    assert arrival_times(50, 1.0, "poisson", seed=3) == arrival_times(50, 1.0, "poisson", seed=3)
    assert arrival_times(50, 1.0, "poisson", seed=3) != arrival_times(50, 1.0, "poisson", seed=4)
    with pytest.raises(ValueError):
        arrival_times(5, 0.0)


def test_workloads_are_seeded_exact_and_in_range():
    from distserve.tokenization import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    a = build_requests("chat", 20, tok, seed=7)
    b = build_requests("chat", 20, tok, seed=7)
    assert [(r.prompt_ids, r.output_len) for r in a] == [(r.prompt_ids, r.output_len) for r in b]
    assert [r.prompt_ids for r in a] != [r.prompt_ids for r in build_requests("chat", 20, tok, seed=8)]
    for r in a:
        assert len(r.prompt_ids) == r.prompt_len and 64 <= r.prompt_len <= 384 and 16 <= r.output_len <= 128
        assert tok.decode(r.prompt_ids) == r.prompt_text
    for name, mix in MIXES.items():
        ls = lengths(name, 200, 0)
        assert all(mix.prompt_lo <= p <= mix.prompt_hi and mix.output_lo <= o <= mix.output_hi for p, o in ls)
    mean_p = {n: statistics.mean(p for p, _ in lengths(n, 300, 0)) for n in MIXES}
    mean_o = {n: statistics.mean(o for _, o in lengths(n, 300, 0)) for n in MIXES}
    assert mean_p["summarize"] > 3 * mean_p["chat"] > 3 * mean_p["code"] / 2
    assert mean_o["code"] > mean_o["chat"] > mean_o["summarize"]
    timed = with_arrivals(a, 2.0, seed=7)
    assert [r.prompt_ids for r in timed] == [r.prompt_ids for r in a] and timed[-1].arrival_s > 0


@pytest.mark.parametrize("workload", [*MIXES, "shared-prefix"])
def test_variants_and_the_warm_up_share_no_prompt_block_with_the_measured_requests(workload):
    """bench goodput sends variant k at its k-th rate and warms up on other words: with one list for all
    rates the prompts of every rate after the first were 93-95% in the suite's prefix cache (2026-12-04)."""
    from distserve.bench.serve import warm_up_list
    from distserve.tokenization import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    runs = [build_requests(workload, 12, tok, seed=0, variant=v) for v in range(3)]
    warm = warm_up_list(workload, runs[0], 2, tok, 0)
    assert [(r.prompt_len, r.output_len) for r in runs[1]] == [(r.prompt_len, r.output_len) for r in runs[0]]
    skip = SHARED_PREFIX["system"] if workload == "shared-prefix" else 0  # its own system prompt is meant to repeat
    blocks = [{tuple(r.prompt_ids[skip + i: skip + i + 16]) for i in range(0, r.prompt_len - skip - 15, 16)} for r in runs[0]]
    seen = set().union(*blocks)
    for other in [*runs[1:], warm]:
        for r in other:
            assert not {tuple(r.prompt_ids[skip + i: skip + i + 16]) for i in range(0, r.prompt_len - skip - 15, 16)} & seen


def test_shared_prefix_and_multiturn_workloads():
    from distserve.bench.workloads import MULTITURN, SHARED_PREFIX, conversations
    from distserve.tokenization import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    sp = build_requests("shared-prefix", 12, tok, seed=1)
    system = sp[0].prompt_ids[: SHARED_PREFIX["system"]]
    for r in sp:
        assert r.prompt_ids[: len(system)] == system and 16 <= r.prompt_len - len(system) <= 64 and 16 <= r.output_len <= 64
    other = build_requests("shared-prefix", 12, tok, seed=1, variant=1)  # other words, same lengths
    assert [r.prompt_len for r in other] == [r.prompt_len for r in sp] and other[0].prompt_ids[:8] != system[:8]

    mt = build_requests("multiturn", 30, tok, seed=2)
    convs = conversations(mt)
    assert len(mt) == 30 and [r.index for r in mt] == list(range(30)) and len(convs) >= 30 // MULTITURN["turns"][1]
    system = mt[0].prompt_ids[: MULTITURN["system"]]
    for conv in convs:
        first, *rest = conv
        assert first.turn == 0 and first.prompt_ids[: len(system)] == system and first.think_s == 0
        for t, r in enumerate(rest, start=1):  # built at send time from the answers before
            assert r.turn == t and r.prompt_ids is None and r.user_ids and r.think_s > 0 and len(r.reply_ids) == r.output_len
    timed = with_arrivals(mt, 2.0, seed=2)
    starts = {r.conversation: r.arrival_s for r in timed}
    assert all(r.arrival_s == starts[r.conversation] for r in timed)  # a conversation's turns share its start
    # conversations start at rate / mean turns, so the long-run request rate is the rate asked
    assert sorted(starts.values())[-1] == pytest.approx(arrival_times(len(convs), 2.0 * len(convs) / 30, seed=2)[-1])


def test_jsonl_workload(tmp_path):
    from distserve.tokenization import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    f = tmp_path / "w.jsonl"
    f.write_text('{"prompt": "hello there", "output_len": 7}\n\n{"prompt": "abc", "output_len": 2}\n')
    rs = build_requests(f"jsonl:{f}", 3, tok)
    assert [(r.prompt_text, r.output_len, r.prompt_len) for r in rs] == [("hello there", 7, 11), ("abc", 2, 3), ("hello there", 7, 11)]
    f.write_text('{"prompt": "", "output_len": 7}\n')
    with pytest.raises(ValueError):
        build_requests(f"jsonl:{f}", 1, tok)


def test_sse_parsing_across_chunk_boundaries():
    pieces = [b'data: {"a"', b': 1}\r\n\r\nda', b"ta: [DONE]\n\n"]

    async def body():
        for p in pieces:
            yield p

    async def collect():
        return [e async for e in sse_events(body())]

    assert asyncio.run(collect()) == ['{"a": 1}', "[DONE]"]
