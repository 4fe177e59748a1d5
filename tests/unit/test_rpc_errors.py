"""The domain error <-> gRPC status table, both ways (no servers)."""

from __future__ import annotations

import logging

import grpc
import pytest

from distserve.errors import (
    Cancelled,
    DeadlineExceeded,
    DistserveError,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from distserve.rpc.errors import error_from_rpc, status_for

pytestmark = pytest.mark.timeout(60)

CASES = [
    (InvalidRequest("top_p", "must be in (0, 1], got 2.0"), grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound("no KV lease for request r1"), grpc.StatusCode.NOT_FOUND),
    (ResourceExhausted("KV cache full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable("peer went away"), grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded("deadline passed"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled("client cancelled"), grpc.StatusCode.CANCELLED),
]


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize("exc, code", CASES, ids=lambda x: type(x).__name__ if isinstance(x, Exception) else x.name)
def test_domain_error_maps_to_code_and_back(exc: DistserveError, code: grpc.StatusCode) -> None:
    got_code, message = status_for(exc)
    assert got_code == code
    assert message == str(exc)
    back = error_from_rpc(_rpc_error(got_code, message))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.grpc_code == code  # type: ignore[attr-defined]


def test_invalid_request_keeps_its_field() -> None:
    back = error_from_rpc(_rpc_error(*status_for(InvalidRequest("max_tokens", "must be at least 1"))))
    assert isinstance(back, InvalidRequest)
    assert back.field == "max_tokens"
    assert str(back) == "max_tokens: must be at least 1"
    bare = error_from_rpc(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "no field here"))
    assert isinstance(bare, InvalidRequest) and str(bare) == "no field here"


def test_subclass_uses_its_base_code() -> None:
    class KvFull(ResourceExhausted):
        pass

    assert status_for(KvFull("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unexpected_error_is_internal_with_traceback_logged_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise KeyError("secret-internal-detail")
    except KeyError as exc:
        with caplog.at_level(logging.ERROR, logger="distserve.rpc.errors"):
            code, message = status_for(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert "secret-internal-detail" not in message
    ref = message.split("ref ")[1].rstrip(")")
    record = next(r for r in caplog.records if ref in r.getMessage())
    assert record.exc_info is not None and "secret-internal-detail" in caplog.text


def test_plain_base_error_is_internal() -> None:
    assert status_for(DistserveError("oops"))[0] == grpc.StatusCode.INTERNAL


def test_other_codes_pass_through_a_router() -> None:
    err = error_from_rpc(_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "not warm"))
    assert type(err) is DistserveError
    assert err.grpc_code == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "not warm" in str(err)
    # Re-raised by a router, the peer's code goes out unchanged.
    assert status_for(err)[0] == grpc.StatusCode.FAILED_PRECONDITION
    internal = error_from_rpc(_rpc_error(grpc.StatusCode.INTERNAL, "internal error (ref abcd)"))
    assert status_for(internal) == (grpc.StatusCode.INTERNAL, "INTERNAL: internal error (ref abcd)")


def test_raw_rpc_error_in_a_servicer_keeps_its_code() -> None:
    assert status_for(_rpc_error(grpc.StatusCode.UNAVAILABLE, "connect failed")) == (
        grpc.StatusCode.UNAVAILABLE,
        "connect failed",
    )
