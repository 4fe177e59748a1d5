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


def test_a_send_counts_until_a_sample_taken_after_it_is_read():
    from distserve.state.registry import WorkerLoad, WorkerView
    from services.router.picker import SENT_MAX_S, SENT_SLACK_S, Sent

    def seen(sent, updated_at, now, wid="a"):
        sent.seen([WorkerView(_view(wid, "decode").info, WorkerLoad(updated_at=updated_at))], now=now)

    s = Sent()
    s.add("a", requests=1, tokens=300, now=100.0)  # a request it is to prefill itself
    s.add("a", tokens=50, now=100.3)
    seen(s, updated_at=99.9, now=100.4)  # a sample from before both sends: both still count
    assert (s.requests("a"), s.tokens("a")) == (1, 300 + 50)
    seen(s, updated_at=100.0 + SENT_SLACK_S / 2, now=100.5)  # the first may still be on its way then
    assert s.requests("a") == 1
    seen(s, updated_at=100.0 + 2 * SENT_SLACK_S, now=100.5)  # taken after the first: it shows there
    assert (s.requests("a"), s.tokens("a")) == (0, 50)
    seen(s, updated_at=50.0, now=100.3 + SENT_MAX_S + 0.1)  # a clock far behind: forgotten after SENT_MAX_S
    assert s.tokens("a") == 0
    s.add("a", tokens=7, now=300.0)
    s.add("a", tokens=8, now=300.0 + SENT_MAX_S + 0.1)  # no read between (Redis down): the older send is forgotten anyway
    assert s.tokens("a") == 8
    s.add("b", requests=2, now=200.0)
    seen(s, updated_at=0.0, now=200.1)  # b is no longer listed: forgotten
    assert s.requests("b") == 0


def test_a_colocated_worker_with_queued_prompts_is_not_taken_for_idle():
    import asyncio
    import dataclasses

    async def go():
        queued = _view("c1", "colocated", running=2)
        queued = dataclasses.replace(queued, load=dataclasses.replace(queued.load, queued_requests=5, open_requests=7))
        p = _picker_with([queued, _view("c2", "colocated", running=4)])
        need = lambda bs: 1  # noqa: E731
        # by running batch alone c1 (2) looks idler than c2 (4); it holds 7 requests against 4
        assert {(await p.peek_decode(need, role="colocated")).worker_id for _ in range(20)} == {"c2"}
        # one that publishes no open requests is counted by running and queued
        bare = dataclasses.replace(queued, load=dataclasses.replace(queued.load, open_requests=0))
        p = _picker_with([bare, _view("c2", "colocated", running=6)])
        assert {(await p.peek_decode(need, role="colocated")).worker_id for _ in range(20)} == {"c2"}
        # three sends to c2 (now at 9) since the samples: c1 (7) takes the next
        for _ in range(3):
            p.claim_decode(p._views[1])
        assert p.assigned(p._views[1]) == 9
        assert (await p.pick_decode(need, role="colocated")).worker_id == "c1"

    asyncio.run(go())
