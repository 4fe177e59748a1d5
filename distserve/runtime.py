"""What every model worker (prefill, decode, colocated) shares: settings, engine thread, gRPC
server, registry heartbeat, metrics, and shutdown in order.

Start: load the model -> start the engine thread -> warm it with one request and calibrate its step
times with a few prompts of other sizes (so the step-time fit it publishes has points) -> bind the gRPC server
(health NOT_SERVING) -> register in Redis and start the heartbeat -> health SERVING.
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
import logging
import os
import re
import signal
import socket
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
import torch

from distserve.config import setting
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.errors import ResourceExhausted, Unavailable
from distserve.engine.models import load_model
from distserve.engine.sampling import SamplingParams
from distserve.engine.step_times import StepPredictor
from distserve.engine.weights import resolve_format
from distserve.engine.worker import EngineWorker
from distserve.kv.estimate import PullEstimate
from distserve.metrics import Metrics
from distserve.rpc.server import BuiltServer, build_server
from distserve.rpc.tls import WORKER_CALLERS, PeerRoles, TlsSettings
from distserve.state.connect import connect
from distserve.state.registry import Heartbeat, Registry, WorkerInfo, WorkerLoad

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = (32, 256)  # prompt sizes run at start, besides the warm-up's 4 tokens (capped by the step budget)


@dataclass(frozen=True, slots=True)
class WorkerSettings(TlsSettings):
    role: str = setting("decode", "what this worker does", ("prefill", "decode", "colocated"))
    model: str = setting("smollm2-135m", "model name, Hugging Face directory or .gguf path")
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(0, "gRPC port (0 = any free port)")
    advertise_host: str = setting("", "address peers use to reach this worker (default: host, or the hostname when binding 0.0.0.0)")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis holding the registry")
    redis_max_connections: int = setting(4, "Redis connections this worker opens at most (its heartbeat needs one)")
    redis_timeout_s: float = setting(0.5, "a Redis call (connect, reply, wait for a pooled connection) gives up after this long (retried once); the worker serves on and re-registers when Redis is back")
    worker_id: str = setting("", "unique id (default: role-hostname-random)")
    device: str = setting("auto", "auto, cpu or cuda[:N]")
    dtype: str = setting("auto", "weights and KV dtype", ("auto", "float32", "bfloat16", "float16"))
    threads: int = setting(0, "torch threads for the engine (0 = torch's default)")
    cpus: str = setting("", "CPU cores to pin this process to, e.g. 0-1 or 2,3 (empty = no pinning)")
    block_size: int = setting(16, "tokens per KV block")
    kv_cache_bytes: int = setting(1 << 30, "KV cache capacity in bytes")
    num_blocks: int = setting(0, "KV cache capacity in blocks (overrides kv_cache_bytes when > 0)")
    max_num_batched_tokens: int = setting(2048, "token budget of one engine step")
    max_num_seqs: int = setting(64, "most sequences in one engine step")
    chunked_prefill: bool = setting(False, "mix prompt chunks into decode steps (decode/colocated)")
    tpot_slo_ms: float = setting(60.0, "TPOT target of steps that carry prompt chunks (decode, and colocated with --chunked-prefill): a step with running decodes takes only the prompt tokens that keep its predicted time within it; decode workers then prefill the prompts routers send them without KV in such chunks (conditional disaggregation). Leave margin below the SLO you measure against; 0 = no cap, and decode workers prefill whole prompts unless --chunked-prefill")
    step_profile: str = setting("", "planner profile JSON (distserve profile) whose step model for this worker's threads and weights predicts step times for the TPOT cap, instead of the times measured online")
    lease_s: float = setting(30.0, "how long prefilled KV waits for a decode worker before it is freed")
    heartbeat_s: float = setting(0.5, "how often load is published to Redis")
    ttl_s: float = setting(3.0, "registry entry lifetime without a heartbeat")
    metrics_port: int = setting(0, "Prometheus HTTP port (0 = any free port, -1 = off)")
    drain_s: float = setting(30.0, "grace period for in-flight requests (and held KV) on shutdown")
    leave_s: float = setting(0.5, "on shutdown, how long requests routed before the worker left the registry are still accepted")
    seed: int = setting(0, "seed of tiny-llama's weights and of unseeded sampling")
    kv_transport: str = setting("auto", "KV transport: auto = the best both sides offer; a name forces it (a prefill worker then offers only it and grpc)", ("auto", "grpc", "gloo", "nccl", "shm", "mooncake"))
    kv_wire_dtype: str = setting("auto", "KV dtype on the wire when pulling (decode): auto = as cached; float16 or int8 (per-block scales) compress it", ("auto", "float16", "int8"))
    kv_idle_s: float = setting(60.0, "pairwise KV channels (torch.distributed groups, shared-memory segments) idle this long are closed")
    kv_buffer_bytes: int = setting(1 << 30, "warm KV receive buffers kept for reuse (decode), bytes")
    weights: str = setting("auto", "linear-layer weights: fp32 (the --dtype), int8, or auto (int8 on CPU for checkpoints, fp32 on CUDA and for tiny-llama; docs/quantization.md)", ("auto", "fp32", "int8"))
    kv_dtype: str = setting("auto", "KV cache dtype: auto (the --dtype) or int8 with per-block scales (prefill and decode workers must agree)", ("auto", "int8"))
    elastic: bool = setting(False, "prefill or decode worker: serve both roles' services and change role when asked (distserve role set, or the want_role field of its registry entry); it then needs the decode role's certificate and Redis user (docs/conditional-disaggregation.md)")
    speculative: str = setting("none", "speculative decoding on decode and colocated workers: ngram drafts tokens by prompt lookup (matching the last tokens against the prompt and output so far), draft with a draft model (--draft-model); the drafts are verified in one step, and a request's drafts stop when they do not pay (docs/speculative-decoding.md)", ("none", "ngram", "draft"))
    speculative_k: int = setting(5, "most draft tokens per request and step (--speculative)")
    speculative_adaptive: bool = setting(True, "--speculative: choose k per request from its recent acceptance and the step-time fit, drafting nothing where it would not pay; false: verify every draft up to --speculative-k (to measure the drafts' own acceptance)")
    draft_model: str = setting("", "--speculative draft: a smaller model sharing the tokenizer (name, Hugging Face directory or .gguf); empty = a self-draft of the model's first --draft-layers layers and its head")
    draft_layers: int = setting(0, "--speculative draft without --draft-model: layers of the model the self-draft keeps (0 = a quarter)")
    share_weights: str = setting("auto", "map the weights read-only from a file every worker on the host shares: on, off, or auto (on for int8, off for fp32, whose private packed copy is faster)", ("auto", "on", "off"))

    def __post_init__(self):
        rules = (  # (setting, valid?, what it must be); every failure is named at start
            ("port", 0 <= self.port <= 65535, "a TCP port (0 = any)"),
            ("metrics_port", -1 <= self.metrics_port <= 65535, "a TCP port (0 = any, -1 = off)"),
            ("redis_url", self.redis_url.startswith(("redis://", "rediss://", "unix://")), "a redis://, rediss:// or unix:// URL"),
            ("device", re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device), "auto, cpu or cuda[:N]"),
            ("threads", self.threads >= 0, ">= 0"),
            ("cpus", re.fullmatch(r"(\d+(-\d+)?(,\d+(-\d+)?)*)?", self.cpus), "a core list like 0-1 or 2,3"),
            ("block_size", self.block_size >= 1, ">= 1"),
            ("kv_cache_bytes", self.kv_cache_bytes >= 1, ">= 1"),
            ("num_blocks", self.num_blocks >= 0, ">= 0"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, ">= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, ">= 1"),
            ("lease_s", self.lease_s > 0, "> 0"),
            ("heartbeat_s", self.heartbeat_s > 0, "> 0"),
            ("ttl_s", self.ttl_s > self.heartbeat_s, f"more than heartbeat_s ({self.heartbeat_s})"),
            ("redis_max_connections", self.redis_max_connections >= 1, ">= 1"),
            ("redis_timeout_s", self.redis_timeout_s > 0, "> 0"),
            ("drain_s", self.drain_s >= 0, ">= 0"),
            ("leave_s", 0 <= self.leave_s <= self.drain_s, f"between 0 and drain_s ({self.drain_s})"),
            ("kv_idle_s", self.kv_idle_s > 0, "> 0"),
            ("kv_buffer_bytes", self.kv_buffer_bytes >= 0, ">= 0"),
            ("tpot_slo_ms", self.tpot_slo_ms >= 0, ">= 0"),
            ("speculative_k", self.speculative_k >= 1, ">= 1"),
            ("draft_layers", self.draft_layers >= 0, ">= 0"),
        )
        bad = [f"{name} must be {what}, got {getattr(self, name)!r}" for name, ok, what in rules if not ok]
        bad += self.tls_problems()
        if bad:
            raise ValueError("; ".join(bad))

    def engine_config(self, mode: str) -> EngineConfig:
        return EngineConfig(
            mode=mode,
            block_size=self.block_size,
            num_blocks=self.num_blocks or None,
            kv_cache_bytes=self.kv_cache_bytes,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            chunked_prefill=self.chunked_prefill or (self.role == "decode" and self.tpot_slo_ms > 0),
            tpot_target_s=self.tpot_slo_ms / 1000,
            seed=self.seed,
            weights=self.weights,
            kv_dtype=self.kv_dtype,
            share_weights={"on": True, "off": False}.get(self.share_weights, "auto"),
            free_model_weights=True,  # the worker's LoadedModel serves nothing else
            speculative=self.speculative,  # the engine drafts only where it decodes (not in prefill mode)
            speculative_k=self.speculative_k,
            speculative_adaptive=self.speculative_adaptive,
            draft_model=self.draft_model,
            draft_layers=self.draft_layers,
        )


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


def parse_cpus(spec: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, spec.split(",")):
        a, _, b = part.partition("-")
        cpus.update(range(int(a), int(b or a) + 1))
    return cpus


def host_id() -> str:
    """Identity of this host for same-host transports (boot id + hostname)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown"
    return f"{socket.gethostname()}:{boot}"


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
        self.inflight = 0
        self.metrics_port: int | None = None  # bound Prometheus port, None when off
        self.kv_pulls = PullEstimate()  # a decode worker's recent KV pulls (published for routers' transfer estimates)
        self.stop_event = asyncio.Event()

    # -- start -------------------------------------------------------------------------------
    def load(self) -> None:
        s = self.settings
        if s.cpus:
            os.sched_setaffinity(0, parse_cpus(s.cpus))
        if s.threads:
            torch.set_num_threads(s.threads)
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
        for rep in range(2):
            if rep:
                await self.worker.call(lambda eng: eng.step_times.reset())  # on the engine thread, which reads the fit
            for n in sizes:
                if n >= 4:
                    await self._run_once(f"warm-up-{rep}-{n}", n, 2 if n == 4 else 1)
        fit = e.step_times.fit
        if fit is not None:
            log.info("step times: %.2f ms + %.3f ms per prompt token + %.3f ms per decode", 1e3 * fit.fixed_s, 1e3 * fit.token_s, 1e3 * fit.decode_s)

    async def _run_once(self, rid: str, tokens: int, max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        prompt = [1 + i % 100 for i in range(tokens)]
        stream = await self.worker.generate(rid, prompt, params)
        async for out in stream:
            if out.held:
                await self.worker.abort(rid)

    async def start(self) -> None:
        s = self.settings
        self.load()
        self.worker.start()
        await self.warm_up()
        # with TLS, callers need a certificate of the CA, and each service admits only its callers' roles
        self.built = await build_server(self.services, host=s.host, port=s.port, tls=self.tls,
                                        interceptors=[PeerRoles(WORKER_CALLERS)] if self.tls else ())
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
        )

    def load_now(self) -> WorkerLoad:
        st = self.worker.stats
        self.metrics.observe_engine(st, self.inflight, self.draining)
        return WorkerLoad(
            queued_requests=st.queued_requests,
            queued_tokens=st.queued_tokens,
            running_requests=st.running_requests,
            free_blocks=st.free_blocks,
            total_blocks=st.total_blocks,
            held_requests=st.held_requests,
            draining=self.draining,
            step_fixed_s=st.step_fixed_s,
            step_token_s=st.step_token_s,
            step_decode_s=st.step_decode_s,
            max_step_tokens=st.max_step_tokens,
            prefill_budget_tokens=st.prefill_budget_tokens,
            kv_bytes_per_s=self.kv_pulls.bytes_per_s,
            kv_bytes_per_token=self.kv_pulls.bytes_per_token,
        )

    async def serve(self, transports: tuple[str, ...] = ("grpc",)) -> None:
        """Starts serving and registers; returns when a stop signal arrives and shutdown is done."""
        await self.built.server.start()
        self.heartbeat = Heartbeat(self.registry, self.info(transports), self.load_now, interval_s=self.settings.heartbeat_s, ttl_s=self.settings.ttl_s)
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
        self.heartbeat = Heartbeat(self.registry, self.info(transports), self.load_now, interval_s=s.heartbeat_s, ttl_s=s.ttl_s)
        await self.heartbeat.start()
        await self.built.health.set_serving()
        log.info("%s serving as %s", self.worker_id, self.role)
        return changed

    async def drain(self, deadline: float) -> bool:
        """Waits `leave_s` (routers with an older view may still send) and until nothing is in flight or
        held, at most until `deadline`; True when idle."""
        settle = time.monotonic() + self.settings.leave_s
        while (self.busy() or time.monotonic() < settle) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
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
