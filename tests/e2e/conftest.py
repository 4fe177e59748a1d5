"""The whole suite as separate processes, started by `distserve up`, for end-to-end tests."""

from __future__ import annotations

import asyncio

import pytest

from distserve.up import UpProcess  # noqa: F401  (used by the tests)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def dump_on_failure(request):
    """Tests call `dump_on_failure(suite)`; the suite's logs print if the test fails."""
    suites = []
    yield suites.append
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for s in suites:
            s.dump()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
