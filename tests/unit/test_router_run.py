"""The router's per-request record: what a replayed leg asks of a worker, and which failures replay."""

from __future__ import annotations

import time

import grpc
import pytest

from distserve.engine.sampling import SamplingParams
from distserve.rpc.errors import KV_FAULT
from services.router.run import Run, kv_fault, rpc_failure
from distserve.v1 import common_pb2


def _run(deadline_in: float | None = None, **params) -> Run:
    pb = common_pb2.SamplingParams(**params)
    sp = SamplingParams(max_tokens=pb.max_tokens if pb.HasField("max_tokens") else 16)
    deadline = None if deadline_in is None else time.monotonic() + deadline_in
    return Run("r1", [1, 2, 3], sp, pb, deadline, detok=None)


def test_a_replayed_leg_forwards_the_clients_params_with_what_is_left():
    run = _run(max_tokens=10, temperature=0.7, seed=5, stop=["x"], logprobs=True)
    first = run.leg_params()
    assert (first.max_tokens, first.output_offset) == (10, 0)
    run.emitted += [7, 8, 9]
    again = run.leg_params()
    assert (again.max_tokens, again.output_offset) == (7, 3)
    assert run.leg_prompt() == [1, 2, 3, 7, 8, 9]
    for name in ("temperature", "seed", "stop", "logprobs"):  # forwarded untouched
        assert getattr(again, name) == getattr(run.params_pb, name)
    assert not again.HasField("top_p")  # unset stays unset: the worker applies its default as for the client
    assert run.params_pb.max_tokens == 10  # the client's message is not changed


def test_each_attempt_has_its_own_id_on_the_workers():
    run = _run()
    ids = {run.leg_id}
    for n in (1, 2, 3):
        run.attempt = n
        ids.add(run.leg_id)
    assert len(ids) == 4 and all(i.startswith("r1~") for i in ids)
    assert _run().leg_id != _run().leg_id  # two calls with the same client id never share a worker-side id


class _Failed(grpc.aio.AioRpcError):
    def __init__(self, code, trailing=()):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details="x")


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                  grpc.StatusCode.CANCELLED, grpc.StatusCode.NOT_FOUND])
def test_transport_and_server_failures_replay(code):
    assert rpc_failure(_Failed(code), _run())


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED])
def test_the_requests_own_faults_and_overload_do_not(code):
    assert not rpc_failure(_Failed(code), _run())


def test_a_deadline_replays_only_while_the_client_still_has_time():
    assert rpc_failure(_Failed(grpc.StatusCode.DEADLINE_EXCEEDED), _run(deadline_in=5.0))  # a leg's own cap
    assert not rpc_failure(_Failed(grpc.StatusCode.DEADLINE_EXCEEDED), _run(deadline_in=-1.0))  # the client's


def test_a_failed_pull_is_the_holders_fault():
    assert kv_fault(_Failed(grpc.StatusCode.UNAVAILABLE, (KV_FAULT,)))
    assert not kv_fault(_Failed(grpc.StatusCode.UNAVAILABLE))


def test_text_that_may_start_a_stop_string_is_held_back():
    from services.router.generation import stop_prefix_len

    assert stop_prefix_len("hello wor", 0, ("world",)) == 3  # "wor" may become "world"
    assert stop_prefix_len("hello w", 0, ("world", "xyz")) == 1
    assert stop_prefix_len("hello", 0, ("world",)) == 0
    assert stop_prefix_len("ab", 1, ("bcd",)) == 1  # only text not sent yet (from start) is held
    assert stop_prefix_len("abc", 3, ("c",)) == 0  # a one-character stop holds nothing back
