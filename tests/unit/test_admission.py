"""Admission control's decisions and counts (services/router/admission.py), no servers."""

from __future__ import annotations

import pytest

from distserve.errors import ResourceExhausted
from services.router.admission import Admission, Shed, decide, expected_wait_s

LIMITS = dict(max_inflight=2, max_queued_tokens=100, retry_after_ms=250)


def test_decide_admits_below_the_limits_and_refuses_past_them_with_the_hint():
    assert decide(1, 50, 50, **LIMITS).admit
    d = decide(2, 0, 0, **LIMITS)
    assert not d.admit and "max_inflight 2" in d.reason and d.retry_after_ms == 250
    d = decide(1, 60, 41, **LIMITS)
    assert not d.admit and "max_queued_tokens 100" in d.reason
    assert decide(0, 0, 5000, **LIMITS).admit  # alone, a prompt larger than the bound still gets in


def test_expected_wait_and_the_deadline_rule():
    assert expected_wait_s(300, 100, None) is None  # no rate measured: no estimate
    assert expected_wait_s(300, 100, 200.0) == pytest.approx(2.0)
    assert decide(0, 0, 10, **LIMITS, wait_s=2.0, deadline_left_s=3.0).admit
    d = decide(0, 0, 10, **LIMITS, wait_s=2.0, deadline_left_s=0.5)
    assert not d.admit and "deadline" in d.reason and d.retry_after_ms == 1500
    assert decide(0, 0, 10, **LIMITS, wait_s=2.0, deadline_left_s=None).admit  # no deadline: never too late


def test_tickets_count_and_give_back_slots_and_tokens():
    a = Admission(**LIMITS)
    t1, t2 = a.admit_call(), a.admit_call()
    with pytest.raises(Shed) as err:
        a.admit_call()
    assert isinstance(err.value, ResourceExhausted) and err.value.retry_after_ms == 250
    t1.queue(60)
    with pytest.raises(Shed):
        t2.queue(41)
    assert (a.inflight, a.queued_tokens) == (2, 60)
    t1.prefilled()
    assert a.queued_tokens == 0
    t2.queue(41)
    t2.close()
    t2.close()  # idempotent
    t1.close()
    assert (a.inflight, a.queued_tokens) == (0, 0)


def test_the_measured_prefill_rate_refuses_a_request_that_cannot_meet_its_deadline():
    a = Admission(max_inflight=10, max_queued_tokens=10**9)
    t = a.admit_call()
    t.queue(100, pool_queued_tokens=10_000, deadline_left_s=1.0)  # no rate yet: admitted
    t.close()
    a.observe_prefill(1000, 1.0)  # 1000 tokens/s
    a.observe_prefill(0, 0.0)  # ignored
    assert a.prefill_rate == pytest.approx(1000.0)
    t = a.admit_call()
    with pytest.raises(Shed, match="exceeds"):
        t.queue(100, pool_queued_tokens=10_000, deadline_left_s=1.0)  # ~10.1 s of queue, 1 s left
    t.queue(100, pool_queued_tokens=500, deadline_left_s=1.0)  # 0.6 s: fits
    t.close()
    assert (a.inflight, a.queued_tokens) == (0, 0)
