"""Decode servicer: pull a prompt's KV from its prefill worker, then stream the rest of the tokens.

Admission first: blocks for the prompt plus every token it may generate are reserved before any KV
moves; while none are free the request waits (its KV stays leased on the prefill side, which in turn
stops admitting prompts when full). Then the KV is pulled over the best shared transport, the lease is
released, and the request joins the running batch. Without a KV handle the worker prefills the
prompt itself (conditional disaggregation, or the colocated role): in chunks that ride on the running
batch within the worker's TPOT target (`--tpot-slo-ms`), so its running decodes keep their pace. A cancelled call aborts the request
and frees its blocks; a failed pull frees the reservation and ends with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from distserve.errors import DistserveError, InvalidRequest, PermissionDenied, ResourceExhausted, Unavailable
from distserve.kv.handle import KvHandle
from distserve.kv.puller import KvPuller, PullResult
from distserve.kv.release import LeaseClient
from distserve.rpc.convert import finish_to_pb, params_from_pb, top_logprobs_to_pb
from distserve.rpc.errors import KV_FAULT
from services.worker.runtime import WorkerRuntime
from distserve.v1 import decode_pb2, decode_pb2_grpc
from services.decode.peers import KnownHolders

log = logging.getLogger(__name__)

KEEPALIVE_S = 1.0  # while a request waits for blocks, an empty message this often tells the router we live


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, runtime: WorkerRuntime, leases: LeaseClient, puller: KvPuller, holders: KnownHolders):
        self.rt = runtime
        self.holders = holders  # only registered prefill workers are dialed for KV
        self.leases = leases  # releases the holder's lease once the KV is pulled
        self.puller = puller  # negotiates the transport per handle, falls back to grpc
        self._background: set[asyncio.Task] = set()

    def _check_layout(self, handle: KvHandle) -> None:
        lay = self.rt.engine.layout
        ours = (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype_name)
        theirs = (handle.layout.num_layers, handle.layout.num_kv_heads, handle.layout.head_dim, handle.layout.dtype_name)
        if ours != theirs:
            raise InvalidRequest("kv_handle", f"KV layout {theirs} does not match this worker's {ours} (different model?)")

    async def _admit(self, rid: str, prompt: list[int], params, handle: KvHandle, context):
        """Reserves blocks and a batch seat, waiting while there are none (until the lease is about to
        end): woken when a request ends, not by a timer. Yields
        every KEEPALIVE_S while it waits, so the caller can send a keep-alive."""
        while True:
            seen = self.rt.worker.room_version
            try:
                await self.rt.worker.reserve(rid, prompt, params)
                return
            except ResourceExhausted:
                remaining = context.time_remaining()
                if time.time() > handle.lease_expiry_unix - 1.0 or (remaining is not None and remaining < 0.5):
                    raise
                if not await self.rt.worker.wait_for_room(seen, KEEPALIVE_S):  # woken when a request ends
                    yield

    async def _pull(self, rid: str, handle: KvHandle, context) -> PullResult:
        """Pulls the KV within the caller's deadline. A failure is the holder's (or the path's): the
        trailing metadata says so, and the router replays the request instead of blaming us."""
        try:
            async with asyncio.timeout(context.time_remaining()):
                result = await self.puller.pull(handle)
        except (DistserveError, TimeoutError) as exc:
            context.set_trailing_metadata((KV_FAULT,))
            if isinstance(exc, TimeoutError):
                raise Unavailable(f"KV pull of {rid} did not finish within the call's deadline") from None
            raise
        task = asyncio.create_task(self.leases.release_handle(handle))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return result

    async def Decode(self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        rt = self.rt
        rt.serving("decode", "colocated")
        rid = request.request_id
        params = params_from_pb(request.params)
        prompt = list(request.prompt_token_ids)
        rt.inflight += 1
        t0 = time.monotonic()
        finished = False
        outcome = "failed"
        try:
            if request.HasField("kv_handle"):
                handle = KvHandle.from_proto(request.kv_handle)
                self._check_layout(handle)
                if not 0 < handle.num_tokens <= len(prompt):  # a bent handle must not size a buffer (fuzzer: 24 GB, INTERNAL)
                    raise InvalidRequest("kv_handle", f"num_tokens {handle.num_tokens} must be in [1, {len(prompt)}] (the prompt's tokens)")
                try:
                    await self.holders.check(handle)
                except PermissionDenied:
                    context.set_trailing_metadata((KV_FAULT,))  # a holder gone from the registry: routers replay
                    raise
                async for _ in self._admit(rid, prompt, params, handle, context):
                    yield decode_pb2.DecodeResponse()  # keep-alive
                queue_s = time.monotonic() - t0
                rt.metrics.queue_seconds.labels("decode").observe(queue_s)
                try:
                    pulled = await self._pull(rid, handle, context)
                except BaseException:
                    await rt.worker.abort(rid)
                    raise
                lp = request.first_logprob if params.logprobs else None
                try:
                    stream = await rt.worker.decode_prefilled(rid, request.first_token, lp, pulled.pulled.tensor)
                except BaseException:
                    pulled.pulled.release(reuse=False)  # the engine may still read it
                    raise
                pulled.pulled.release()
                rt.kv_pulls.observe(pulled.pulled.wire_bytes, pulled.seconds, handle.num_tokens)  # published for routers
                rt.metrics.decisions.labels("disaggregated").inc()
                yield decode_pb2.DecodeResponse(
                    queue_s=queue_s, kv_transfer_s=pulled.seconds, kv_bytes=pulled.pulled.wire_bytes,
                    kv_transport=pulled.transport, worker_id=rt.worker_id,
                )
            else:
                stream = await rt.worker.generate(rid, prompt, params)
                rt.metrics.decisions.labels("local_prefill").inc()
                yield decode_pb2.DecodeResponse(worker_id=rt.worker_id, kv_transport="local")
            n = steps = 0
            async for out in stream:
                n += len(out.new_token_ids)
                rt.metrics.tokens.labels("decode").inc(len(out.new_token_ids))
                steps += bool(out.new_token_ids)  # one output per engine step; several tokens when drafts were accepted
                msg = decode_pb2.DecodeResponse(token_ids=out.new_token_ids, logprobs=out.new_logprobs,
                                                top_logprobs=[top_logprobs_to_pb(t) for t in out.new_top_logprobs])
                if out.prefill_s:
                    msg.queue_s, msg.prefill_compute_s = out.queue_s, out.prefill_s
                    msg.cached_tokens = out.num_cached_tokens
                if out.finished:
                    msg.finish_reason = finish_to_pb(out.finish_reason)
                    finished = True
                yield msg
            outcome = "finished" if finished else "cancelled"
            log.info("decoded %r: %d prompt + %d new tokens in %d steps, %.3fs", rid, len(prompt), n, steps, time.monotonic() - t0)
        except (asyncio.CancelledError, GeneratorExit):
            # a router that has its last token may close the stream while this generator still waits
            # at that token's yield: that request finished
            outcome = "finished" if finished else "cancelled"
            raise
        finally:
            rt.metrics.requests.labels("decode", outcome).inc()
            rt.inflight -= 1
            if not finished:
                rt.worker.abort_nowait(rid)
