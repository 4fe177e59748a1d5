"""The simulator's engines: one worker's scheduler queues (engine/scheduler.py), its KV blocks and its
steps in simulated time, for the three roles (prefill, decode, colocated) and the vLLM v0.2 variant.
`simulator.Simulation` drives them (arrivals, routing, RPCs, KV transfers, records).

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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from distserve.engine.step_times import BlockCredit, chunk_budget
from distserve.planner.latency import StepModel
from distserve.planner.profile import ServingCosts


class Simulation(Protocol):
    """What an engine asks of the simulation that drives it (simulator.Simulation)."""

    now: float  # simulated seconds
    costs: ServingCosts
    slowdown: float  # every step takes this many times its modelled time

    def at(self, t: float, fn, *args) -> None: ...  # run fn(*args) at time t
    def emit(self, r: SimRequest, t: float) -> None: ...  # a token produced at t
    def prefilled(self, r: SimRequest, t: float) -> None: ...  # a prefill worker produced the first token
    def pull(self, r: SimRequest) -> None: ...  # blocks reserved on a decode worker: move the KV
    def finished(self, r: SimRequest) -> None: ...


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


@dataclass(slots=True, eq=False)
class SimRequest:
    spec: TraceRequest
    prefill_blocks: int = 0  # blocks it holds on its prefill worker (its KV until the pull)
    blocks: int = 0  # blocks it holds on the engine that decodes it
    computed: int = 0  # prompt tokens computed (chunked prefill)
    generated: int = 0  # tokens produced so far
    token_times: list[float] = field(default_factory=list)
    in_flight: bool = False  # inside a step that has not finished (pipelines)
    prefill_engine: SimEngine | None = None
    decode_engine: SimEngine | None = None
    t_engine: float = 0.0  # reached its current engine
    t_scheduled: float = -1.0  # first scheduled on its prefill engine
    t_first: float = 0.0  # first token produced (engine time)
    t_decode_arrive: float = 0.0
    t_reserved: float = 0.0
    t_imported: float = 0.0
    transfer_s: float = 0.0
    error: str = ""
    done: bool = False


class SimEngine:
    """One engine: its scheduler's queues (engine/scheduler.py) and its blocks, stepped in simulated time."""

    def __init__(self, sim: Simulation, spec: EngineSpec, mode: str, name: str):
        self.sim, self.spec, self.mode, self.name = sim, spec, mode, name
        self.free = spec.num_blocks
        self.waiting: deque[SimRequest] = deque()  # to prefill here
        self.prefilling: list[SimRequest] = []  # chunked prefill under way
        self.running: list[SimRequest] = []  # decoding
        self.reserved = 0  # decode: requests holding blocks whose KV has not arrived
        self.admit_queue: list[SimRequest] = []  # decode: waiting for blocks or a seat
        self.commands: list[Callable[[], None]] = []  # run at the next step boundary
        self.stage_free = [0.0] * spec.step.pp
        self.stepping = False  # the first stage is busy
        self.poke_due = False  # a poke is scheduled for this instant
        self.assigned = 0  # requests sent here and not finished (the router's running count)
        self.queued_tokens = 0  # prompt tokens sent here and not yet scheduled (the router's queued count)
        self.steps = 0
        self.preemptions = 0  # kv_on_demand: running requests sent back to be recomputed
        self.chunk_credit = BlockCredit()  # budgets below a block, spent as the engine spends them

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
        return t * self.sim.slowdown

    def _stage_free(self) -> None:
        self.stepping = False
        self.poke()

    # -- scheduling (engine/scheduler.py) --------------------------------------------------------
    def _blocks_for(self, r: SimRequest) -> int:
        bs = self.spec.block_size
        if self.mode == "prefill":
            return -(-r.spec.prompt_len // bs)
        if self.spec.kv_on_demand:
            return -(-self._prefill_len(r) // bs)
        return -(-(r.spec.prompt_len + r.spec.output_len - 1) // bs)

    def _prefill_len(self, r: SimRequest) -> int:
        """Tokens a prefill of `r` computes: its prompt, and after a preemption also what it produced."""
        return r.spec.prompt_len + r.generated

    def _admit(self, r: SimRequest) -> bool:
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

    def _schedule(self) -> tuple[list[tuple[SimRequest, int, int]], list[SimRequest]]:
        spec = self.spec
        if spec.chunked_prefill and self.mode == "colocated":
            return self._schedule_chunked()
        chunks: list[tuple[SimRequest, int, int]] = []
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

    def _grow_or_preempt(self) -> list[SimRequest]:
        """vLLM v0.2's decode step: oldest arrival first, each request takes a block when its context
        crosses one; with none free the newest running request is preempted (blocks freed, back to the
        front of the waiting queue for a recompute), and if none is left, the request itself."""
        bs = self.spec.block_size
        queue = sorted(self.running, key=lambda r: (r.spec.arrival_s, r.spec.index))
        batch: list[SimRequest] = []
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

    def _preempt(self, r: SimRequest) -> None:
        self.free += r.blocks
        r.blocks = 0
        if r in self.running:
            self.running.remove(r)
        self.waiting.appendleft(r)
        self.preemptions += 1

    def _chunk_cap(self, decode: list[SimRequest], room: int) -> int:
        """The engine's cap under a TPOT target (engine.py: chunk_cap, step_times.chunk_budget): the most
        prompt tokens a step of these decodes may carry with its time within the target, in blocks at
        the budget's rate where it is less than a block (step_times.BlockCredit). The engine predicts
        from its own measured step times; here the step model, with the overheads and the slowdown,
        stands in for them (the engine measures what its steps take)."""
        spec = self.spec
        ctx = sum(r.spec.prompt_len + r.generated for r in decode)

        def predict(decodes: int, context: int, n: int) -> float:
            return self._step_s([(0, n)] if n else [], decodes, context)

        budget = chunk_budget(predict, spec.tpot_target_s, len(decode), ctx, room)
        return self.chunk_credit.cap(budget, min(room, spec.block_size))

    def _schedule_chunked(self) -> tuple[list[tuple[SimRequest, int, int]], list[SimRequest]]:
        spec = self.spec
        decode = [r for r in self.running[: spec.max_num_seqs] if not r.in_flight]
        budget = spec.max_num_batched_tokens - len(decode)
        if spec.tpot_target_s > 0 and decode and (self.prefilling or self.waiting):
            budget = self._chunk_cap(decode, budget)
        seats = spec.max_num_seqs - len(decode)
        chunks: list[tuple[SimRequest, int, int]] = []
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
    def _step_done(self, chunks: list[tuple[SimRequest, int, int]], decode: list[SimRequest]) -> None:
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

    def finish(self, r: SimRequest) -> None:
        self.release(r)
        self.assigned -= 1
        self.sim.finished(r)
        self.room()

    def release(self, r: SimRequest) -> None:
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

    def _try_reserve(self, r: SimRequest) -> None:
        n = self._blocks_for(r)
        if n > self.free or len(self.running) + self.reserved >= self.spec.max_num_seqs:
            self.admit_queue.append(r)
            return
        self.free -= n
        r.blocks = n
        self.reserved += 1
        r.t_reserved = self.sim.now
        self.sim.pull(r)

    def reserve(self, r: SimRequest) -> None:
        self.command(lambda: self._try_reserve(r))

    def import_kv(self, r: SimRequest) -> None:
        def run():
            self.reserved -= 1
            r.t_imported = self.sim.now
            self.running.append(r)

        self.command(run)

