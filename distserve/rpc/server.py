"""Building a grpc.aio server the way every distserve service runs one.

Lifecycle: `build_server(...)` binds host:port (port 0 picks one) and adds the stock health servicer
(every listed service and the overall "" start NOT_SERVING) and reflection. The caller adds its own
servicers, `await server.start()`, and calls `await health.set_serving()` once the model is warm.
On shutdown: `await health.enter_graceful_shutdown()` (NOT_SERVING for good), then
`await server.stop(grace)`.
A worker starts its server before it loads the model (`late=True`), so that health answers NOT_SERVING
while the model loads and its kernels build: its servicers go into `BuiltServer.handlers` (a
`LateServices`, one handler gRPC knows from the start), and a call to a listed service that has none
yet gets UNAVAILABLE. gRPC itself takes handlers only before the server starts.

Every server also runs `MalformedRequests`: a request whose bytes do not parse as its message
(truncated or garbage protobuf, invalid UTF-8 in a string field) gets INVALID_ARGUMENT naming the
request, where gRPC itself would answer UNKNOWN before any handler runs; and `ErrorTable`: whatever a
handler raises becomes the status of the error table (`rpc.errors.status_for`) at this one place, for
every method of every servicer on the server (unary or streaming), so no method can miss it.

With `tls` (rpc.tls) the port is TLS, and callers must present a certificate from the CA unless
`require_client_auth` is off (the router's public port, whose callers hold API keys instead).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from distserve.rpc.channels import KEEPALIVE_TIME_MS, MAX_MESSAGE_BYTES
from distserve.rpc.handlers import before_handler, with_error_table

if TYPE_CHECKING:
    from distserve.rpc.tls import Tls

logger = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Health:
    """The health statuses of one server: "" (overall) and each named service move together."""

    def __init__(self, servicer: grpc_health.aio.HealthServicer, service_names: Sequence[str]):
        self.servicer = servicer  # the stock grpc.health.v1 servicer
        self.service_names = ("", *service_names)  # "" = the whole server
        self.serving = False

    async def _set_all(self, status: int) -> None:
        for name in self.service_names:
            await self.servicer.set(name, status)

    async def set_serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        self.serving = True

    async def set_not_serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.serving = False

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for good: later set_serving calls are ignored."""
        await self.servicer.enter_graceful_shutdown()
        self.serving = False


class LateServices(grpc.GenericRpcHandler):
    """Servicers added after the server started. It takes the two calls a generated
    `add_XServicer_to_server(servicer, server)` makes, so it stands in for the server there."""

    def __init__(self, service_names: Sequence[str]):
        self.service_names = frozenset(service_names)
        self.methods: dict[str, grpc.RpcMethodHandler] = {}  # "/package.Service/Method" -> handler
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.methods.update({f"/{service}/{name}": h for name, h in handlers.items()})

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if (handler := self.methods.get(details.method)) is not None:
            return handler
        for g in self.generic:
            if (handler := g.service(details)) is not None:
                return handler
        parts = details.method.split("/")  # "", "package.Service", "Method"
        if len(parts) == 3 and parts[1] in self.service_names:
            return grpc.unary_unary_rpc_method_handler(_starting)  # aborts before reading or answering
        return None


async def _starting(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, "this worker is still starting (loading its model); its health says NOT_SERVING")


@dataclass(slots=True)
class BuiltServer:
    server: grpc.aio.Server  # not started yet
    port: int  # the bound port (the chosen one when 0 was asked)
    address: str  # host:port as peers should dial it
    health: Health
    late: LateServices | None = None  # with build_server(late=True): where servicers go, before or after start

    @property
    def handlers(self) -> grpc.aio.Server | LateServices:
        """What to pass to `add_XServicer_to_server`."""
        return self.late if self.late is not None else self.server


class _Malformed:
    """What the wrapped deserializer returns for bytes that do not parse: the handler then aborts."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


async def _abort_malformed(context: grpc.aio.ServicerContext, request: _Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request: not a valid protobuf message ({type(request.error).__name__}: {request.error})")


class ErrorTable(grpc.aio.ServerInterceptor):
    """The error table (distserve.rpc.errors) at the boundary of every method the server serves."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return None if handler is None else with_error_table(handler)


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Turns a request that fails to deserialize into INVALID_ARGUMENT (unary-request methods; the
    stream-request ones are left as gRPC makes them)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # DecodeError, invalid UTF-8, anything the message rejects
                return _Malformed(exc)

        async def check(request, context) -> None:
            if isinstance(request, _Malformed):
                await _abort_malformed(context, request)

        return before_handler(handler._replace(request_deserializer=deserialize), check)


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Accept the keepalive pings that rpc.channels clients send (every KEEPALIVE_TIME_MS, even when idle).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS - 1_000),
        ("grpc.so_reuseport", 0),
    ]


async def build_server(
    service_names: Sequence[str],  # full names, e.g. "distserve.v1.KvTransfer"
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    extra_options: Sequence[tuple[str, Any]] = (),
    tls: "Tls | None" = None,
    require_client_auth: bool = True,
    late: bool = False,
) -> BuiltServer:
    """A bound, not yet started grpc.aio server with health (all NOT_SERVING) and reflection; with
    `late`, servicers go into `handlers` and may be added after it starts."""
    server = grpc.aio.server(
        interceptors=[MalformedRequests(), ErrorTable(), *interceptors], options=[*server_options(max_message_bytes), *extra_options]
    )
    servicer = grpc_health.aio.HealthServicer()
    health = Health(servicer, service_names)
    await health.set_not_serving()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    late_services = LateServices(service_names) if late else None
    if late_services is not None:
        server.add_generic_rpc_handlers((late_services,))
    reflection.enable_server_reflection(
        (*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    bind_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if tls is None:
        bound = server.add_insecure_port(f"{bind_host}:{port}")
    else:
        bound = server.add_secure_port(f"{bind_host}:{port}", tls.server_credentials(require_client_auth))
    if bound == 0:
        raise OSError(f"could not bind gRPC server to {bind_host}:{port}")
    dial_host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(bind_host, bind_host)
    logger.info("gRPC server for %s bound to %s:%d (%s)", ", ".join(service_names), bind_host, bound,
                "plaintext" if tls is None else "mutual TLS" if require_client_auth else "TLS")
    return BuiltServer(server=server, port=bound, address=f"{dial_host}:{bound}", health=health, late=late_services)
