"""The one table between domain errors and gRPC status codes, used at every service boundary.

Servers: every server `rpc.server.build_server` makes runs the `ErrorTable` interceptor, which
aborts a call whose handler raised with `status_for(exc)`: a `DistserveError` gives its code and
message, a failed call to a peer (`grpc.RpcError`) is passed on with its code, anything else becomes
INTERNAL with the traceback logged under a short reference that the client sees instead of it.
Clients: `error_from_rpc(exc)` turns a failed call back into the domain error, keeping the message,
so a router can re-raise what a worker said.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, NoReturn

import grpc

from distserve.errors import (
    Cancelled,
    DeadlineExceeded,
    DistserveError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

logger = logging.getLogger(__name__)

# Trailing metadata a decode worker sets when the KV it was handed could not be pulled: the KV's holder
# (a prefill worker) or the path to it failed, not the decode worker. Routers replay such requests.
KV_FAULT = ("x-distserve-fault", "kv-pull")
# Trailing metadata of a request refused by admission control: the milliseconds to wait before retrying.
RETRY_AFTER_KEY = "retry-after-ms"

# The table. Order matters only for subclasses of these classes (first match by MRO wins).
STATUS_BY_ERROR: dict[type[DistserveError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
ERROR_BY_STATUS: dict[grpc.StatusCode, type[DistserveError]] = {v: k for k, v in STATUS_BY_ERROR.items()}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) to send for exc. Logs the traceback of anything that is not a domain error."""
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code, str(exc)
    passed_on = getattr(exc, "grpc_code", None)  # set by error_from_rpc: a peer's status, passed on
    if isinstance(exc, DistserveError) and isinstance(passed_on, grpc.StatusCode):
        return passed_on, str(exc)
    if isinstance(exc, grpc.RpcError) and _has_code(exc):
        return _code_of(exc), _details_of(exc)
    ref = secrets.token_hex(4)
    logger.error("internal error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref})"


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """Abort the current RPC with the status for exc (never returns)."""
    code, message = status_for(exc)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover


def error_from_rpc(exc: grpc.RpcError) -> DistserveError:
    """The domain error a failed call stands for; the gRPC code is kept as `.grpc_code`."""
    code = _code_of(exc) if _has_code(exc) else grpc.StatusCode.UNKNOWN
    message = _details_of(exc) if _has_code(exc) else str(exc)
    cls = ERROR_BY_STATUS.get(code, DistserveError)
    if cls is InvalidRequest:
        field, sep, rest = message.partition(": ")
        if sep:
            err: DistserveError = InvalidRequest(field, rest)
        else:
            err = InvalidRequest("", message)
            err.args = (message,)
    elif cls is DistserveError:
        err = DistserveError(f"{code.name}: {message}")
    else:
        err = cls(message)
    err.grpc_code = code  # type: ignore[attr-defined]
    if isinstance(err, ResourceExhausted):
        err.retry_after_s = _retry_after_s(exc)  # type: ignore[attr-defined]
    return err


def _retry_after_s(exc: Any) -> float | None:
    """The server's retry-after hint of a refused call, in seconds (None when it gave none)."""
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:  # not a finished call
        return None
    for key, value in metadata:
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


def _has_code(exc: BaseException) -> bool:
    return callable(getattr(exc, "code", None)) and callable(getattr(exc, "details", None))


def _code_of(exc: Any) -> grpc.StatusCode:
    code = exc.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details_of(exc: Any) -> str:
    return exc.details() or ""
