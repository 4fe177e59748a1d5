"""The HTTP API's one table from domain errors to OpenAI error responses."""

from __future__ import annotations

import json

import pytest

from distserve.errors import DeadlineExceeded, DistserveError, InvalidRequest, ResourceExhausted, Unavailable
from services.router.admission import Shed
from services.router.http import UnknownModel, error_response


@pytest.mark.parametrize("exc, status, kind, param", [
    (InvalidRequest("temperature", "must be >= 0"), 400, "invalid_request_error", "temperature"),
    (UnknownModel("model 'x' is not served here"), 404, "not_found_error", "model"),
    (Shed("100 requests in flight", retry_after_ms=1500), 429, "rate_limit_exceeded", None),
    (ResourceExhausted("KV cache full"), 429, "rate_limit_exceeded", None),
    (Unavailable("no decode worker is available"), 503, "service_unavailable", None),
    (DeadlineExceeded("deadline passed"), 504, "timeout", None),
])
def test_domain_errors_get_openais_shape_and_status(exc, status, kind, param):
    resp = error_response(exc)
    body = json.loads(resp.body)["error"]
    assert resp.status_code == status
    assert (body["type"], body["param"], body["code"]) == (kind, param, status)
    assert body["message"] == str(exc)


def test_a_shed_request_says_when_to_retry():
    resp = error_response(Shed("busy", retry_after_ms=1500))
    assert resp.headers["retry-after"] == "2"  # whole seconds, rounded up


def test_anything_else_is_500_with_a_reference_not_the_detail():
    resp = error_response(ZeroDivisionError("secret detail"))
    body = json.loads(resp.body)["error"]
    assert resp.status_code == 500 and "secret" not in body["message"] and "ref" in body["message"]
    passed_on = DistserveError("UNKNOWN: worker said no")
    passed_on.grpc_code = object()
    assert error_response(passed_on).status_code == 502
