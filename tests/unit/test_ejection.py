"""Outlier ejection on a fake clock: who is left out of routing, for how long, and when they return."""

from __future__ import annotations

import pytest

from services.router.ejection import OutlierEjector


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_ejected_after_threshold_failures_in_a_row_and_back_after_the_cool_down():
    clock = Clock()
    e = OutlierEjector(threshold=3, base_s=10, max_s=60, clock=clock)
    assert not e.failure("a") and not e.failure("a")
    assert e.ejected() == set()
    assert e.failure("a")
    assert e.ejected() == {"a"}
    clock.t += 9.9
    assert e.ejected() == {"a"}
    clock.t += 0.2
    assert e.ejected() == set()


def test_a_success_resets_the_count():
    e = OutlierEjector(threshold=2, base_s=10, clock=Clock())
    e.failure("a")
    e.success("a")
    assert not e.failure("a")
    assert e.ejected() == set()
    assert e.failure("a")


def test_a_worker_on_probation_is_ejected_again_at_its_first_failure_for_twice_as_long():
    clock = Clock()
    e = OutlierEjector(threshold=3, base_s=10, max_s=25, clock=clock)
    for _ in range(3):
        e.failure("a")
    clock.t += 10.5  # back, on probation
    assert e.failure("a")  # one failure is enough now
    clock.t += 19.9
    assert e.ejected() == {"a"}  # 20 s this time
    clock.t += 0.2
    assert e.ejected() == set()
    assert e.failure("a")
    clock.t += 24.9
    assert e.ejected() == {"a"}  # capped at max_s = 25
    clock.t += 0.2
    assert e.ejected() == set()


def test_after_a_quiet_spell_the_record_is_clean_again():
    clock = Clock()
    e = OutlierEjector(threshold=2, base_s=10, clock=clock)
    e.failure("a")
    e.failure("a")
    clock.t += 100  # well past 8 x base_s
    e.success("a")
    assert not e.failure("a")  # threshold applies again, not probation


def test_workers_are_counted_apart():
    e = OutlierEjector(threshold=2, base_s=10, clock=Clock())
    e.failure("a")
    e.failure("b")
    assert e.ejected() == set()
    e.failure("b")
    assert e.ejected() == {"b"}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        OutlierEjector(threshold=0)
    with pytest.raises(ValueError):
        OutlierEjector(base_s=10, max_s=5)
