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

from distserve.tokenization import load_tokenizer
from distserve.metrics import Metrics
from distserve.rpc.channels import ChannelPool
from distserve.rpc.auth import ApiKeyInterceptor, ApiKeys
from distserve.rpc.server import build_server
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
from services.router.settings import RouterSettings

log = logging.getLogger(__name__)

SERVICES = ("distserve.v1.Generation",)


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
