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

vLLM of the DistServe paper's time (v0.2, `EngineSpec.kv_on_demand` and `max_paddings`), colocated: a
prompt is admitted with blocks for the prompt alone (while `watermark` of the cache stays free), a
decoding request takes one more block each time its context crosses a block boundary, and when none is
free the most recently arrived running request is preempted: its blocks are freed and it goes back to
the front of the waiting queue, to be prefilled again over its prompt and the tokens it has produced
(recompute; that prefill produces its next token). Prompts in one prefill step are padded to the
longest: the step's budget counts prompts x longest, at most `max_paddings` pad tokens, and the step
costs the padded batch. The running batch decodes oldest arrival first.

Commands reach an engine between its steps (engine/worker.py), so an arrival, a reservation or a KV
import during a step waits for that step to end. An instance with pipeline stages (pp > 1) starts its
next step when its first stage is free; a request rides one step at a time.

Records: one `bench.metrics.RequestResult` per request, as `distserve bench serve` writes them (times
from the first arrival, every token's time, the per-phase timings), so the same report code reads
both.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from distserve.bench.metrics import RequestResult
from distserve.planner.latency import StepModel
from distserve.planner.profile import ServingCosts


@dataclass(frozen=True, slots=True)
class TraceRequest:
    index: int  # position in the trace
    prompt_len: int  # prompt tokens
    output_len: int  # tokens it generates (max_tokens, ignore_eos)
    arrival_s: float  # send time from the trace's start


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """One worker's engine as the simulator sees it (the engine's own settings, distserve/engine/engine.py)."""

    step: StepModel  # seconds per step (per pipeline stage when step.pp > 1)
    num_blocks: int  # KV cache capacity in blocks
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    chunked_prefill: bool = False  # colocated: decodes plus prompt chunks in every step
    tpot_target_s: float = 0.0  # chunked: a step with running decodes carries only the prompt tokens that keep it within this (0 = no cap)
    kv_on_demand: bool = False  # colocated: blocks for the prompt, then one per block of context; preempt + recompute when out
    watermark: float = 0.0  # kv_on_demand: share of the blocks a prompt's admission must leave free
    max_paddings: int = 0  # > 0: prompts of a prefill step padded to the longest, at most this many pad tokens


@dataclass(frozen=True, slots=True)
class SuiteSpec:
    """The simulated suite: engines per role and the costs between them."""

    prefill: tuple[EngineSpec, ...] = ()
    decode: tuple[EngineSpec, ...] = ()
    colocated: tuple[EngineSpec, ...] = ()
    transfer_s: Callable[[int], float] = lambda tokens: 0.0  # KV transfer of a prompt of this many tokens
    costs: ServingCosts = ServingCosts()
    slowdown: float = 1.0  # every engine step takes this many times its modelled time: cores shared with other work (2 / (2 - others' cores) on 2)


@dataclass(slots=True, eq=False)
class _Req:
    spec: TraceRequest
    prefill_blocks: int = 0  # blocks it holds on its prefill worker (its KV until the pull)
    blocks: int = 0  # blocks it holds on the engine that decodes it
    computed: int = 0  # prompt tokens computed (chunked prefill)
    generated: int = 0  # tokens produced so far
    token_times: list[float] = field(default_factory=list)
    in_flight: bool = False  # inside a step that has not finished (pipelines)
    prefill_engine: _Engine | None = None
    decode_engine: _Engine | None = None
    t_engine: float = 0.0  # reached its current engine
    t_scheduled: float = -1.0  # first scheduled on its prefill engine
    t_first: float = 0.0  # first token produced (engine time)
    t_decode_arrive: float = 0.0
    t_reserved: float = 0.0
    t_imported: float = 0.0
    transfer_s: float = 0.0
    error: str = ""
    done: bool = False


class _Engine:
    """One engine: its scheduler's queues (engine/scheduler.py) and its blocks, stepped in simulated time."""

    def __init__(self, sim: Simulation, spec: EngineSpec, mode: str, name: str):
        self.sim, self.spec, self.mode, self.name = sim, spec, mode, name
        self.free = spec.num_blocks
        self.waiting: deque[_Req] = deque()  # to prefill here
        self.prefilling: list[_Req] = []  # chunked prefill under way
        self.running: list[_Req] = []  # decoding
        self.reserved = 0  # decode: requests holding blocks whose KV has not arrived
        self.admit_queue: list[_Req] = []  # decode: waiting for blocks or a seat
        self.commands: list[Callable[[], None]] = []  # run at the next step boundary
        self.stage_free = [0.0] * spec.step.pp
        self.stepping = False  # the first stage is busy
        self.poke_due = False  # a poke is scheduled for this instant
        self.assigned = 0  # requests sent here and not finished (the router's running count)
        self.queued_tokens = 0  # prompt tokens sent here and not yet scheduled (the router's queued count)
        self.steps = 0
        self.preemptions = 0  # kv_on_demand: running requests sent back to be recomputed

    # -- commands and the step loop ------------------------------------------------------------
    def command(self, fn: Callable[[], None]) -> None:
        """Runs `fn` on the engine at its next step boundary (now, if idle: after everything else that
        happens at this instant, so simultaneous arrivals share a step as queued commands do)."""
        self.commands.append(fn)
        if not self.stepping and not self.poke_due:
            self.poke_due = True
            self.sim.at(self.sim.now, self.poke)

    def poke(self) -> None:
        self.poke_due = False
        if self.stepping:
            return
        while self.commands:
            cmds, self.commands = self.commands, []
            for fn in cmds:
                fn()
        chunks, decode = self._schedule()
        if not chunks and not decode:
            return
        sim = self.sim
        ctx = sum(r.spec.prompt_len + r.generated for r in decode)
        pieces = [(s, e) for _, s, e in chunks]
        if self.spec.max_paddings and pieces:  # the padded batch: every prompt as long as the longest
            pieces = [(0, max(e for _, e in pieces))] * len(pieces)
        per_stage = self._step_s(pieces, len(decode), ctx)
        now = sim.now
        start = max(now, self.stage_free[0])
        t = start
        for k in range(len(self.stage_free)):
            t = max(t, self.stage_free[k]) + per_stage
            self.stage_free[k] = t
            if k == 0:
                first_free = t
        members = [r for r, _, _ in chunks] + decode
        for r in members:
            r.in_flight = True
        for r, _, _ in chunks:
            if r.t_scheduled < 0:
                r.t_scheduled = start
        self.stepping = True
        self.steps += 1
        sim.at(t, self._step_done, chunks, decode)
        sim.at(first_free, self._stage_free)

    def _step_s(self, pieces: list[tuple[int, int]], decodes: int, ctx: int) -> float:
        """One step (per pipeline stage): the latency model, the overheads outside it, the machine's share."""
        c = self.sim.costs
        t = self.spec.step.step_s(pieces, decodes, ctx) + c.step_s + c.seq_s * decodes + c.ctx_s * ctx
        return t * self.sim.suite.slowdown

    def _stage_free(self) -> None:
        self.stepping = False
        self.poke()

    # -- scheduling (engine/scheduler.py) --------------------------------------------------------
    def _blocks_for(self, r: _Req) -> int:
        bs = self.spec.block_size
        if self.mode == "prefill":
            return -(-r.spec.prompt_len // bs)
        if self.spec.kv_on_demand:
            return -(-self._prefill_len(r) // bs)
        return -(-(r.spec.prompt_len + r.spec.output_len - 1) // bs)

    def _prefill_len(self, r: _Req) -> int:
        """Tokens a prefill of `r` computes: its prompt, and after a preemption also what it produced."""
        return r.spec.prompt_len + r.generated

    def _admit(self, r: _Req) -> bool:
        n = self._blocks_for(r)
        if n > self.free:
            return False
        if self.spec.kv_on_demand and self.free - n < self.spec.watermark * self.spec.num_blocks:
            return False
        self.free -= n
        if self.mode == "prefill":
            r.prefill_blocks = n
        else:
            r.blocks = n
        return True

    def _schedule(self) -> tuple[list[tuple[_Req, int, int]], list[_Req]]:
        spec = self.spec
        if spec.chunked_prefill and self.mode == "colocated":
            return self._schedule_chunked()
        chunks: list[tuple[_Req, int, int]] = []
        budget = spec.max_num_batched_tokens
        active = len(self.running)
        longest = total = 0
        while self.waiting and active + len(chunks) < spec.max_num_seqs:
            r = self.waiting[0]
            n = self._prefill_len(r)
            if spec.max_paddings:  # vLLM v0.2: the batch is padded to its longest prompt
                width = max(longest, n)
                padded = width * (len(chunks) + 1)
                if chunks and (padded > spec.max_num_batched_tokens or padded - total - n > spec.max_paddings):
                    break
            elif n > budget and chunks:
                break
            if not self._admit(r):
                break
            self.waiting.popleft()
            self.queued_tokens -= r.spec.prompt_len if r.generated == 0 else 0
            chunks.append((r, 0, n))
            budget -= n
            longest, total = max(longest, n), total + n
            if budget <= 0:
                break
        if chunks:
            return chunks, []
        if spec.kv_on_demand:
            return [], self._grow_or_preempt()
        return [], [r for r in self.running[: spec.max_num_seqs] if not r.in_flight]

    def _grow_or_preempt(self) -> list[_Req]:
        """vLLM v0.2's decode step: oldest arrival first, each request takes a block when its context
        crosses one; with none free the newest running request is preempted (blocks freed, back to the
        front of the waiting queue for a recompute), and if none is left, the request itself."""
        bs = self.spec.block_size
        queue = sorted(self.running, key=lambda r: (r.spec.arrival_s, r.spec.index))
        batch: list[_Req] = []
        while queue and len(batch) < self.spec.max_num_seqs:
            r = queue.pop(0)
            need = -(-(r.spec.prompt_len + r.generated) // bs) - r.blocks
            while need > self.free and queue:
                self._preempt(queue.pop())
            if need > self.free:
                self._preempt(r)
                break
            self.free -= need
            r.blocks += need
            batch.append(r)
        self.running = batch + queue
        return batch

    def _preempt(self, r: _Req) -> None:
        self.free += r.blocks
        r.blocks = 0
        if r in self.running:
            self.running.remove(r)
        self.waiting.appendleft(r)
        self.preemptions += 1

    def _chunk_cap(self, decode: list[_Req], room: int) -> int:
        """The engine's cap under a TPOT target (engine.py: chunk_cap, step_times.chunk_budget): the most
        prompt tokens a step of these decodes may carry with its time within the target, but at least a
        block's worth. The engine predicts from its own measured step times; here the step model, with
        the overheads and the slowdown, stands in for them (the engine measures what its steps take)."""
        spec = self.spec
        ctx = sum(r.spec.prompt_len + r.generated for r in decode)

        def predict(n: int) -> float:
            return self._step_s([(0, n)] if n else [], len(decode), ctx)

        if room <= 0 or predict(room) <= spec.tpot_target_s:
            return room
        lo, hi = 0, room
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if predict(mid) <= spec.tpot_target_s:
                lo = mid
            else:
                hi = mid
        return max(lo, min(room, spec.block_size))

    def _schedule_chunked(self) -> tuple[list[tuple[_Req, int, int]], list[_Req]]:
        spec = self.spec
        decode = [r for r in self.running[: spec.max_num_seqs] if not r.in_flight]
        budget = spec.max_num_batched_tokens - len(decode)
        if spec.tpot_target_s > 0 and decode and (self.prefilling or self.waiting):
            budget = self._chunk_cap(decode, budget)
        seats = spec.max_num_seqs - len(decode)
        chunks: list[tuple[_Req, int, int]] = []
        for r in self.prefilling:
            if budget <= 0 or seats <= 0:
                return chunks, decode
            if r.in_flight:
                continue
            end = min(r.spec.prompt_len, r.computed + budget)
            chunks.append((r, r.computed, end))
            self.queued_tokens -= end - r.computed
            budget -= end - r.computed
            seats -= 1
        while self.waiting and budget > 0 and seats > 0:
            r = self.waiting[0]
            if not self._admit(r):
                break
            self.waiting.popleft()
            self.prefilling.append(r)
            end = min(r.spec.prompt_len, budget)
            chunks.append((r, 0, end))
            self.queued_tokens -= end
            budget -= end
            seats -= 1
        return chunks, decode

    # -- results of a step (engine.py: _postprocess) ---------------------------------------------
    def _step_done(self, chunks: list[tuple[_Req, int, int]], decode: list[_Req]) -> None:
        now = self.sim.now
        for r in decode:
            r.in_flight = False
            r.generated += 1
            self.sim.emit(r, now)
            if r.generated >= r.spec.output_len:
                self.running.remove(r)
                self.finish(r)
        for r, _, end in chunks:
            r.in_flight = False
            r.computed = end
            if end < r.spec.prompt_len:
                continue
            if r in self.prefilling:
                self.prefilling.remove(r)
            if r.generated:  # a recompute after a preemption: its prefill produced its next token
                r.generated += 1
                self.sim.emit(r, now)
                if r.generated >= r.spec.output_len:
                    self.finish(r)
                else:
                    self.running.append(r)
                continue
            r.generated = 1
            r.t_first = now
            if self.mode == "prefill":
                self.sim.prefilled(r, now)
            else:
                self.sim.emit(r, now)
                if r.generated >= r.spec.output_len:
                    self.finish(r)
                else:
                    self.running.append(r)
        self.poke()  # with pipeline stages the first stage may be idle already

    def finish(self, r: _Req) -> None:
        self.release(r)
        self.assigned -= 1
        self.sim.finished(r)
        self.room()

    def release(self, r: _Req) -> None:
        if self.mode == "prefill":
            self.free += r.prefill_blocks
            r.prefill_blocks = 0
        else:
            self.free += r.blocks
            r.blocks = 0

    # -- decode admission (services/decode/servicer.py: _admit) ---------------------------------
    def room(self) -> None:
        """Blocks or a seat freed: every request waiting for admission tries again, oldest first."""
        if not self.admit_queue:
            return
        waiting, self.admit_queue = self.admit_queue, []
        for r in waiting:
            self._try_reserve(r)

    def _try_reserve(self, r: _Req) -> None:
        n = self._blocks_for(r)
        if n > self.free or len(self.running) + self.reserved >= self.spec.max_num_seqs:
            self.admit_queue.append(r)
            return
        self.free -= n
        r.blocks = n
        self.reserved += 1
        r.t_reserved = self.sim.now
        self.sim.pull(r)

    def reserve(self, r: _Req) -> None:
        self.command(lambda: self._try_reserve(r))

    def import_kv(self, r: _Req) -> None:
        def run():
            self.reserved -= 1
            r.t_imported = self.sim.now
            self.running.append(r)

        self.command(run)


class Simulation:
    def __init__(self, suite: SuiteSpec, seed: int = 0, keep_token_times: bool = True):
        if not suite.prefill and not suite.colocated:
            raise ValueError("a suite needs prefill workers (with decode workers) or colocated workers")
        if suite.prefill and not suite.decode:
            raise ValueError("prefill workers need at least one decode worker")
        self.suite = suite
        self.costs = suite.costs
        self.rng = random.Random(f"planner-sim:{seed}")
        self.keep = keep_token_times
        self.now = 0.0
        self._events: list = []
        self._order = 0
        self.prefill = [_Engine(self, s, "prefill", f"prefill-{i + 1}") for i, s in enumerate(suite.prefill)]
        self.decode = [_Engine(self, s, "decode", f"decode-{i + 1}") for i, s in enumerate(suite.decode)]
        self.colocated = [_Engine(self, s, "colocated", f"colocated-{i + 1}") for i, s in enumerate(suite.colocated)]
        self._left = 0

    def at(self, t: float, fn, *args) -> None:
        self._order += 1
        heapq.heappush(self._events, (t, self._order, fn, args))

    # -- the run -----------------------------------------------------------------------------------
    def run(self, trace: Sequence[TraceRequest]) -> list[RequestResult]:
        reqs = [_Req(t) for t in trace]
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

    def _least(self, engines: list[_Engine], key) -> _Engine:
        keys = [key(e) for e in engines]
        low = min(keys)
        return self.rng.choice([e for e, k in zip(engines, keys) if k == low])

    def _arrive(self, r: _Req) -> None:
        c = self.costs
        if self.prefill:
            self.at(self.now + c.router_s, self._route_prefill, r)
        else:
            self.at(self.now + c.router_s, self._route_decode, r, self.colocated)

    def _route_prefill(self, r: _Req) -> None:
        e = self._least(self.prefill, lambda e: e.queued_tokens)
        if -(-r.spec.prompt_len // e.spec.block_size) > e.spec.num_blocks:
            self._fail(r, "the prompt needs more KV blocks than the prefill worker has")
            return
        r.prefill_engine = e
        e.queued_tokens += r.spec.prompt_len
        e.assigned += 1
        self.at(self.now + self.costs.prefill_call_s / 2, self._at_prefill, r, e)

    def _at_prefill(self, r: _Req, e: _Engine) -> None:
        def add():
            r.t_engine = self.now
            e.waiting.append(r)

        e.command(add)

    def prefilled(self, r: _Req, t: float) -> None:
        """A prefill engine produced the first token; the KV stays held until the decode side pulls it."""
        self.at(t + self.costs.prefill_call_s / 2, self._first_token_at_router, r)

    def _first_token_at_router(self, r: _Req) -> None:
        self.emit(r, self.now)
        if r.spec.output_len <= 1:  # finished by its first token: the router releases the KV
            self._release_prefill(r)
            self.finished(r)
            return
        self._route_decode(r, self.decode)

    def _release_prefill(self, r: _Req) -> None:
        p = r.prefill_engine

        def release():
            p.release(r)
            p.assigned -= 1

        p.command(release)

    def _route_decode(self, r: _Req, pool: list[_Engine]) -> None:
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

    def _at_colocated(self, r: _Req, e: _Engine) -> None:
        def add():
            r.t_engine = self.now
            e.waiting.append(r)

        e.command(add)

    def _at_decode(self, r: _Req, e: _Engine) -> None:
        r.t_decode_arrive = self.now
        e.reserve(r)

    def pull(self, r: _Req) -> None:
        """Blocks reserved on the decode worker: the KV moves, then the prefill side frees it."""
        r.transfer_s = self.suite.transfer_s(r.spec.prompt_len)
        self.at(self.now + r.transfer_s, self._pulled, r)

    def _pulled(self, r: _Req) -> None:
        self._release_prefill(r)
        r.decode_engine.import_kv(r)

    # -- records -------------------------------------------------------------------------------------
    def emit(self, r: _Req, t: float) -> None:
        """A token reached the client `token_s` after `t` (its step's end; for a prefill worker's first
        token, its arrival at the router with the RPC's answer)."""
        when = t + self.costs.token_s
        if self.keep or len(r.token_times) < 2:
            r.token_times.append(when)
        else:
            r.token_times[-1] = when

    def finished(self, r: _Req) -> None:
        r.done = True
        self._left -= 1

    def _fail(self, r: _Req, why: str) -> None:
        r.error = why
        self._left -= 1

    def _result(self, r: _Req) -> RequestResult:
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
