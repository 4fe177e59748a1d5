"""The router's choice among workers of equal load."""

from services.router.picker import least


def test_least_loaded_wins_and_ties_are_shared():
    loads = {"a": 3, "b": 1, "c": 1, "d": 2}
    picks = [least(list(loads), key=loads.get) for _ in range(400)]
    assert set(picks) == {"b", "c"}  # only the least loaded, and each of the tied ones
    assert min(picks.count("b"), picks.count("c")) > 100  # about half each (P(<=100 of 400) ~ 1e-23)
    assert least(["x"], key=lambda v: 0) == "x"


def _picker_with(views):
    """A picker whose last registry read returned `views` (no read happens within refresh_s)."""
    import time

    from services.router.ejection import OutlierEjector
    from services.router.picker import WorkerPicker

    p = WorkerPicker(registry=None, model="m", refresh_s=3600, ejector=OutlierEjector(threshold=1, base_s=60))
    p._views, p._read_at = views, time.monotonic()
    return p


def _view(wid, role, running=0):
    from distserve.state.registry import WorkerInfo, WorkerLoad, WorkerView

    info = WorkerInfo(wid, role, f"127.0.0.1:{1000 + len(wid)}", "", "m", "h", ("grpc",), 100, 16, 2048, 0.0)
    return WorkerView(info, WorkerLoad(running_requests=running, free_blocks=100, total_blocks=100))


def test_ejected_and_excluded_workers_get_nothing_while_another_can_take_it():
    import asyncio

    async def go():
        p = _picker_with([_view("d1", "decode"), _view("d2", "decode", running=5), _view("p1", "prefill")])
        need = lambda bs: 1  # noqa: E731
        assert (await p.pick_decode(need)).worker_id == "d1"  # least loaded
        assert (await p.pick_decode(need, exclude={"d1"})).worker_id == "d2"  # a request's failed worker is avoided
        p.ejector.failure("d1")
        assert {(await p.pick_decode(need)).worker_id for _ in range(20)} == {"d2"}  # ejected: left out
        p.ejector.failure("d2")
        # everyone is ejected: the picker still serves (a worker on probation beats refusing the request)
        assert (await p.pick_decode(need)).worker_id in {"d1", "d2"}
        assert (await p.pick_decode(need, exclude={"d2"})).worker_id == "d1"
        assert (await p.pick_prefill(10, exclude={"p1"})).worker_id == "p1"  # the only one: tried again

    asyncio.run(go())
