"""KV-aware routing on constructed registry views: the cost in services/router/prefix_index.py
(cached prefix against queued tokens), the prompts a router routed itself, and conditional
disaggregation with a decode worker that holds the conversation."""

import asyncio
import dataclasses
import random
import time

import pytest

from distserve.engine.prefix import BlockBloom, block_hashes, root_hash
from distserve.state.registry import WorkerInfo, WorkerLoad, WorkerView
from services.router.disagg import DisaggPolicy, decide
from services.router.ejection import OutlierEjector
from services.router.picker import WorkerPicker
from services.router.prefix_index import prefill_cost

ROOT = root_hash("tiny", "float32", 16)
RNG = random.Random(0)
PROMPT = [RNG.randrange(3, 259) for _ in range(900)]  # 56 full blocks


def _view(wid, queued=0, role="prefill", version=1):
    info = WorkerInfo(wid, role, f"127.0.0.1:{1000 + len(wid)}", "", "m", "h", ("grpc",), 1000, 16, 4096, 0.0, prefix_root=f"{ROOT:016x}")
    return WorkerView(info, WorkerLoad(queued_tokens=queued, free_blocks=1000, total_blocks=1000, prefix_version=version))


def _picker(views, routing="kv", held=None):
    """A picker whose last registry read returned `views`; `held`: worker id -> tokens of PROMPT its published filter holds."""
    p = WorkerPicker(registry=None, model="m", refresh_s=3600, ejector=OutlierEjector(threshold=1, base_s=60), routing=routing)
    p._views, p._read_at = views, time.monotonic()
    filters = {wid: BlockBloom.build(block_hashes(PROMPT[:n], 16, ROOT), 1000).bits for wid, n in (held or {}).items()}
    p.prefixes.update(views, filters)
    return p


def test_the_cost_is_queued_tokens_plus_the_uncached_part():
    assert prefill_cost(queued_tokens=500, prompt_tokens=900, cached_tokens=800) == 600
    assert prefill_cost(0, 900, 0) == 900


def test_a_prompt_goes_to_the_worker_holding_its_prefix_unless_its_queue_outweighs_it():
    async def go():
        # A holds 800 of the 900 tokens with 500 queued: 600 to compute against B's 900
        p = _picker([_view("A", queued=500), _view("B")], held={"A": 800})
        assert p.cached_tokens(p._views[0], PROMPT) == 800 and p.cached_tokens(p._views[1], PROMPT) == 0
        assert {(await p.peek_prefill(prompt=PROMPT)).worker_id for _ in range(20)} == {"A"}
        assert (await p.pick_prefill(PROMPT)).worker_id == "A"
        assert p.queued_tokens(p._views[0]) == 500 + 100  # only the uncached part is counted as sent
        # A with 1000 queued: 1100 against 900, B wins
        p = _picker([_view("A", queued=1000), _view("B")], held={"A": 800})
        assert {(await p.peek_prefill(prompt=PROMPT)).worker_id for _ in range(20)} == {"B"}
        # least-loaded routing ignores the cache
        p = _picker([_view("A", queued=500), _view("B")], routing="load", held={"A": 800})
        assert (await p.pick_prefill(PROMPT)).worker_id == "B"
        # a filter that is not the worker's current version is not used
        p = _picker([_view("A", queued=500, version=2), _view("B")], held={})
        assert p.prefixes.stale(p._views) == ["A", "B"]

    asyncio.run(go())


def test_prompts_routed_since_the_last_publish_follow_each_other():
    async def go():
        p = _picker([_view("A"), _view("B")])
        first = await p.pick_prefill(PROMPT[:400])
        other = "B" if first.worker_id == "A" else "A"
        p.sent.clear()  # as after a registry read of samples taken since, both idle again
        # the same 400-token start with another ending: it follows the first (25 blocks known there)
        follow = PROMPT[:400] + [7] * 50
        assert {(await p.peek_prefill(prompt=follow)).worker_id for _ in range(20)} == {first.worker_id}
        assert p.cached_tokens(first, follow) == 400 and p.cached_tokens(next(v for v in p._views if v.worker_id == other), follow) == 0
        p.prefixes.recent_s = 0.0  # forgotten: ties again
        await asyncio.sleep(0.01)
        assert p.cached_tokens(first, follow) == 0

    asyncio.run(go())


def test_a_fully_cached_prompt_still_computes_its_last_token():
    p = _picker([_view("A")], held={"A": 896})
    assert p.cached_tokens(p._views[0], PROMPT[:896]) == 880  # as the engine: its last block is computed again


def test_a_decode_worker_holding_the_history_prefills_the_next_turn_itself():
    policy = DisaggPolicy("conditional", local_max_prompt_tokens=512, margin_s=0.2)
    dec = WorkerLoad(running_requests=4, free_blocks=100, total_blocks=100, step_fixed_s=0.010, step_token_s=0.001,
                     step_decode_s=0.001, max_step_tokens=2048, prefill_budget_tokens=64)
    pre = WorkerLoad(queued_tokens=1500, step_fixed_s=0.005, step_token_s=0.001, max_step_tokens=2048)
    assert decide(900, dec, pre, policy).reason == "long_prompt"  # 900 tokens to compute: too long for it
    c = decide(900, dec, pre, policy, decode_cached=832)  # it holds all but the last 68
    assert c.local and c.reason == "estimate"
    # the prefill pool holding it too makes remote cheap again
    assert not decide(900, dec, dataclasses.replace(pre, queued_tokens=0), policy, decode_cached=832, prefill_cached=832).local


def test_routing_setting_is_validated():
    with pytest.raises(ValueError, match="kv, load"):
        WorkerPicker(registry=None, model="m", routing="random")
