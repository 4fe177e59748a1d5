"""benchmarks/overload.py's arithmetic: the admission settings it derives and the figures of one point."""

import argparse
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("overload", Path(__file__).resolve().parents[2] / "benchmarks" / "overload.py")
overload = importlib.util.module_from_spec(spec)
spec.loader.exec_module(overload)


def args(**kw):
    base = dict(workload="chat", capacity=1.0, ttft_at_capacity=1.5, tpot_at_capacity=0.05, prefill_tok_s=600.0,
                slo_ttft=4.0, slo_tpot=0.08, max_inflight=0, max_queued_tokens=0)
    return argparse.Namespace(**{**base, **kw})


def test_admission_settings_follow_littles_law_and_the_prefill_budget():
    inflight, queued, how = overload.admission_settings(args())
    mean_out = overload.mean_output_tokens("chat")
    assert inflight == int(-(-(1.0 * (1.5 + mean_out * 0.05)) // 1))
    assert queued == 1200  # 600 tok/s x 4 s / 2
    assert overload.admission_settings(args(capacity=2.0))[0] >= 2 * inflight - 1
    assert overload.admission_settings(args(max_inflight=7, max_queued_tokens=99))[:2] == (7, 99)
    assert "overridden" in overload.admission_settings(args(max_inflight=7))[2]["max_inflight"]


def test_summarize_point_counts_outcomes_and_attainment_of_the_admitted():
    recs = [
        {"status": "OK", "ttft_s": 1.0, "tpot_s": 0.05, "latency_s": 3.0, "message": ""},
        {"status": "OK", "ttft_s": 5.0, "tpot_s": 0.05, "latency_s": 8.0, "message": ""},  # misses TTFT
        {"status": "RESOURCE_EXHAUSTED", "latency_s": 0.002, "retry_after_s": 0.5, "message": "shed"},
        {"status": "RESOURCE_EXHAUSTED", "latency_s": 0.004, "retry_after_s": None, "message": "shed"},
        {"status": "INTERNAL", "latency_s": 0.01, "message": "boom"},
        {"status": "DEADLINE_EXCEEDED", "latency_s": 60.0, "message": "late"},
    ]
    s = overload.summarize_point(recs, 5.0, 10.0, args())
    assert (s["sent"], s["completed"], s["refused_resource_exhausted"], s["refused_with_retry_after"]) == (6, 2, 2, 1)
    assert s["other_errors"] == {"INTERNAL": 1, "DEADLINE_EXCEEDED": 1}
    assert s["internal_or_unknown"] == 1
    assert s["admitted_slo_attainment"] == 0.5
    assert s["goodput_rps"] == 0.1
    assert s["refusal_latency_p50_ms"] == pytest.approx(3.0)
    assert s["retry_after_s"] == [0.5]
