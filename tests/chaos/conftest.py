"""Fixtures of the chaos suite: one whole suite per module, its reference tokens, logs on failure."""

from __future__ import annotations

import pytest

from tests.chaos.harness import ChaosCluster, run_reference, workload


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    """Redis + 2 prefill + 2 decode + 2 routers, started once per module (a start costs ~20-80 s of the
    2 cores, so each test repairs what it broke instead of starting a fresh suite), and the reference
    tokens of the workload from an undisturbed run through both routers."""
    logs = tmp_path_factory.mktemp("chaos-logs")
    c = ChaosCluster(logs)
    try:
        c.start_all()
        c.ensure_whole()
        wl = workload()
        ref = run_reference(c.targets, wl)
        yield c, wl, ref
    finally:
        c.close()


@pytest.fixture
def logs_on_failure(request, chaos):
    """A failing test prints the tail of every service's log (the full logs stay in the module's tmp dir)."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        c = chaos[0]
        print(f"service logs: {c.logs}")
        for name, svc in c.procs.items():
            print(f"---- {name} (exit {svc.popen.poll()}) ----\n{svc.text()[-2500:]}")
