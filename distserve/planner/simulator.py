"""Discrete-event simulator of the suite: router, prefill, KV transfer, decode, colocated workers.

Pure Python and deterministic: the same trace, suite and seed give the same records. Time advances
from event to event (a heap of (time, order, action)); an engine step takes what the latency model
says (`StepModel.step_s`), every other cost is a constant or the KV transfer model.

One request's life, as the suite serves it (DESIGN.md section 3; services/router/generation.py):

- disaggregated (any prefill worker registered): arrival -> router (`router_s`) -> picks the prefill
  worker with the fewest queued prompt tokens (ties: seeded random, as `picker.least`) -> Prefill RPC
  (half of `prefill_call_s` each way) -> the prefill engine's waiting queue -> a prefill step batched by
  token budget (scheduler.py: whole prompts up to max_num_batched_tokens and max_num_seqs, blocks for
  the prompt or it waits) -> first token back to the router and on to the client (`token_s`) while the
  KV stays held -> the router picks a decode worker (room for prompt + max_tokens first, then fewest
  requests, then most free blocks) -> Decode RPC (`decode_call_s`) -> admission: blocks for prompt +
  max_tokens - 1 and a seat (running + reserved < max_num_seqs), else it waits and is retried whenever
  a request there ends -> KV pull (transfer model) -> the prefill worker frees the KV -> the request
  joins the decode engine's running batch (continuous batching: every running request decodes one
  token per step) -> finished after output_len tokens, its blocks freed.
- colocated (no prefill worker): arrival -> router -> the colocated worker picked as a decode worker ->
  its engine admits the prompt with blocks for prompt + max_tokens - 1, prefills it (prefill priority:
  a step is all prefill or all decode; or chunked: decodes plus prompt chunks up to the budget) and
  decodes it there.

Records: one `bench.metrics.RequestResult` per request, as `distserve bench serve` writes them (times
from the first arrival, every token's time, the per-phase timings), so the same report code reads
both.

The engines' side (their queues, blocks and steps, and the vLLM v0.2 variant) is in `sim_engine`.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from distserve.bench.metrics import RequestResult
from distserve.planner.profile import ServingCosts
from distserve.planner.sim_engine import EngineSpec, SimEngine, SimRequest, TraceRequest


@dataclass(frozen=True, slots=True)
class SuiteSpec:
    """The simulated suite: engines per role and the costs between them."""

    prefill: tuple[EngineSpec, ...] = ()
    decode: tuple[EngineSpec, ...] = ()
    colocated: tuple[EngineSpec, ...] = ()
    transfer_s: Callable[[int], float] = lambda tokens: 0.0  # KV transfer of a prompt of this many tokens
    costs: ServingCosts = ServingCosts()
    slowdown: float = 1.0  # every engine step takes this many times its modelled time: cores shared with other work (2 / (2 - others' cores) on 2)



class Simulation:
    def __init__(self, suite: SuiteSpec, seed: int = 0, keep_token_times: bool = True):
        if not suite.prefill and not suite.colocated:
            raise ValueError("a suite needs prefill workers (with decode workers) or colocated workers")
        if suite.prefill and not suite.decode:
            raise ValueError("prefill workers need at least one decode worker")
        self.suite = suite
        self.costs = suite.costs
        self.slowdown = suite.slowdown
        self.rng = random.Random(f"planner-sim:{seed}")
        self.keep = keep_token_times
        self.now = 0.0
        self._events: list = []
        self._order = 0
        self.prefill = [SimEngine(self, s, "prefill", f"prefill-{i + 1}") for i, s in enumerate(suite.prefill)]
        self.decode = [SimEngine(self, s, "decode", f"decode-{i + 1}") for i, s in enumerate(suite.decode)]
        self.colocated = [SimEngine(self, s, "colocated", f"colocated-{i + 1}") for i, s in enumerate(suite.colocated)]
        self._left = 0

    def at(self, t: float, fn, *args) -> None:
        self._order += 1
        heapq.heappush(self._events, (t, self._order, fn, args))

    # -- the run -----------------------------------------------------------------------------------
    def run(self, trace: Sequence[TraceRequest]) -> list[RequestResult]:
        reqs = [SimRequest(t) for t in trace]
        self._left = len(reqs)
        for r in reqs:
            self.at(r.spec.arrival_s, self._arrive, r)
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            self.now = t
            fn(*args)
        for r in reqs:
            if not r.done and not r.error:
                r.error = "never finished (no KV room ever came free)"
        return [self._result(r) for r in reqs]

    def _least(self, engines: list[SimEngine], key) -> SimEngine:
        keys = [key(e) for e in engines]
        low = min(keys)
        return self.rng.choice([e for e, k in zip(engines, keys) if k == low])

    def _arrive(self, r: SimRequest) -> None:
        c = self.costs
        if self.prefill:
            self.at(self.now + c.router_s, self._route_prefill, r)
        else:
            self.at(self.now + c.router_s, self._route_decode, r, self.colocated)

    def _route_prefill(self, r: SimRequest) -> None:
        e = self._least(self.prefill, lambda e: e.queued_tokens)
        if -(-r.spec.prompt_len // e.spec.block_size) > e.spec.num_blocks:
            self._fail(r, "the prompt needs more KV blocks than the prefill worker has")
            return
        r.prefill_engine = e
        e.queued_tokens += r.spec.prompt_len
        e.assigned += 1
        self.at(self.now + self.costs.prefill_call_s / 2, self._at_prefill, r, e)

    def _at_prefill(self, r: SimRequest, e: SimEngine) -> None:
        def add():
            r.t_engine = self.now
            e.waiting.append(r)

        e.command(add)

    def prefilled(self, r: SimRequest, t: float) -> None:
        """A prefill engine produced the first token; the KV stays held until the decode side pulls it."""
        self.at(t + self.costs.prefill_call_s / 2, self._first_token_at_router, r)

    def _first_token_at_router(self, r: SimRequest) -> None:
        self.emit(r, self.now)
        if r.spec.output_len <= 1:  # finished by its first token: the router releases the KV
            self._release_prefill(r)
            self.finished(r)
            return
        self._route_decode(r, self.decode)

    def _release_prefill(self, r: SimRequest) -> None:
        p = r.prefill_engine

        def release():
            p.release(r)
            p.assigned -= 1

        p.command(release)

    def _route_decode(self, r: SimRequest, pool: list[SimEngine]) -> None:
        need = lambda e: -(-(r.spec.prompt_len + r.spec.output_len - 1) // e.spec.block_size)  # noqa: E731
        fits = [e for e in pool if need(e) <= e.spec.num_blocks]
        if not fits:
            self._fail(r, "the request needs more KV blocks than any decode worker has")
            return
        e = self._least(fits, lambda e: (need(e) > e.free, e.assigned, -e.free))
        r.decode_engine = e
        e.assigned += 1
        if e.mode == "colocated":
            e.queued_tokens += r.spec.prompt_len
            self.at(self.now + self.costs.decode_call_s, self._at_colocated, r, e)
        else:
            self.at(self.now + self.costs.decode_call_s, self._at_decode, r, e)

    def _at_colocated(self, r: SimRequest, e: SimEngine) -> None:
        def add():
            r.t_engine = self.now
            e.waiting.append(r)

        e.command(add)

    def _at_decode(self, r: SimRequest, e: SimEngine) -> None:
        r.t_decode_arrive = self.now
        e.reserve(r)

    def pull(self, r: SimRequest) -> None:
        """Blocks reserved on the decode worker: the KV moves, then the prefill side frees it."""
        r.transfer_s = self.suite.transfer_s(r.spec.prompt_len)
        self.at(self.now + r.transfer_s, self._pulled, r)

    def _pulled(self, r: SimRequest) -> None:
        self._release_prefill(r)
        r.decode_engine.import_kv(r)

    # -- records -------------------------------------------------------------------------------------
    def emit(self, r: SimRequest, t: float) -> None:
        """A token reached the client `token_s` after `t` (its step's end; for a prefill worker's first
        token, its arrival at the router with the RPC's answer)."""
        when = t + self.costs.token_s
        if self.keep or len(r.token_times) < 2:
            r.token_times.append(when)
        else:
            r.token_times[-1] = when

    def finished(self, r: SimRequest) -> None:
        r.done = True
        self._left -= 1

    def _fail(self, r: SimRequest, why: str) -> None:
        r.error = why
        self._left -= 1

    def _result(self, r: SimRequest) -> RequestResult:
        s = r.spec
        res = RequestResult(s.index, s.prompt_len, s.output_len, s.arrival_s)
        if r.error:
            res.error = r.error
            res.end_s = self.now
            return res
        res.token_times = list(r.token_times)
        res.end_s = r.token_times[-1] if r.token_times else s.arrival_s
        res.completion_tokens = r.generated
        res.finish_reason = "length"
        start = r.t_engine
        phases = {"router_s": self.costs.router_s, "prefill_queue_s": max(0.0, r.t_scheduled - start),
                  "prefill_compute_s": max(0.0, r.t_first - r.t_scheduled), "kv_transfer_s": r.transfer_s,
                  "decode_queue_s": max(0.0, r.t_reserved - r.t_decode_arrive) if r.prefill_engine else 0.0,
                  "decode_s": max(0.0, res.end_s - (r.t_imported if r.prefill_engine else r.t_first))}
        res.phases = phases
        return res


def simulate(suite: SuiteSpec, trace: Sequence[TraceRequest], seed: int = 0, keep_token_times: bool = True) -> list[RequestResult]:
    """Replays `trace` on `suite`; one record per request, in trace order."""
    return Simulation(suite, seed, keep_token_times).run(trace)
