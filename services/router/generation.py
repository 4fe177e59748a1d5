"""The router's request path, shared by its APIs (gRPC `Generation.Generate`, the OpenAI HTTP API):
one client request through its legs, replayed elsewhere when a leg fails.

`Generation.generate(request, deadline_s)` takes a `GenerateRequest` and yields `GenerateResponse`s;
it raises domain errors (`Shed` for an admission refusal, with its retry-after), which each API maps to
its own status (services/router/servicer.py for gRPC, services/router/http.py for HTTP).

Life of a request: admission (admission.py: over max_inflight, max_queued_tokens or past its deadline
already, it is refused at once with RESOURCE_EXHAUSTED and a retry-after-ms hint) -> validate (sizes
before tokenizing; long texts tokenized on a thread) and tokenize -> QUEUED in Redis -> attempt: where
to prefill (disagg.py: remote, local, or per request by the conditional rule) -> remote: a prefill leg on the
least-loaded prefill worker (first token streamed to the client at once: PREFILLED), then a decode
leg on a decode worker with room, which pulls the KV and streams the rest (DECODING); local: one decode
leg on the decode worker weighed, which prefills the prompt itself and streams every token -> the finish
step (FINISHED with timings). Text is detokenized incrementally and cut at stop strings.

When a leg fails (worker gone, stream broken, KV lost before the pull, no message within the stall
timeout), the request is **replayed by token replay**, as NVIDIA Dynamo migrates requests: the prompt
plus every token already sent is prefilled on a healthy worker and decoding goes on elsewhere; the
client's stream continues with no token missing or repeated. `max_tokens` counts what was sent, and
seeded draws are keyed by output position, so greedy and seeded requests continue exactly as an
undisturbed run would (numerics allowing: a replayed prefill computes the same logits in a batched
pass instead of step by step). At most `migration_limit` replays; a worker that keeps failing is
ejected from the picker for a while. A client that resumes after a router died sends the tokens it
has (`resume_token_ids`), and the request continues the same way from there.
When the client cancels, every leg is cancelled and KV held for it is released.
With no prefill workers registered, requests go to colocated workers in one leg (or, in the conditional
mode, are prefilled by the decode workers themselves).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from distserve.errors import DeadlineExceeded, DistserveError, InvalidRequest, Unavailable
from distserve.engine.block_manager import blocks_needed
from distserve.engine.sampling import find_stop, validate_request
from distserve.kv.release import LeaseClient
from distserve.metrics import Metrics
from distserve.rpc.channels import ChannelPool
from distserve.rpc.convert import FINISH_NAMES, params_from_pb
from distserve.rpc.errors import error_from_rpc
from distserve.state.requests import RequestPhase, RequestStateStore
from distserve.tokenization import IncrementalDetokenizer
from distserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, generation_pb2, prefill_pb2, prefill_pb2_grpc
from distserve.state.registry import WorkerView
from services.router.admission import Admission, Shed, Ticket
from services.router.disagg import Choice, Disaggregation, DisaggPolicy
from services.router.picker import WorkerPicker
from services.router.run import LegFailure, LegPolicy, Prefilled, Run, kv_fault, rpc_failure
from services.router.state_writer import StateOutage, StateWriter

log = logging.getLogger(__name__)

UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED  # a run's finish until a leg ends it
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # what a client-chosen request_id may be
THREAD_TOKENIZE_BYTES = 16 * 1024  # text prompts longer than this are tokenized off the event loop


@dataclass(frozen=True, slots=True)
class InputLimits:
    max_prompt_bytes: int = 1 << 20  # UTF-8 bytes of a text prompt, checked before tokenizing
    max_prompt_tokens: int = 1 << 17  # token ids of a token prompt (or resumed tokens), checked before copying them


class Generation:
    def __init__(self, tokenizer, model: str, picker: WorkerPicker, states: RequestStateStore, pool: ChannelPool,
                 metrics: Metrics, policy: LegPolicy = LegPolicy(), admission: Admission | None = None,
                 limits: InputLimits = InputLimits(), disagg: DisaggPolicy = DisaggPolicy()):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.model = model
        self.picker = picker
        self.states = states
        self.pool = pool
        self.leases = LeaseClient(pool)  # releases KV that no decode worker took
        self.metrics = metrics
        self.policy = policy
        self.admission = admission or Admission(max_inflight=1 << 30, max_queued_tokens=1 << 62)
        self.limits = limits
        self.disagg = Disaggregation(disagg, picker, metrics)
        self._background: set[asyncio.Task] = set()
        self._state_outage = StateOutage()

    # -- the request path ---------------------------------------------------------------------
    async def generate(self, request: generation_pb2.GenerateRequest, deadline_s: float | None) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Streams one request's responses, the last with its finish reason and metrics.
        `deadline_s`: the seconds the caller gives it (None: no deadline)."""
        try:
            ticket = self.admission.admit_call()  # before any work: an overloaded router refuses at once
        except Shed:
            self.metrics.requests.labels("router", "shed").inc()
            raise
        try:
            async for msg in self._generate(request, deadline_s, ticket):
                yield msg
        finally:
            ticket.close()

    async def _generate(self, request: generation_pb2.GenerateRequest, deadline_s: float | None, ticket: Ticket):
        try:
            run = await self._prepare(request, deadline_s)
            prefill = await self.picker.by_role("prefill")
            ticket.queue(len(run.prompt) + len(run.emitted), min((v.load.queued_tokens for v in prefill), default=None),
                         run.remaining_s())
        except Shed:
            self.metrics.requests.labels("router", "shed").inc()
            raise
        except DistserveError as exc:  # refused before any work: invalid, or nobody serves it yet
            self.metrics.requests.labels("router", "unavailable" if isinstance(exc, Unavailable) else "rejected").inc()
            raise
        state = StateWriter(self.states, run.rid, self._state_outage)
        state.update(RequestPhase.QUEUED, prompt_tokens=len(run.prompt), max_tokens=run.params.max_tokens,
                     resumed_tokens=run.resumed or None)
        outcome = "failed"
        self.metrics.inflight.labels("router").inc()
        try:
            if run.tokens_left <= 0:  # a resumed client already had every token
                run.finish = common_pb2.FINISH_REASON_LENGTH
            while run.finish == UNFINISHED:
                try:
                    async for msg in self._attempt(run, state):
                        ticket.prefilled()  # the first token is back: its prompt no longer waits
                        yield msg
                except LegFailure as failure:
                    await self._replay(run, failure, state)
            yield self._finish(run, state)
            outcome = "finished"
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (task cancel or generator close)
            outcome = "cancelled"
            state.update(RequestPhase.CANCELLED, tokens_emitted=len(run.emitted))
            raise
        except DistserveError as exc:
            state.update(RequestPhase.FAILED, tokens_emitted=len(run.emitted), error=str(exc))
            raise
        except grpc.aio.AioRpcError as exc:
            state.update(RequestPhase.FAILED, tokens_emitted=len(run.emitted), error=exc.details() or str(exc.code()))
            raise error_from_rpc(exc) from None
        finally:
            self.metrics.requests.labels("router", outcome).inc()
            self.metrics.inflight.labels("router").dec()
            self._drop_prefilled(run)

    # -- preparation -------------------------------------------------------------------------
    async def _tokens(self, request: generation_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            if len(request.token_ids.ids) > self.limits.max_prompt_tokens:
                raise InvalidRequest("token_ids", f"{len(request.token_ids.ids)} tokens, more than the router's limit of {self.limits.max_prompt_tokens}")
            return list(request.token_ids.ids)
        if kind != "text" or not request.text:
            raise InvalidRequest("prompt", "must not be empty")
        size = len(request.text.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_prompt_bytes:
            raise InvalidRequest("text", f"{size} bytes, more than the router's limit of {self.limits.max_prompt_bytes}")
        if size > THREAD_TOKENIZE_BYTES:  # a long text takes the tokenizer a while: keep the event loop free
            return await asyncio.to_thread(self._tokenize, request)
        return self._tokenize(request)

    def _tokenize(self, request: generation_pb2.GenerateRequest) -> list[int]:
        if request.apply_chat_template and getattr(self.tokenizer, "chat_template", None):
            enc = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": request.text}], add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(enc["input_ids"])
        return list(self.tokenizer(request.text)["input_ids"])

    async def _prepare(self, request: generation_pb2.GenerateRequest, left: float | None) -> Run:
        if request.request_id and not REQUEST_ID.fullmatch(request.request_id):
            raise InvalidRequest("request_id", "must be 1-128 characters of A-Z a-z 0-9 . _ : -")
        if len(request.resume_token_ids) > self.limits.max_prompt_tokens:
            raise InvalidRequest("resume_token_ids", f"more than the router's limit of {self.limits.max_prompt_tokens} tokens")
        params = params_from_pb(request.params)
        prompt = await self._tokens(request)
        max_len = await self.picker.max_model_len()
        if max_len is None:
            raise Unavailable(f"no worker serves model {self.model!r} yet")
        validate_request(prompt, params, self.vocab_size, max_len)
        resumed = list(request.resume_token_ids)
        if resumed and not request.request_id:
            raise InvalidRequest("request_id", "is required to resume a request")
        bad = next((t for t in resumed if t >= self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest("resume_token_ids", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(resumed) > params.max_tokens:
            raise InvalidRequest("resume_token_ids", f"{len(resumed)} tokens resumed, more than max_tokens ({params.max_tokens})")
        run = Run(request.request_id or uuid.uuid4().hex, prompt, params, request.params,
                  None if left is None else time.monotonic() + left, IncrementalDetokenizer(self.tokenizer),
                  emitted=resumed, resumed=len(resumed))
        for t in resumed:  # token by token, as the client received text: only whole characters were sent
            run.detok.add([t])
        text = run.detok.text  # ... and none of a possible stop string's start
        run.text_sent = len(text) - (stop_prefix_len(text, 0, params.stop) if params.stop else 0)
        run.metrics.prompt_tokens = len(prompt)
        return run

    # -- one attempt: prefill leg, then decode leg --------------------------------------------
    async def _attempt(self, run: Run, state: StateWriter) -> AsyncIterator[generation_pb2.GenerateResponse]:
        colocated = not await self.picker.by_role("prefill") and bool(await self.picker.by_role("colocated"))
        choice = None
        if not colocated and run.prefilled is None:
            choice = await self._choose(run)
        local = choice is not None and choice.local
        self.metrics.decisions.labels("colocated" if colocated else "local_prefill" if local else "disaggregated").inc()
        if not colocated and not local and run.prefilled is None:
            run.metrics.phases.router_s = run.metrics.phases.router_s or time.monotonic() - run.t0
            p = await self._prefill_leg(run)
            msg = self._emit(run, [p.first_token], [p.first_logprob] if run.params.logprobs else [], state,
                             top_logprobs=[p.first_top_logprobs] if p.first_top_logprobs is not None else [])
            state.update(RequestPhase.PREFILLED, prefill_worker=p.worker_id, tokens_emitted=len(run.emitted))
            if msg is not None:
                yield msg
            if run.finish != UNFINISHED:
                return
        async for msg in self._decode_leg(run, "colocated" if colocated else "decode", state,
                                          worker=choice.decode if local else None):
            yield msg

    async def _choose(self, run: Run) -> Choice:
        """Where this attempt prefills (disagg.py), recorded in the request's metrics."""
        prompt = run.leg_prompt()
        blocks = lambda bs: blocks_needed(len(prompt), run.tokens_left, bs)  # noqa: E731
        choice = await self.disagg.choose(len(prompt), blocks, run.avoid, kv_lost=run.local_prefill, prompt=prompt,
                                          observed_rate=self.admission.prefill_rate, pick=lambda fn: self._pick(run, fn))
        m = run.metrics
        m.disagg_decision, m.disagg_reason = choice.decision, choice.reason
        m.local_estimate_s, m.remote_estimate_s = choice.local_s, choice.remote_s
        return choice

    async def _prefill_leg(self, run: Run) -> Prefilled:
        prompt, params = run.leg_prompt(), run.leg_params()
        worker = await self._pick(run, lambda: self.picker.pick_prefill(prompt, exclude=run.avoid))
        stub = prefill_pb2_grpc.PrefillStub(self.pool.get(worker.info.address))
        token = secrets.token_bytes(32)  # ours: KV held for a call we give up on can be released without its answer
        call = stub.Prefill(prefill_pb2.PrefillRequest(request_id=run.leg_id, token_ids=prompt, params=params, transfer_token=token),
                            timeout=run.timeout(self.policy.prefill_timeout_s))
        try:
            resp = await call
        except asyncio.CancelledError:  # the client left or its deadline passed: the worker may have answered already
            self._background_release(worker.info.kv_address, run.leg_id, token)
            raise
        except grpc.aio.AioRpcError as exc:
            if rpc_failure(exc, run):
                raise LegFailure("prefill_failed", worker.worker_id, f"{exc.code().name}: {exc.details()}") from None
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()
        self.picker.ejector.success(worker.worker_id)
        self.admission.observe_prefill(len(prompt), resp.compute_s)
        ph = run.metrics.phases
        ph.prefill_queue_s, ph.prefill_compute_s = resp.queue_s, resp.compute_s
        run.metrics.prefill_worker = worker.worker_id
        self._prefilled_from_cache(run, len(prompt), resp.cached_tokens)
        run.prefilled = Prefilled(prompt, params, resp.first_token, resp.first_logprob, worker.worker_id,
                                  resp.kv_handle if resp.HasField("kv_handle") else None,
                                  resp.first_top_logprobs if resp.HasField("first_top_logprobs") else None)
        if resp.finish_reason:
            run.finish = resp.finish_reason
        return run.prefilled

    async def _decode_leg(self, run: Run, role: str, state: StateWriter,
                          worker: WorkerView | None = None) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """`worker`: the decode worker chosen to prefill the prompt itself (else one is picked now)."""
        p = run.prefilled
        prompt = p.prompt if p is not None else run.leg_prompt()
        params = p.params if p is not None else run.leg_params()
        blocks = lambda bs: blocks_needed(len(prompt), params.max_tokens, bs)  # noqa: E731
        if worker is not None:
            self.picker.claim_decode(worker, len(prompt))
        else:
            worker = await self._pick(run, lambda: self.picker.pick_decode(blocks, role=role, exclude=run.avoid,
                                                                            prompt=prompt if p is None else None))
        wid = worker.worker_id
        run.metrics.decode_worker = wid
        run.metrics.colocated = role == "colocated" or p is None
        state.update(RequestPhase.DECODING, decode_worker=wid)
        req = decode_pb2.DecodeRequest(request_id=run.leg_id, prompt_token_ids=prompt, params=params)
        if p is not None:
            req.first_token, req.first_logprob = p.first_token, p.first_logprob
            req.kv_handle.CopyFrom(p.handle)
        call = decode_pb2_grpc.DecodeStub(self.pool.get(worker.info.address)).Decode(req, timeout=run.timeout())
        t_dec = time.monotonic()
        try:
            while True:
                try:
                    resp = await asyncio.wait_for(call.read(), self.policy.stall_timeout_s)
                except asyncio.TimeoutError:
                    raise LegFailure("decode_stalled", wid, f"no message in {self.policy.stall_timeout_s:.1f}s") from None
                if resp is grpc.aio.EOF:
                    raise LegFailure("decode_failed", wid, "the stream ended before the request finished")
                if resp.worker_id:  # the KV is in place: the decode worker released the lease
                    self._took_kv(run)
                    ph = run.metrics.phases
                    ph.decode_queue_s, ph.kv_transfer_s = resp.queue_s, resp.kv_transfer_s
                    run.metrics.kv_transport, run.metrics.kv_bytes = resp.kv_transport, resp.kv_bytes
                    if p is not None and resp.kv_bytes:
                        self.disagg.transfers.observe(p.worker_id, wid, resp.kv_bytes, resp.kv_transfer_s, len(prompt))
                    t_dec = time.monotonic()
                if resp.prefill_compute_s:
                    run.metrics.phases.prefill_queue_s, run.metrics.phases.prefill_compute_s = resp.queue_s, resp.prefill_compute_s
                    self._prefilled_from_cache(run, len(prompt), resp.cached_tokens)
                if not resp.token_ids and not resp.finish_reason:
                    continue  # a keep-alive while it waits for blocks, or the KV-in-place message
                msg = self._emit(run, list(resp.token_ids), list(resp.logprobs), state, resp.finish_reason,
                                 top_logprobs=list(resp.top_logprobs))
                if msg is not None:
                    yield msg
                if run.finish != UNFINISHED:
                    break
        except grpc.aio.AioRpcError as exc:
            if kv_fault(exc) and p is not None:
                raise LegFailure("kv_lost", p.worker_id, f"{exc.code().name}: {exc.details()}") from None
            if rpc_failure(exc, run):
                raise LegFailure("decode_failed", wid, f"{exc.code().name}: {exc.details()}") from None
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()
        run.metrics.phases.decode_s += time.monotonic() - t_dec
        self.picker.ejector.success(wid)

    def _prefilled_from_cache(self, run: Run, prompt_tokens: int, cached_tokens: int) -> None:
        """Records a prefill's prefix-cache hit in the request's metrics and the router's counters."""
        run.metrics.cached_tokens = cached_tokens
        self.metrics.prefix_queried.labels("router").inc(prompt_tokens)
        self.metrics.prefix_hits.labels("router").inc(cached_tokens)

    # -- replay ------------------------------------------------------------------------------
    async def _replay(self, run: Run, failure: LegFailure, state: StateWriter) -> None:
        """Prepares the next attempt after a failed leg, or raises when the request must fail."""
        if self.picker.ejector.failure(failure.worker_id):
            self.metrics.ejections.inc()
        run.avoid.add(failure.worker_id)
        if run.attempt >= self.policy.migration_limit:
            log.warning("request %s failed after %d replays: %s", run.rid, run.attempt, failure)
            raise Unavailable(f"request failed after {run.attempt} replays on other workers; last: {failure}")
        left = run.remaining_s()
        if left is not None and left <= 0:
            raise DeadlineExceeded("the request's deadline passed while it was being replayed")
        p = run.prefilled
        if failure.reason in ("decode_failed", "decode_stalled") and p is not None and p.handle is not None:
            how = "its held KV goes to another decode worker"  # no decode worker took it: no need to prefill again
        else:
            self._drop_prefilled(run)
            if failure.reason == "kv_lost":
                run.kv_losses += 1
                run.local_prefill = run.kv_losses >= 2  # the path from prefill to decode fails: prefill where it decodes
            how = f"replaying {len(run.prompt)} prompt + {len(run.emitted)} emitted tokens" + (" on a decode worker" if run.local_prefill else "")
        run.attempt += 1
        run.metrics.migrations = run.attempt
        self.metrics.migrations.labels(failure.reason).inc()
        state.update(migrations=run.attempt, tokens_emitted=len(run.emitted), last_failure=str(failure))
        log.warning("request %s: %s; %s (replay %d of %d)", run.rid, failure, how, run.attempt, self.policy.migration_limit)

    async def _pick(self, run: Run, pick):
        """A worker from `pick()`; on a replay, waits a little for one to come back (a supervisor
        restarts crashed workers) rather than failing at once."""
        deadline = time.monotonic() + (self.policy.pick_wait_s if run.attempt else 0.0)
        while True:
            try:
                return await pick()
            except Unavailable:
                left = run.remaining_s()
                if time.monotonic() >= deadline or (left is not None and left < 0.5):
                    raise
                await asyncio.sleep(0.25)

    def _took_kv(self, run: Run) -> None:
        if run.prefilled is not None:
            run.prefilled.handle = None  # the decode worker owns the lease from here on
        run.prefilled = None

    def _drop_prefilled(self, run: Run) -> None:
        """Releases KV held for this request that no decode worker took (best effort: its lease
        expires anyway)."""
        p, run.prefilled = run.prefilled, None
        if p is not None and p.handle is not None:
            self._background_release(p.handle.kv_address, p.handle.request_id, p.handle.transfer_token)

    def _background_release(self, kv_address: str, request_id: str, token: bytes) -> None:
        task = asyncio.ensure_future(self._release(kv_address, request_id, token))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, kv_address: str, request_id: str, token: bytes) -> None:
        try:
            await self.leases.release(kv_address, request_id, token)
        except Exception as exc:
            log.warning("releasing the KV of %r failed (the lease will expire): %s", request_id, exc)

    # -- tokens out --------------------------------------------------------------------------
    def _emit(self, run: Run, ids: list[int], logprobs: list[float], state: StateWriter,
              finish: int = UNFINISHED, top_logprobs: list[common_pb2.TopLogprobs] = ()) -> generation_pb2.GenerateResponse | None:
        """Records tokens as sent and returns their message (None when there is nothing to send);
        sets run.finish when they end the request (a worker's finish reason, a stop string past
        min_tokens, max_tokens)."""
        before = run.text_sent
        run.detok.add(ids)
        text = run.detok.text
        end = len(text)
        if run.params.stop and len(run.emitted) + len(ids) >= run.params.min_tokens:
            i = find_stop(text, run.params.stop, before)
            if i is not None:  # the text ends before the stop string
                end = i
                run.detok.text = text[:i]
                run.stop_cut = True
                finish = common_pb2.FINISH_REASON_STOP
            else:  # text that may be the start of a stop string waits until the next tokens tell
                end -= stop_prefix_len(text, before, run.params.stop)
        delta = text[before:end]
        run.text_sent = end
        now = time.monotonic()
        run.first_at = run.first_at or now
        run.last_at = now
        run.emitted.extend(ids)
        if finish == UNFINISHED and run.tokens_left <= 0:
            finish = common_pb2.FINISH_REASON_LENGTH
        if finish != UNFINISHED:
            run.finish = finish
        if not ids and not delta:
            return None
        return generation_pb2.GenerateResponse(request_id=run.rid, token_ids=ids, text=delta, logprobs=logprobs,
                                               top_logprobs=top_logprobs)

    def _finish(self, run: Run, state: StateWriter) -> generation_pb2.GenerateResponse:
        held = run.detok.text[run.text_sent:]  # what waited for a stop string that never came
        tail = held + (run.detok.flush() if not run.stop_cut else "")
        end = time.monotonic()
        m = run.metrics
        sent = len(run.emitted) - run.resumed  # tokens this call sent
        m.completion_tokens = len(run.emitted)
        m.ttft_s = (run.first_at or end) - run.t0
        m.tpot_s = ((run.last_at - run.first_at) / (sent - 1)) if run.last_at and sent > 1 else 0.0
        m.e2e_s = end - run.t0
        self.metrics.tokens.labels("router").inc(sent)
        self.metrics.ttft.observe(m.ttft_s)
        if sent > 1:
            self.metrics.tpot.observe(m.tpot_s)
        self.metrics.e2e.observe(m.e2e_s)
        state.update(RequestPhase.FINISHED, tokens_emitted=len(run.emitted), finish_reason=finish_name(run.finish), e2e_s=m.e2e_s)
        log.info("finished %s: %d prompt (%d cached) + %d tokens, ttft %.3fs, tpot %.4fs, e2e %.3fs, prefill %s, decode %s, replays %d",
                 run.rid, len(run.prompt), m.cached_tokens, len(run.emitted), m.ttft_s, m.tpot_s, m.e2e_s, m.prefill_worker, m.decode_worker, run.attempt)
        return generation_pb2.GenerateResponse(request_id=run.rid, text=tail, finish_reason=run.finish, metrics=m)

    async def list_models(self) -> generation_pb2.ListModelsResponse:
        views = await self.picker.workers(force=True)
        return generation_pb2.ListModelsResponse(models=[generation_pb2.ModelInfo(
            name=self.model,
            max_model_len=min((v.info.max_model_len for v in views), default=0),
            prefill_workers=sum(v.info.role == "prefill" for v in views),
            decode_workers=sum(v.info.role in ("decode", "colocated") for v in views),
        )])


def stop_prefix_len(text: str, start: int, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text[start:] that begins some stop string (and so must not be sent
    yet: sent text can't be taken back when the stop string completes)."""
    for k in range(min(max(map(len, stops)) - 1, len(text) - start), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


def finish_name(code: int) -> str:
    return FINISH_NAMES.get(code, "unspecified")
