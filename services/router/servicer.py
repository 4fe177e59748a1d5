"""Generation servicer: one client request through its two legs.

Life of a request: validate and tokenize -> QUEUED in Redis -> Prefill on the least-loaded prefill
worker (retried once elsewhere if it is unavailable) -> first token streamed to the client
(PREFILLED) -> Decode on a decode worker with room, which pulls the KV and streams the rest
(DECODING) -> FINISHED with timings. Text is detokenized incrementally and cut at stop strings.
When the client cancels, both legs are cancelled and a KV lease not yet taken is released.
With no prefill workers registered, requests go to colocated workers in one leg.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from distserve.engine.errors import DistserveError, InvalidRequest, Unavailable
from distserve.engine.sampling import SamplingParams, find_stop, validate_request
from distserve.kv.grpc_transport import GrpcKvTransport
from distserve.kv.handle import KvHandle
from distserve.metrics import Metrics
from distserve.rpc.channels import ChannelPool
from distserve.rpc.convert import params_from_pb, params_to_pb
from distserve.rpc.errors import error_from_rpc, grpc_errors
from distserve.state.requests import RequestPhase, RequestStateStore
from distserve.tokenization import IncrementalDetokenizer
from distserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, generation_pb2, generation_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from services.router.picker import WorkerPicker

log = logging.getLogger(__name__)


class _StateWriter:
    """Writes one request's state to Redis off the critical path, in order."""

    def __init__(self, store: RequestStateStore, request_id: str):
        self.store, self.rid = store, request_id
        self._last: asyncio.Task | None = None

    def update(self, phase: RequestPhase | None = None, **fields) -> None:
        prev = self._last

        async def write():
            if prev is not None:
                await asyncio.shield(prev)
            try:
                await self.store.update(self.rid, phase, **fields)
            except Exception as exc:  # state is bookkeeping; serving goes on without it
                log.warning("request state write for %s failed: %s", self.rid, exc)

        self._last = asyncio.ensure_future(write())

    async def flush(self) -> None:
        if self._last is not None:
            await asyncio.shield(self._last)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, tokenizer, model: str, picker: WorkerPicker, states: RequestStateStore, pool: ChannelPool,
                 metrics: Metrics, prefill_timeout_s: float = 120.0):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.model = model
        self.picker = picker
        self.states = states
        self.pool = pool
        self.kv = GrpcKvTransport(pool)
        self.metrics = metrics
        self.prefill_timeout_s = prefill_timeout_s

    # -- request preparation -----------------------------------------------------------------
    def _tokens(self, request: generation_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind != "text" or not request.text:
            raise InvalidRequest("prompt", "must not be empty")
        if request.apply_chat_template and getattr(self.tokenizer, "chat_template", None):
            enc = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": request.text}], add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(enc["input_ids"])
        return list(self.tokenizer(request.text)["input_ids"])

    async def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        max_len = await self.picker.max_model_len()
        if max_len is None:
            raise Unavailable(f"no worker serves model {self.model!r} yet")
        validate_request(prompt, params, self.vocab_size, max_len)

    # -- the two legs ------------------------------------------------------------------------
    async def _prefill(self, rid: str, prompt: list[int], params: SamplingParams, context) -> tuple[prefill_pb2.PrefillResponse, str]:
        tried: set[str] = set()
        while True:
            worker = await self.picker.pick_prefill(len(prompt), exclude=tried)
            stub = prefill_pb2_grpc.PrefillStub(self.pool.get(worker.info.address))
            timeout = min(self.prefill_timeout_s, context.time_remaining() or self.prefill_timeout_s)
            call = stub.Prefill(prefill_pb2.PrefillRequest(request_id=rid, token_ids=prompt, params=params_to_pb(params)), timeout=timeout)
            try:
                return await call, worker.worker_id
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and not tried:
                    tried.add(worker.worker_id)
                    self.metrics.retries.labels("prefill").inc()
                    continue
                raise error_from_rpc(exc) from None
            finally:
                call.cancel()

    def _decode_call(self, worker, rid, prompt, params, first, handle):
        stub = decode_pb2_grpc.DecodeStub(self.pool.get(worker.info.address))
        req = decode_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, params=params_to_pb(params))
        if first is not None:
            req.first_token = first.first_token
            req.first_logprob = first.first_logprob
            req.kv_handle.CopyFrom(handle)
        return stub.Decode(req)

    # -- the RPC -----------------------------------------------------------------------------
    @grpc_errors
    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        t0 = time.monotonic()
        rid = request.request_id or uuid.uuid4().hex
        try:
            params = params_from_pb(request.params)
            prompt = self._tokens(request)
            await self._validate(prompt, params)
        except DistserveError:
            self.metrics.requests.labels("router", "rejected").inc()
            raise
        state = _StateWriter(self.states, rid)
        state.update(RequestPhase.QUEUED, prompt_tokens=len(prompt), max_tokens=params.max_tokens)
        detok = IncrementalDetokenizer(self.tokenizer)
        phases = common_pb2.PhaseTimings()
        metrics = common_pb2.RequestMetrics(prompt_tokens=len(prompt))
        emitted = 0
        first_at = last_at = None
        finish = common_pb2.FINISH_REASON_UNSPECIFIED
        decode_call = None
        handle = None
        outcome = "failed"
        self.metrics.inflight.labels("router").inc()
        try:
            colocated = not await self.picker.by_role("prefill") and await self.picker.by_role("colocated")
            self.metrics.decisions.labels("colocated" if colocated else "disaggregated").inc()
            first = None
            if not colocated:
                phases.router_s = time.monotonic() - t0
                first, pworker = await self._prefill(rid, prompt, params, context)
                phases.prefill_queue_s, phases.prefill_compute_s = first.queue_s, first.compute_s
                metrics.prefill_worker = pworker
                handle = first.kv_handle if first.HasField("kv_handle") else None
                first_at = time.monotonic()
                msg, stop_hit = self._tokens_msg(rid, detok, [first.first_token], [first.first_logprob] if params.logprobs else [], params)
                emitted = 1
                state.update(RequestPhase.PREFILLED, prefill_worker=pworker, tokens_emitted=1)
                yield msg
                if first.finish_reason or stop_hit:
                    finish = first.finish_reason or common_pb2.FINISH_REASON_STOP
            if finish == common_pb2.FINISH_REASON_UNSPECIFIED:
                role = "colocated" if colocated else "decode"
                worker = await self.picker.pick_decode(lambda bs: -(-(len(prompt) + params.max_tokens - 1) // bs), role=role)
                metrics.decode_worker = worker.worker_id
                metrics.colocated = bool(colocated)
                state.update(RequestPhase.DECODING, decode_worker=worker.worker_id)
                t_dec = time.monotonic()
                decode_call = self._decode_call(worker, rid, prompt, params, first, handle)
                async for resp in decode_call:
                    if resp.worker_id:
                        handle = None  # the decode worker owns the lease from here on
                        phases.decode_queue_s, phases.kv_transfer_s = resp.queue_s, resp.kv_transfer_s
                        metrics.kv_transport, metrics.kv_bytes = resp.kv_transport, resp.kv_bytes
                        t_dec = time.monotonic()
                    if resp.prefill_compute_s:
                        phases.prefill_queue_s, phases.prefill_compute_s = resp.queue_s, resp.prefill_compute_s
                    if not resp.token_ids and not resp.finish_reason:
                        continue
                    now = time.monotonic()
                    first_at = first_at or now
                    last_at = now
                    emitted += len(resp.token_ids)
                    msg, stop_hit = self._tokens_msg(rid, detok, list(resp.token_ids), list(resp.logprobs), params)
                    if stop_hit or resp.finish_reason:
                        finish = resp.finish_reason or common_pb2.FINISH_REASON_STOP
                        if msg.token_ids or msg.text:
                            yield msg
                        break
                    yield msg
                phases.decode_s = time.monotonic() - t_dec
            tail = detok.flush() if finish != common_pb2.FINISH_REASON_STOP else ""
            end = time.monotonic()
            metrics.completion_tokens = emitted
            metrics.ttft_s = (first_at or end) - t0
            metrics.tpot_s = ((last_at - first_at) / (emitted - 1)) if last_at and emitted > 1 else 0.0
            metrics.e2e_s = end - t0
            metrics.phases.CopyFrom(phases)
            yield generation_pb2.GenerateResponse(request_id=rid, text=tail, finish_reason=finish, metrics=metrics)
            outcome = "finished"
            self.metrics.tokens.labels("router").inc(emitted)
            self.metrics.ttft.observe(metrics.ttft_s)
            if emitted > 1:
                self.metrics.tpot.observe(metrics.tpot_s)
            self.metrics.e2e.observe(metrics.e2e_s)
            state.update(RequestPhase.FINISHED, tokens_emitted=emitted, finish_reason=finish_name(finish), e2e_s=metrics.e2e_s)
            log.info("finished %s: %d prompt + %d tokens, ttft %.3fs, tpot %.4fs, e2e %.3fs, prefill %s, decode %s",
                     rid, len(prompt), emitted, metrics.ttft_s, metrics.tpot_s, metrics.e2e_s, metrics.prefill_worker, metrics.decode_worker)
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (task cancel or generator close)
            outcome = "cancelled"
            state.update(RequestPhase.CANCELLED, tokens_emitted=emitted)
            raise
        except DistserveError as exc:
            state.update(RequestPhase.FAILED, tokens_emitted=emitted, error=str(exc))
            raise
        except grpc.aio.AioRpcError as exc:
            state.update(RequestPhase.FAILED, tokens_emitted=emitted, error=exc.details() or str(exc.code()))
            raise error_from_rpc(exc) from None
        finally:
            self.metrics.requests.labels("router", outcome).inc()
            self.metrics.inflight.labels("router").dec()
            if decode_call is not None:
                decode_call.cancel()
            if handle is not None:  # prefilled but never handed to a decode worker
                asyncio.ensure_future(self._release(handle))

    async def _release(self, handle: common_pb2.KvHandle) -> None:
        try:
            await self.kv.release(KvHandle.from_proto(handle))
        except Exception as exc:
            log.warning("releasing the KV of %s failed (the lease will expire): %s", handle.request_id, exc)

    def _tokens_msg(self, rid, detok: IncrementalDetokenizer, ids: list[int], logprobs: list[float], params: SamplingParams):
        """A response with these tokens' text; the bool says a stop string ended the output."""
        before = len(detok.text)
        delta = detok.add(ids)
        stop_hit = False
        if params.stop and delta:
            i = find_stop(detok.text, params.stop, before)
            if i is not None:
                delta = detok.text[before:i] if i > before else ""
                detok.text = detok.text[:i]
                stop_hit = True
        return generation_pb2.GenerateResponse(request_id=rid, token_ids=ids, text=delta, logprobs=logprobs), stop_hit

    async def ListModels(self, request, context):
        views = await self.picker.workers(force=True)
        return generation_pb2.ListModelsResponse(models=[generation_pb2.ModelInfo(
            name=self.model,
            max_model_len=min((v.info.max_model_len for v in views), default=0),
            prefill_workers=sum(v.info.role == "prefill" for v in views),
            decode_workers=sum(v.info.role in ("decode", "colocated") for v in views),
        )])


def finish_name(code: int) -> str:
    from distserve.rpc.convert import FINISH_NAMES

    return FINISH_NAMES.get(code, "unspecified")
