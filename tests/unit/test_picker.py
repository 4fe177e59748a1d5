"""The router's choice among workers of equal load."""

from services.router.picker import least


def test_least_loaded_wins_and_ties_are_shared():
    loads = {"a": 3, "b": 1, "c": 1, "d": 2}
    picks = [least(list(loads), key=loads.get) for _ in range(400)]
    assert set(picks) == {"b", "c"}  # only the least loaded, and each of the tied ones
    assert min(picks.count("b"), picks.count("c")) > 100  # about half each (P(<=100 of 400) ~ 1e-23)
    assert least(["x"], key=lambda v: 0) == "x"
