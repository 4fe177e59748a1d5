"""The process every model worker (prefill, decode, colocated) runs: engine thread, gRPC server,
registry heartbeat, metrics, and shutdown in order (its settings: `distserve.runtime.WorkerSettings`).

Start: bind and start the gRPC server (health NOT_SERVING; the role's calls get UNAVAILABLE) -> load the
model (off the event loop) -> start the engine thread -> warm it with one request and calibrate its step
times with a few prompts of other sizes (so the step-time fit it publishes has points) -> add the role's
servicers -> register in Redis and start the heartbeat -> health SERVING.
Stop (SIGTERM/SIGINT): health NOT_SERVING (routers watching it stop sending at once) -> leave the
registry -> keep serving for `leave_s` what routers with an older view still send -> wait up to `drain_s`
for in-flight requests and for held KV to be pulled -> stop the server -> release what is still held ->
stop the engine -> close Redis.
Redis down at start or later stops nothing: the heartbeat retries every `heartbeat_s`, the worker serves
routers that still know it, and the first heartbeat after Redis returns registers it again.
Role change (an elastic worker, `change_role`): health NOT_SERVING -> leave the registry -> drain as on
shutdown (in-flight requests finish, held KV is pulled) -> serve no role while the idle engine takes the
new mode -> register again under the new role -> SERVING. A request that reaches the worker for a
role it no longer serves gets UNAVAILABLE, which routers replay elsewhere; one that cannot drain in
`drain_s` keeps the worker in its old role.
"""

from __future__ import annotations

import asyncio
import dataclasses
import faulthandler
import logging
import os
import signal
import socket
import time
import uuid

import redis.asyncio as aioredis
import torch

from distserve.engine.engine import LLMEngine
from distserve.engine.models import load_model
from distserve.engine.prefix import BlockBloom
from distserve.engine.sampling import SamplingParams
from distserve.engine.step_times import StepPredictor
from distserve.engine.weights import resolve_format
from distserve.engine.worker import EngineWorker
from distserve.errors import ResourceExhausted, Unavailable
from distserve.kv.estimate import PullEstimate
from distserve.metrics import Metrics
from distserve.rpc.server import BuiltServer, build_server
from distserve.rpc.tls import WORKER_CALLERS, PeerRoles
from distserve.runtime import WorkerSettings, host_id, parse_cpus
from distserve.state.connect import connect
from distserve.state.registry import Heartbeat, Registry, WorkerInfo, WorkerLoad

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = (32, 256)  # prompt sizes run at start, besides the warm-up's 4 tokens (capped by the step budget)
CALIBRATION_DECODES = (2, 4, 8)  # decode batch sizes run at start on workers that decode (8-token prompts, 4 tokens each)


def profile_predictor(path: str, threads: int, weights: str) -> StepPredictor:
    """The step model of a planner profile for an engine of `threads` threads and `weights` format (a
    profile with one weight format or thread count serves every setting of it)."""
    from distserve.planner.profile import load_profile  # the planner (and numpy) only when asked for

    prof = load_profile(path)
    formats = prof.weight_formats
    engine = prof.engine(threads=threads if threads in prof.thread_counts else prof.thread_counts[0],
                         weights=weights if weights in formats else (formats[0] if len(formats) == 1 else weights))
    if (engine.threads, engine.weights) != (threads, weights):
        log.warning("step_profile %s has no engine of %d threads and %s weights; using its %d-thread %s model",
                    path, threads, weights, engine.threads, engine.weights)
    model = engine.step

    def predict(decodes: int, context_tokens: int, chunk_tokens: int) -> float:
        return model.step_s([(0, chunk_tokens)] if chunk_tokens else [], decodes, context_tokens)

    return predict


class WorkerRuntime:
    """Owns the engine and the process-level plumbing; services add their servicers to `server`."""

    def __init__(self, settings: WorkerSettings, services: tuple[str, ...]):
        self.settings = settings
        self.services = services
        self.tls = settings.tls()  # None: plaintext
        self.worker_id = settings.worker_id or f"{settings.role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.metrics = Metrics(settings.role)
        self.role: str | None = settings.role  # the role it serves now (None while an elastic worker changes role)
        self.engine: LLMEngine | None = None
        self.worker: EngineWorker | None = None
        self.built: BuiltServer | None = None
        self.redis: aioredis.Redis | None = None
        self.heartbeat: Heartbeat | None = None
        self.draining = False
        self._inflight = 0
        self._inflight_fell = asyncio.Event()  # set each time an RPC ends (drain waits on it)
        self.metrics_port: int | None = None  # bound Prometheus port, None when off
        self.kv_pulls = PullEstimate()  # a decode worker's recent KV pulls (published for routers' transfer estimates)
        self.stop_event = asyncio.Event()
        self.prefix_version = 0  # version of the prefix filter last handed to the heartbeat
        self.metrics.watch_engine(lambda: (self.role, self.worker.stats, self.worker.threads or torch.get_num_threads())
                                  if self.worker is not None and self.role else None)
        self._prefix_call: asyncio.Future | None = None  # the engine's prefix hashes, asked for and not yet taken

    # -- start -------------------------------------------------------------------------------
    def pin(self) -> None:
        """This process's cores and torch threads (on the main thread: affinity is per thread, and the
        engine thread inherits it)."""
        s = self.settings
        if s.cpus:
            os.sched_setaffinity(0, parse_cpus(s.cpus))
        if s.threads:
            torch.set_num_threads(s.threads)

    def load(self) -> None:
        # a native crash (a kernel, torch, a mapped weight written to) ends the process with no Python
        # error; this leaves every thread's Python stack in the worker's log first
        faulthandler.enable()
        s = self.settings
        # without the transformers model's weights: the runner reads its weight file (or loads them itself)
        lm = load_model(s.model, device=s.device, dtype=s.dtype, seed=s.seed, weights=False)
        mode = "prefill" if s.role == "prefill" else "decode"
        predictor = None
        if s.step_profile:
            try:
                predictor = profile_predictor(s.step_profile, s.threads or torch.get_num_threads(), resolve_format(s.weights, lm))
            except (OSError, ValueError, KeyError) as exc:
                raise SystemExit(f"step_profile {s.step_profile!r} cannot be used: {exc}") from None
        self.engine = LLMEngine(lm, s.engine_config(mode), step_predictor=predictor)
        self.worker = EngineWorker(self.engine, threads=s.threads or None)
        log.info("%s loaded %s: %d KV blocks of %d tokens", self.worker_id, s.model, self.engine.blocks.num_blocks, s.block_size)

    async def warm_up(self) -> None:
        """One tiny request through the engine, so the first real one pays no lazy start-up; then
        prompts of a few sizes, so the step-time fit starts with points of several sizes. The sizes run
        twice and the first pass is forgotten: the first step of each shape pays one-time costs (kernel
        and GEMM set-up, first touches of mapped weights) that would skew the fit."""
        e = self.engine
        # every size must fit this worker: its step budget, its model length, and its KV cache (a small
        # cache, e.g. --num-blocks 12 in tests, holds fewer tokens than the largest calibration prompt)
        room = e.blocks.num_blocks * e.config.block_size - e.config.block_size
        sizes = [4] + sorted({min(n, e.config.max_num_batched_tokens, e.max_model_len - 2, room) for n in CALIBRATION_TOKENS})
        # decode batches of a few sizes (decode and colocated workers): with one decode step of one
        # sequence the fit cannot tell a step's fixed cost from a decode's, and the start-up fit of
        # 2026-12-03 put 9.6 ms on each decode (the profile: ~3), so a chunked worker's TPOT cap left
        # its prompts a block per step and their TTFT doubled
        batches = [] if self.role == "prefill" else sorted({min(b, e.config.max_num_seqs, room // 16) for b in CALIBRATION_DECODES} - {0, 1})
        for rep in range(2):
            if rep:
                await self.worker.call(lambda eng: eng.step_times.reset())  # on the engine thread, which reads the fit
            for i, n in enumerate(sizes):
                if n >= 4:
                    # each prompt its own first token: none finds another's blocks in the prefix cache,
                    # so every calibration step computes the tokens it is timed for
                    await self._run_once(f"warm-up-{rep}-{n}", n, 2 if n == 4 else 1, salt=len(sizes) * rep + i)
            for b in batches:
                await asyncio.gather(*(self._run_once(f"warm-up-{rep}-d{b}-{i}", 8, 4, salt=100 + 10 * rep + i) for i in range(b)))
        fit = e.step_times.fit
        if fit is not None:
            log.info("step times: %.2f ms + %.3f ms per prompt token + %.3f ms per decode", 1e3 * fit.fixed_s, 1e3 * fit.token_s, 1e3 * fit.decode_s)

    async def _run_once(self, rid: str, tokens: int, max_tokens: int, salt: int = 0) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        prompt = [1 + (i + 13 * salt) % 100 for i in range(tokens)]
        stream = await self.worker.generate(rid, prompt, params)
        async for out in stream:
            if out.held:
                await self.worker.abort(rid)

    async def start(self) -> None:
        s = self.settings
        # the server answers first, health NOT_SERVING, while the model loads (its native kernels may
        # compile: a first start without builds) and warms up; the role's servicers are added after
        # (`built.handlers`), and until then its calls get UNAVAILABLE. With TLS, callers need a
        # certificate of the CA, and each service admits only its callers' roles
        self.built = await build_server(self.services, host=s.host, port=s.port, tls=self.tls, late=True,
                                        interceptors=[PeerRoles(WORKER_CALLERS)] if self.tls else ())
        await self.built.server.start()
        log.info("%s starting on %s: loading %s", self.worker_id, self.advertise(), s.model)
        started = False
        try:
            self.pin()
            await asyncio.to_thread(self.load)  # off the event loop, which answers health meanwhile
            self.worker.start()
            started = True
            await self.warm_up()
        except BaseException:
            await self.built.server.stop(None)
            if started:
                self.worker.stop()
            raise
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.metrics_port, host=s.host)
        self.metrics.set_info(s.model, self.worker_id)
        self.redis = connect(s.redis_url, role=s.role, max_connections=s.redis_max_connections, timeout_s=s.redis_timeout_s)
        self.registry = Registry(self.redis)

    def advertise(self) -> str:
        s = self.settings
        host = s.advertise_host or (socket.gethostname() if s.host in ("0.0.0.0", "::") else s.host)
        return f"{host}:{self.built.port}"

    def info(self, transports: tuple[str, ...]) -> WorkerInfo:
        e = self.engine
        return WorkerInfo(
            worker_id=self.worker_id,
            role=self.role,
            address=self.advertise(),
            kv_address=self.advertise(),
            model=self.settings.model,
            host_id=host_id(),
            transports=transports,
            total_blocks=e.blocks.num_blocks,
            block_size=e.config.block_size,
            max_model_len=e.max_model_len,
            started_at=time.time(),
            prefix_root=f"{e.prefix_root:016x}" if e.config.prefix_caching else "",
            elastic=self.settings.elastic,
        )

    def load_now(self) -> WorkerLoad:
        st = self.worker.stats
        self.metrics.observe_engine(st, self.inflight, self.draining)
        return WorkerLoad(
            queued_requests=st.queued_requests,
            queued_tokens=self.worker.queued_tokens,
            running_requests=st.running_requests,
            open_requests=self.inflight,
            free_blocks=st.free_blocks,
            total_blocks=st.total_blocks,
            held_requests=st.held_requests,
            draining=self.draining,
            updated_at=time.time(),  # when sampled, not when published: routers forget their sends by it
            step_fixed_s=st.step_fixed_s,
            step_token_s=st.step_token_s,
            step_decode_s=st.step_decode_s,
            max_step_tokens=st.max_step_tokens,
            step_elapsed_s=self.worker.step_elapsed_s(),
            step_period_s=self.worker.step_period_s,
            prefill_budget_tokens=st.prefill_budget_tokens,
            kv_bytes_per_s=self.kv_pulls.bytes_per_s,
            kv_bytes_per_token=self.kv_pulls.bytes_per_token,
            prefix_version=self.prefix_version,
            prefix_blocks=st.prefix_cached_blocks,
        )

    async def prefix_fields(self, force: bool) -> dict[str, bytes]:
        """The heartbeat's extra entry field: the Bloom filter of the cached block hashes, rebuilt only
        when the cache changed since the last one (or `force`: the entry was lost); {} otherwise.

        The hashes are read on the engine thread, between steps, and a step can outlast the entry's TTL
        (a 2048-token prefill step on one core takes seconds): the heartbeat waits for them only
        half an interval and otherwise publishes the load alone, taking the filter at a later tick.
        Waiting longer let a busy prefill worker's entry expire, and routers refused requests with
        'no prefill worker is available' while it computed (56 of 96 in a saturated 1P+1D chat run)."""
        e = self.engine
        if not e.config.prefix_caching:
            return {}
        if self._prefix_call is None:
            if not force and self.worker.stats.prefix_version + 1 == self.prefix_version:
                return {}
            self._prefix_call = asyncio.ensure_future(self.worker.call(lambda eng: eng.prefix_hashes()))
        done, _ = await asyncio.wait({self._prefix_call}, timeout=self.settings.heartbeat_s / 2)
        if not done:
            return {}
        call, self._prefix_call = self._prefix_call, None
        version, hashes = call.result()
        bloom = BlockBloom.build(hashes, capacity=e.blocks.num_blocks)
        self.prefix_version = version + 1  # 0 means "none published"
        return {"prefix": bloom.bits}

    async def serve(self, transports: tuple[str, ...] = ("grpc",)) -> None:
        """Registers and serves (health SERVING); returns when a stop signal arrives and shutdown is done."""
        self.heartbeat = Heartbeat(self.registry, self.info(transports), self.load_now, interval_s=self.settings.heartbeat_s, ttl_s=self.settings.ttl_s,
                                   extra_fn=self.prefix_fields)
        await self.heartbeat.start()
        await self.built.health.set_serving()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        log.info("%s serving on %s (role %s, metrics port %s)", self.worker_id, self.advertise(), self.settings.role, self.metrics_port)
        print(f"READY {self.settings.role} {self.advertise()} metrics={self.metrics_port or ''}", flush=True)
        await self.stop_event.wait()
        await self.shutdown()

    def serving(self, *roles: str) -> None:
        """Raises Unavailable unless the worker serves one of `roles` now (an elastic worker changed role,
        or is changing it): the router replays the request on another worker."""
        if self.role not in roles:
            raise Unavailable(f"{self.worker_id} serves {self.role or 'no role while it changes role'}, not {' or '.join(roles)}")

    async def change_role(self, role: str, transports: tuple[str, ...]) -> bool:
        """Drains this role's work and registers again as `role`, advertising `transports`. Returns
        False (and serves its old role on) when the work did not drain within `drain_s`."""
        old, s = self.role, self.settings
        log.info("%s: changing role from %s to %s: draining", self.worker_id, old, role)
        self.draining = True
        await self.built.health.set_not_serving()
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=True)
        changed = False
        deadline = time.monotonic() + s.drain_s
        if await self.drain(deadline):
            self.role = None  # what still arrives is refused (and replayed elsewhere) from here on
            cfg = dataclasses.replace(s, role=role).engine_config("prefill" if role == "prefill" else "decode")
            while not changed:
                try:
                    await self.worker.call(lambda e: e.reconfigure(cfg))
                    changed = True
                except ResourceExhausted:  # a request taken in the last moment of the old role: let it finish
                    if not await self.drain(deadline):
                        break
        self.role = role if changed else old
        if not changed:
            log.warning("%s: work did not drain in %.0fs; staying %s", self.worker_id, s.drain_s, old)
        self.draining = False
        self.heartbeat = Heartbeat(self.registry, self.info(transports), self.load_now, interval_s=s.heartbeat_s, ttl_s=s.ttl_s,
                                   extra_fn=self.prefix_fields)
        await self.heartbeat.start()
        await self.built.health.set_serving()
        log.info("%s serving as %s", self.worker_id, self.role)
        return changed

    @property
    def inflight(self) -> int:
        """RPCs being served now (the servicers count them in and out)."""
        return self._inflight

    @inflight.setter
    def inflight(self, n: int) -> None:
        if n < self._inflight:
            self._inflight_fell.set()
        self._inflight = n

    async def drain(self, deadline: float) -> bool:
        """Waits `leave_s` (routers with an older view may still send), then until nothing is in flight
        or held, at most until `deadline`; True when idle. Woken when an RPC ends or the engine frees
        blocks or held KV (EngineWorker.wait_for_room), not by a timer."""
        await asyncio.sleep(max(0.0, min(time.monotonic() + self.settings.leave_s, deadline) - time.monotonic()))
        while self.busy() and (left := deadline - time.monotonic()) > 0:
            self._inflight_fell.clear()
            seen = self.worker.room_version
            if not self.busy():  # ended between the check and the read
                break
            waits = {asyncio.ensure_future(self.worker.wait_for_room(seen, left)), asyncio.ensure_future(self._inflight_fell.wait())}
            try:
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return not self.busy()

    async def shutdown(self) -> None:
        log.info("%s draining", self.worker_id)
        self.draining = True
        await self.built.health.enter_graceful_shutdown()
        if self.heartbeat is not None:
            await self.heartbeat.stop(deregister=True)
        self.metrics.draining.labels(self.settings.role).set(1)
        if not await self.drain(time.monotonic() + self.settings.drain_s):
            log.warning("%s: drain period over with %d requests in flight and %d KV held; ending them",
                        self.worker_id, self.inflight, self.worker.stats.held_requests)
        await self.built.server.stop(grace=1.0)
        self.on_stop()
        self.worker.stop()
        await self.redis.aclose()
        log.info("%s stopped", self.worker_id)

    def busy(self) -> bool:
        """Requests being served, or prefilled KV still waiting for a decode worker to pull it."""
        return self.inflight > 0 or self.worker.stats.held_requests > 0

    def on_stop(self) -> None:
        """Hook for services (the prefill worker releases its held KV here)."""
