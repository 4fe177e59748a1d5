"""The router's choice of where to prefill (services/router/disagg.py), on constructed worker loads."""

import asyncio
import dataclasses
import json
import math
import time

import pytest

from distserve.kv.estimate import PullEstimate
from distserve.metrics import Metrics
from distserve.state.registry import WorkerInfo, WorkerLoad, WorkerView, _decode_load
from services.router.disagg import (
    MAX_SAMPLE_AGE_S, Disaggregation, DisaggPolicy, PairTransfers, decide, local_seconds, prefill_seconds,
)
from services.router.ejection import OutlierEjector
from services.router.picker import WorkerPicker

POLICY = DisaggPolicy("conditional", local_max_prompt_tokens=512, margin_s=0.2)
# a decode worker: 10 ms + 1 ms per decode or prompt token per step, 8 running, 40 prompt tokens a step within its target
DECODE = WorkerLoad(running_requests=8, free_blocks=100, total_blocks=100, step_fixed_s=0.010, step_token_s=0.001, step_decode_s=0.001,
                    max_step_tokens=2048, prefill_budget_tokens=40)
# a prefill worker: 5 ms + 1 ms per token per step, steps of up to 2048 tokens
PREFILL = WorkerLoad(step_fixed_s=0.005, step_token_s=0.001, max_step_tokens=2048)


def _load(base: WorkerLoad, **kw) -> WorkerLoad:
    return dataclasses.replace(base, **kw)


def test_local_estimate_counts_steps_of_decodes_plus_chunks():
    # 100 tokens in chunks of 40: 3 steps of (10 + 8) ms, plus 100 ms for the tokens
    assert local_seconds(100, DECODE) == pytest.approx(3 * 0.018 + 0.100)
    # its queue of local prompts goes first
    assert local_seconds(100, _load(DECODE, queued_tokens=60)) == pytest.approx(4 * 0.018 + 0.160)
    assert local_seconds(100, _load(DECODE, prefill_budget_tokens=0)) is None  # it does not prefill in chunks
    assert local_seconds(100, _load(DECODE, step_fixed_s=0.0, step_token_s=0.0, step_decode_s=0.0)) is None  # no fit published
    assert local_seconds(100, _load(DECODE, step_token_s=0.0)) == pytest.approx(3 * 0.018)  # prompt tokens measured as free


def test_prefill_estimate_from_the_fit_or_the_observed_rate():
    assert prefill_seconds(100, PREFILL) == pytest.approx(0.005 + 0.100)
    assert prefill_seconds(100, _load(PREFILL, queued_tokens=4000)) == pytest.approx(3 * 0.005 + 4.1)
    unfitted = WorkerLoad(queued_tokens=900)
    assert prefill_seconds(100, unfitted, observed_rate=1000.0) == pytest.approx(1.0)
    assert prefill_seconds(100, unfitted) is None and prefill_seconds(100, unfitted, math.inf) is None


def test_prefill_estimate_takes_off_what_the_step_in_flight_has_run():
    # 2000 queued tokens, the first 2000-token step (2.005 s) running for 1.5 s when published, 0.3 s ago
    busy = _load(PREFILL, queued_tokens=2000, step_elapsed_s=1.5, updated_at=1000.0)
    assert prefill_seconds(100, busy, now=1000.3) == pytest.approx(2 * 0.005 + 2.1 - 1.8)
    # a sample's age counts at most MAX_SAMPLE_AGE_S (another host's clock may disagree)
    assert prefill_seconds(100, _load(busy, step_elapsed_s=0.5), now=1100.0) == pytest.approx(2 * 0.005 + 2.1 - 0.5 - MAX_SAMPLE_AGE_S)
    assert prefill_seconds(100, busy, now=999.0) == pytest.approx(2 * 0.005 + 2.1 - 1.5)  # a clock behind: no age
    # between steps nothing is taken off; and however long the step ran, the prompt's own step remains
    assert prefill_seconds(100, _load(busy, step_elapsed_s=0.0), now=1000.3) == pytest.approx(2 * 0.005 + 2.1)
    assert prefill_seconds(100, _load(busy, step_elapsed_s=60.0), now=1000.3) == pytest.approx(0.005 + 0.100)
    unfitted = WorkerLoad(queued_tokens=900, step_elapsed_s=0.5, updated_at=1000.0)
    assert prefill_seconds(100, unfitted, observed_rate=1000.0, now=1000.0) == pytest.approx(0.5)


def test_an_idle_prefill_pool_keeps_prompts_remote():
    c = decide(100, DECODE, PREFILL, POLICY)
    assert not c.local and c.reason == "estimate"
    assert c.remote_s == pytest.approx(0.105) and c.local_s == pytest.approx(0.154)


def test_a_busy_prefill_pool_sends_short_prompts_local_and_long_ones_remote():
    busy = _load(PREFILL, queued_tokens=3000)  # about 3 s of queue
    c = decide(100, DECODE, busy, POLICY)
    assert c.local and c.reason == "estimate" and c.local_s + POLICY.margin_s < c.remote_s
    c = decide(600, DECODE, busy, POLICY)
    assert not c.local and c.reason == "long_prompt"  # over local_max_prompt_tokens, whatever the queue
    uncapped = DisaggPolicy("conditional")  # the default: no cap, the estimates weigh the length
    assert uncapped.local_max_prompt_tokens == 0
    assert decide(600, DECODE, busy, uncapped).local
    very_long = decide(8000, DECODE, busy, uncapped)  # ... until its chunks make local the later (11.6 s vs 11.0)
    assert not very_long.local and very_long.reason == "estimate" and very_long.local_s + uncapped.margin_s >= very_long.remote_s
    # a decode worker with a long queue of its own prompts is no better
    assert not decide(100, _load(DECODE, queued_tokens=6000), busy, POLICY).local
    # ... nor one whose running batch leaves only a sliver of budget
    assert not decide(400, _load(DECODE, prefill_budget_tokens=1, running_requests=60), busy, POLICY).local


def test_the_margin_and_the_kv_transfer_weigh_in():
    queue = _load(PREFILL, queued_tokens=100)  # remote 0.205 s, local 0.154 s: 51 ms apart
    assert not decide(100, DECODE, queue, POLICY).local
    assert decide(100, DECODE, queue, DisaggPolicy("conditional", margin_s=0.0)).local
    # a slow path between the pair (0.3 s for this prompt's KV) tips it even with an idle prefill pool
    c = decide(100, DECODE, PREFILL, POLICY, transfer_s=0.3)
    assert c.local and c.remote_s == pytest.approx(0.405)


def test_what_cannot_be_estimated_goes_remote_and_no_prefill_pool_goes_local():
    assert decide(100, _load(DECODE, prefill_budget_tokens=0), PREFILL, POLICY).reason == "no_budget"
    c = decide(100, DECODE, WorkerLoad(queued_tokens=10**6), POLICY)  # an old prefill worker, no rate seen yet
    assert not c.local and c.reason == "unmeasured"
    assert decide(100, DECODE, WorkerLoad(queued_tokens=10**6), POLICY, observed_rate=1000.0).local
    c = decide(100, DECODE, None, POLICY)
    assert c.local and c.reason == "no_prefill_worker"
    with pytest.raises(ValueError, match="conditional, remote, local"):
        DisaggPolicy("sometimes")


def test_pull_estimates_per_pair_then_the_decode_workers_then_none():
    est = PullEstimate()
    assert est.seconds(10) is None
    est.observe(1_000_000, 0.01, 100)  # 100 MB/s, 10 kB a token
    assert est.seconds(100) == pytest.approx(0.01)
    est.observe(0, 1.0, 1)  # ignored
    assert est.pulls == 1
    t = PairTransfers(max_pairs=2)
    d = _view("d1", "decode", _load(DECODE, kv_bytes_per_s=1e6, kv_bytes_per_token=1e3))
    assert t.seconds("p1", d, 100) == pytest.approx(0.1)  # the decode worker's own estimate
    assert t.seconds("p1", _view("d2", "decode", DECODE), 100) == 0.0  # nothing known
    t.observe("p1", "d1", 1_000_000, 0.01, 100)
    assert t.seconds("p1", d, 100) == pytest.approx(0.01)  # the pair's, once seen
    assert t.seconds("p2", d, 100) == pytest.approx(0.1)
    t.observe("p2", "d1", 1, 1, 1)
    t.observe("p3", "d1", 1, 1, 1)
    assert ("p1", "d1") not in t._pairs and len(t._pairs) == 2  # bounded: the least recently seen pair goes


def test_registry_loads_read_across_versions():
    old = json.dumps({"queued_requests": 1, "queued_tokens": 2, "running_requests": 3, "free_blocks": 4, "total_blocks": 5,
                      "held_requests": 0, "draining": False, "updated_at": 1.0})
    ld = _decode_load(old)  # an older worker's entry: the new fields take their defaults
    assert ld.running_requests == 3 and ld.prefill_budget_tokens == 0 and ld.step_token_s == 0.0
    newer = json.dumps({**json.loads(old), "prefill_budget_tokens": 7, "some_future_field": [1, 2]})
    ld = _decode_load(newer)  # a newer worker's: what this reader does not know is ignored
    assert ld.prefill_budget_tokens == 7


def _view(wid, role, load):
    info = WorkerInfo(wid, role, f"127.0.0.1:{1000 + len(wid)}", "", "m", "h", ("grpc",), 100, 16, 2048, 0.0)
    return WorkerView(info, load)


def _router(views, mode="conditional", **kw):
    p = WorkerPicker(registry=None, model="m", refresh_s=3600, ejector=OutlierEjector(threshold=1, base_s=60))
    p._views, p._read_at = views, time.monotonic()
    metrics = Metrics("router")
    return Disaggregation(DisaggPolicy(mode, **kw), p, metrics), p, metrics


def _count(metrics, decision):
    return metrics.registry.get_sample_value("distserve_disagg_decision_total", {"decision": decision})


def test_choose_counts_what_this_router_sent_since_the_last_registry_read():
    busy = _load(PREFILL, queued_tokens=3000)
    d, picker, metrics = _router([_view("d1", "decode", _load(DECODE, running_requests=0)), _view("p1", "prefill", busy)])
    blocks = lambda bs: 2  # noqa: E731

    async def go():
        got = []
        for _ in range(40):  # a burst of 200-token prompts within one registry read
            c = await d.choose(200, blocks, set())
            if c.local:
                picker.claim_decode(c.decode, 200)
            else:
                await picker.pick_prefill(200)
            got.append(c)
        return got

    got = asyncio.run(go())
    assert got[0].local and got[0].decode.worker_id == "d1"
    # each local prompt queues on d1 (and adds to its batch): its estimate grows until the prefill pool wins
    # again; from then on both queues grow and the choices share the burst between them
    first_remote = next(i for i, c in enumerate(got) if not c.local)
    assert first_remote > 1 and got[first_remote].reason == "estimate"
    assert got[first_remote].local_s + POLICY.margin_s >= got[first_remote].remote_s
    assert got[-1].remote_s > got[first_remote].remote_s and got[-1].local_s > got[0].local_s
    assert 5 < sum(c.local for c in got) < 35
    assert _count(metrics, "local") == sum(c.local for c in got) and _count(metrics, "remote") == sum(not c.local for c in got)


def test_modes_force_their_side_and_a_lost_kv_prefills_locally():
    views = [_view("d1", "decode", DECODE), _view("p1", "prefill", PREFILL)]
    blocks = lambda bs: 2  # noqa: E731
    d, _, metrics = _router(views, mode="remote")
    c = asyncio.run(d.choose(10, blocks, set(), kv_lost=False))
    assert not c.local and c.reason == "mode" and c.decode is None
    c = asyncio.run(d.choose(10, blocks, set(), kv_lost=True))
    assert c.local and c.reason == "kv_lost" and c.decode.worker_id == "d1"
    d, _, metrics = _router([_view("d1", "decode", _load(DECODE, prefill_budget_tokens=0)), views[1]], mode="local")
    c = asyncio.run(d.choose(5000, blocks, set()))
    assert c.local and c.reason == "mode" and c.decode.worker_id == "d1"  # local even for a long prompt, without budget
    assert _count(metrics, "local") == 1 and _count(metrics, "remote") == 0
    # conditional without a prefill worker serves from the decode pool; without a decode worker it leaves the error to the decode leg
    d, _, _ = _router([views[0]])
    assert asyncio.run(d.choose(10, blocks, set())).reason == "no_prefill_worker"
    d, _, _ = _router([views[1]])
    assert asyncio.run(d.choose(10, blocks, set())).reason == "no_decode_worker"
