"""`distserve serve router`: the public Generation service, stateless apart from caches.

Start: load the tokenizer -> open Redis (bounded pool, short timeouts) -> bind the gRPC server -> start
it, health SERVING -> register this router in Redis (`RouterHeartbeat`) and start the `Reaper` that
closes, as EXPIRED, the open requests of routers that died. Redis being down at start or later stops
none of this: the heartbeat and the reaper retry, and the picker routes from its last registry read.
Stop (SIGTERM/SIGINT): health NOT_SERVING -> stop accepting and drain for `drain_s` -> stop the reaper
and the heartbeat (removing this router's presence, so another router closes whatever is still open
at once) -> close the picker's health watches, the channels and Redis.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
import uuid
from dataclasses import dataclass

from distserve.config import setting
from distserve.engine.errors import InvalidRequest
from distserve.engine.models import load_tokenizer
from distserve.metrics import Metrics
from distserve.rpc.channels import ChannelPool
from distserve.rpc.auth import ApiKeyInterceptor, ApiKeys
from distserve.rpc.server import build_server
from distserve.rpc.tls import TlsSettings
from distserve.state.connect import connect
from distserve.state.registry import Registry
from distserve.state.requests import RequestStateStore
from distserve.state.routers import Reaper, RouterHeartbeat, RouterInfo
from distserve.v1 import generation_pb2_grpc
from services.router.admission import Admission
from services.router.disagg import DisaggPolicy
from services.router.ejection import OutlierEjector
from services.router.picker import WorkerPicker
from services.router.run import LegPolicy
from services.router.generation import Generation, InputLimits
from services.router.servicer import GenerationServicer

log = logging.getLogger(__name__)

SERVICES = ("distserve.v1.Generation",)


@dataclass(frozen=True, slots=True)
class RouterSettings(TlsSettings):
    model: str = setting("smollm2-135m", "model served (its tokenizer is loaded here)")
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(50051, "gRPC port of the public API (0 = any free port)")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis holding the registry and request state")
    redis_max_connections: int = setting(64, "Redis connections this router opens at most; a call that finds them all busy waits up to redis_timeout_s")
    redis_timeout_s: float = setting(0.5, "a Redis call (connect, reply, wait for a pooled connection) gives up after this long (retried once); the router then routes from its last registry read")
    refresh_s: float = setting(0.2, "longest time between two reads of the worker registry")
    prefill_timeout_s: float = setting(120.0, "deadline of one prefill call")
    migration_limit: int = setting(3, "replays of one request on other workers after a leg fails (0 = fail at once)")
    stall_timeout_s: float = setting(20.0, "a decode leg that sends nothing for this long is given up and its request replayed elsewhere")
    eject_after: int = setting(3, "failures in a row after which a worker is left out of routing for a cool-down")
    eject_s: float = setting(10.0, "first cool-down of an ejected worker (doubles while it keeps failing, up to 12x)")
    state_ttl_s: float = setting(3600.0, "how long request state stays in Redis")
    heartbeat_s: float = setting(2.0, "how often this router renews its presence in Redis")
    router_ttl_s: float = setting(10.0, "this router's presence lifetime without a heartbeat; after it, other routers close its open requests as EXPIRED")
    reap_s: float = setting(5.0, "how often this router looks for dead routers' open requests to close")
    metrics_port: int = setting(0, "Prometheus HTTP port (0 = any free port, -1 = off)")
    api_keys_file: str = setting("", "file of API keys clients must send (authorization: Bearer <key>), one a line or sha256:<hex>; empty and no api_keys = no authentication")
    api_keys: str = setting("", "API keys, comma-separated (prefer DISTSERVE_API_KEYS or the file: flags show in ps)")
    http_port: int = setting(-1, "OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, /v1/models; 0 = any free port, -1 = off)")
    drain_s: float = setting(30.0, "grace period for in-flight requests on shutdown")
    max_inflight: int = setting(512, "requests this router serves at once; more are refused at once with RESOURCE_EXHAUSTED and a retry-after-ms hint")
    max_queued_tokens: int = setting(262144, "prompt tokens of admitted requests not yet prefilled; a request that would pass it is refused like one past max_inflight")
    retry_after_ms: int = setting(500, "retry-after-ms hint sent with a refusal")
    max_prompt_bytes: int = setting(1 << 20, "largest text prompt in UTF-8 bytes, checked before tokenizing (INVALID_ARGUMENT beyond)")
    max_prompt_tokens: int = setting(1 << 17, "largest token-id prompt (and resumed tokens), checked before anything else reads them")
    disagg_mode: str = setting("remote", "where prompts are prefilled: remote = the prefill pool, then the KV moves to a decode worker; local = on the decode worker itself (no KV transfer); conditional = per request, local when the prompt is short and the decode worker is expected to give its first token sooner than the prefill pool by disagg_margin_s (docs/conditional-disaggregation.md)", ("conditional", "remote", "local"))
    local_max_prompt_tokens: int = setting(512, "conditional: prompts longer than this always prefill on the prefill pool")
    disagg_margin_s: float = setting(0.2, "conditional: how much sooner (seconds) a local prefill must be expected to give the first token than the prefill pool (queue, compute and KV transfer) to be chosen")
    routing: str = setting("kv", "how a prefill worker is chosen: kv = the fewest tokens to compute before the prompt's first token (its queue plus the part of the prompt it has not cached, from the prefix caches workers publish); load = the least queued tokens, caches ignored (docs/prefix-caching.md)", ("kv", "load"))
    tls_client_certs: bool = setting(False, "with TLS: clients of the public APIs must also present a certificate from tls_ca (mutual TLS), besides any API key")

    def __post_init__(self):
        rules = (  # (setting, valid?, what it must be); every failure is named at start
            ("port", 0 <= self.port <= 65535, "a TCP port (0 = any)"),
            ("metrics_port", -1 <= self.metrics_port <= 65535, "a TCP port (0 = any, -1 = off)"),
            ("http_port", -1 <= self.http_port <= 65535, "a TCP port (0 = any, -1 = off)"),
            ("redis_url", self.redis_url.startswith(("redis://", "rediss://", "unix://")), "a redis://, rediss:// or unix:// URL"),
            ("refresh_s", self.refresh_s > 0, "> 0"),
            ("prefill_timeout_s", self.prefill_timeout_s > 0, "> 0"),
            ("migration_limit", self.migration_limit >= 0, ">= 0"),
            ("stall_timeout_s", self.stall_timeout_s > 0, "> 0"),
            ("eject_after", self.eject_after >= 1, ">= 1"),
            ("eject_s", self.eject_s > 0, "> 0"),
            ("state_ttl_s", self.state_ttl_s > 0, "> 0"),
            ("redis_max_connections", self.redis_max_connections >= 1, ">= 1"),
            ("redis_timeout_s", self.redis_timeout_s > 0, "> 0"),
            ("heartbeat_s", self.heartbeat_s > 0, "> 0"),
            ("router_ttl_s", self.router_ttl_s > self.heartbeat_s, f"more than heartbeat_s ({self.heartbeat_s})"),
            ("reap_s", self.reap_s > 0, "> 0"),
            ("drain_s", self.drain_s >= 0, ">= 0"),
            ("max_inflight", self.max_inflight >= 1, ">= 1"),
            ("max_queued_tokens", self.max_queued_tokens >= 1, ">= 1"),
            ("retry_after_ms", self.retry_after_ms >= 0, ">= 0"),
            ("max_prompt_bytes", self.max_prompt_bytes >= 1, ">= 1"),
            ("max_prompt_tokens", self.max_prompt_tokens >= 1, ">= 1"),
            ("local_max_prompt_tokens", self.local_max_prompt_tokens >= 0, ">= 0"),
            ("disagg_margin_s", self.disagg_margin_s >= 0, ">= 0"),
        )
        bad = [f"{name} must be {what}, got {getattr(self, name)!r}" for name, ok, what in rules if not ok]
        bad += self.tls_problems()
        if self.tls_client_certs and not self.tls_cert:
            bad.append("tls_client_certs needs TLS (tls_ca, tls_cert, tls_key)")
        try:
            ApiKeys.load(self.api_keys_file, self.api_keys)
        except InvalidRequest as exc:
            bad.append(str(exc))
        if bad:
            raise ValueError("; ".join(bad))


async def run(settings: RouterSettings) -> None:
    tokenizer = await asyncio.to_thread(load_tokenizer, settings.model)
    r = connect(settings.redis_url, role="router", max_connections=settings.redis_max_connections, timeout_s=settings.redis_timeout_s)
    metrics = Metrics("router")
    tls = settings.tls()
    pool = ChannelPool(tls=tls)
    picker = WorkerPicker(Registry(r), settings.model, settings.refresh_s, pool=pool, metrics=metrics,
                          ejector=OutlierEjector(settings.eject_after, settings.eject_s, settings.eject_s * 12),
                          routing=settings.routing)
    keys = ApiKeys.load(settings.api_keys_file, settings.api_keys)
    built = await build_server(SERVICES, host=settings.host, port=settings.port, interceptors=[ApiKeyInterceptor(keys, SERVICES)],
                                tls=tls, require_client_auth=settings.tls_client_certs)
    # unique per process: a router restarted on the same port must not revive its predecessor's presence
    router_id = f"router-{socket.gethostname()}-{built.port}-{uuid.uuid4().hex[:6]}"
    states = RequestStateStore(r, ttl_s=settings.state_ttl_s, router_id=router_id)
    policy = LegPolicy(settings.prefill_timeout_s, settings.stall_timeout_s, settings.migration_limit)
    admission = Admission(settings.max_inflight, settings.max_queued_tokens, settings.retry_after_ms)
    limits = InputLimits(settings.max_prompt_bytes, settings.max_prompt_tokens)
    disagg = DisaggPolicy(settings.disagg_mode, settings.local_max_prompt_tokens, settings.disagg_margin_s)
    generation = Generation(tokenizer, settings.model, picker, states, pool, metrics, policy, admission, limits, disagg)
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(generation), built.server)
    metrics_port = metrics.serve(settings.metrics_port, host=settings.host) if settings.metrics_port >= 0 else None
    metrics.set_info(settings.model, router_id)
    await built.server.start()
    http = None
    if settings.http_port >= 0:  # the OpenAI API, on this loop, over the same request path
        from services.router.http import HttpServer, build_app  # FastAPI is imported only when it serves

        http = HttpServer(build_app(generation, metrics, settings.model, keys), settings.host, settings.http_port,
                          tls=settings if tls else None, client_certs=settings.tls_client_certs)
        await http.start()
    await built.health.set_serving()
    presence = RouterHeartbeat(r, RouterInfo(router_id, built.address, time.time()), interval_s=settings.heartbeat_s, ttl_s=settings.router_ttl_s)
    await presence.start()
    reaper = Reaper(r, interval_s=settings.reap_s, state_ttl_s=settings.state_ttl_s, on_reaped=lambda orphans: metrics.expired.inc(len(orphans)))
    reaper.start()
    picker.start_refresher(max(1.0, settings.refresh_s))  # pool gauges stay live while no request comes
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("router serving %s on %s (%s; prefill %s; metrics port %s, HTTP %s, %s)", settings.model, built.address,
             "TLS" if tls else "plaintext", settings.disagg_mode, metrics_port, http.url if http else "off", f"{len(keys)} API keys" if keys.enabled else "no API keys: open to every caller")
    print(f"READY router {built.address} metrics={metrics_port or ''}" + (f" http={http.port}" if http else ""), flush=True)
    await stop.wait()
    log.info("router draining")
    metrics.draining.labels("router").set(1)
    await built.health.enter_graceful_shutdown()
    if http is not None:  # both APIs stop accepting and drain together
        await asyncio.gather(built.server.stop(grace=settings.drain_s), http.stop(settings.drain_s))
    else:
        await built.server.stop(grace=settings.drain_s)
    await reaper.stop()
    await presence.stop(leave=True)
    await picker.close()
    await pool.close_all()
    await r.aclose()
