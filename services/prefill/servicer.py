"""Prefill servicer: a prompt in, its first token and a KV handle out.

The prompt joins the engine's prefill queue (batched by token budget; when KV blocks run out it
waits there). Once prefilled, its KV stays in the engine's blocks under a lease in the `LeaseTable`;
the decode worker pulls it through KvTransfer and releases it, or the lease expires and the reaper
frees it. A cancelled call aborts the request wherever it is, and KV held for a call whose caller left
before the answer reached it is freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from distserve.engine.engine import LLMEngine
from distserve.errors import InvalidRequest
from distserve.kv.handle import KvHandle
from distserve.kv.lease import LeaseTable
from distserve.rpc.convert import finish_to_pb, params_from_pb, top_logprobs_to_pb
from distserve.runtime import host_id
from services.worker.runtime import WorkerRuntime
from distserve.v1 import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, runtime: WorkerRuntime, leases: LeaseTable, transports: tuple[str, ...], transport_params: dict[str, str] | None = None):
        self.rt = runtime
        self.leases = leases
        self.transports = transports
        self.transport_params = dict(transport_params or {})  # endpoints of the side-channel transports
        e: LLMEngine = runtime.engine
        self.layout = e.layout

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> prefill_pb2.PrefillResponse:
        rid = request.request_id
        params = params_from_pb(request.params)
        prompt = list(request.token_ids)
        if request.transfer_token and not 16 <= len(request.transfer_token) <= 64:
            raise InvalidRequest("transfer_token", f"must be 16 to 64 bytes, got {len(request.transfer_token)}")
        rt = self.rt
        rt.serving("prefill")
        rt.inflight += 1
        t0 = time.monotonic()
        try:
            stream = await rt.worker.generate(rid, prompt, params)
            out = None
            async for out in stream:
                break
            if out is None:
                raise asyncio.CancelledError()
        except asyncio.CancelledError:
            rt.metrics.requests.labels("prefill", "cancelled").inc()
            await rt.worker.abort(rid)
            raise
        except BaseException:
            rt.metrics.requests.labels("prefill", "failed").inc()
            raise
        finally:
            rt.inflight -= 1
        resp = prefill_pb2.PrefillResponse(
            first_token=out.new_token_ids[0],
            first_logprob=out.new_logprobs[0] if out.new_logprobs else 0.0,
            queue_s=out.queue_s,
            compute_s=out.prefill_s,
            worker_id=rt.worker_id,
            cached_tokens=out.num_cached_tokens,
        )
        if out.new_top_logprobs:
            resp.first_top_logprobs.CopyFrom(top_logprobs_to_pb(out.new_top_logprobs[0]))
        rt.metrics.tokens.labels("prefill").inc()
        rt.metrics.queue_seconds.labels("prefill").observe(out.queue_s)
        if out.finished:
            resp.finish_reason = finish_to_pb(out.finish_reason)
            rt.metrics.requests.labels("prefill", "finished").inc()
            return resp
        table, n = list(out.held_blocks), out.num_prompt_tokens
        cache = rt.engine.cache  # reading held blocks is safe from any thread: nothing else owns them
        token, expiry = self.leases.hold(
            rid,
            export_fn=lambda: cache.export(table, n),
            free_fn=lambda: rt.worker.abort_nowait(rid),
            ttl_s=rt.settings.lease_s,
            nbytes=self.layout.export_nbytes(n),
            token=request.transfer_token or None,
        )

        def caller_gone(ctx, rid=rid, token=token) -> None:
            """The call ended without its answer reaching the caller (it cancelled, or its deadline
            passed, while the KV was being held): nobody will pull it, so it is freed now, not at lease end."""
            if ctx.cancelled() and self.leases.release(rid, token):
                log.info("prefilled %r: the caller left before the answer; its KV is freed", rid)

        context.add_done_callback(caller_gone)
        caller_gone(context)  # a call that ended before the callback was added (its deadline passed while this
        # task waited for the loop) never runs it: its KV would stay held until the lease ends
        handle = KvHandle(
            request_id=rid,
            worker_id=rt.worker_id,
            kv_address=rt.advertise(),
            transports=self.transports,
            layout=self.layout,
            num_tokens=n,
            lease_expiry_unix=expiry,
            transfer_token=token,
            host_id=host_id(),
            transport_params=self.transport_params,
        )
        resp.kv_handle.CopyFrom(handle.to_proto())
        rt.metrics.requests.labels("prefill", "held").inc()
        log.info("prefilled %r: %d prompt tokens (%d cached), queue %.3fs, compute %.3fs (%.3fs total)", rid, n, out.num_cached_tokens,
                 out.queue_s, out.prefill_s, time.monotonic() - t0)
        return resp
