"""The record one client request carries through the router's legs, and how a leg fails.

Lifecycle of a `Run`: made by `Generate` once the request is valid (`emitted` holds the tokens a
resumed client already has) -> each attempt runs a prefill leg (which sets `prefilled`: the KV a
prefill worker holds for us) and a decode leg (which takes that KV, clearing `prefilled.handle`, and
appends to `emitted`) -> a leg that fails raises `LegFailure`, and the next attempt replays the
prompt plus `emitted` on other workers (`avoid` names the ones that failed) -> `finish` is set by
whichever leg saw the last token. Whoever clears `prefilled` while its handle is set must release
that KV (the router does it in one place, `Generation._drop_prefilled`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import grpc

from distserve.engine.sampling import SamplingParams
from distserve.rpc.errors import KV_FAULT
from distserve.tokenization import IncrementalDetokenizer
from distserve.v1 import common_pb2

# Statuses of a failed leg that say "this worker or the path to it failed": worth a replay elsewhere.
# INVALID_ARGUMENT (the request), RESOURCE_EXHAUSTED (overload) and a passed client deadline are not.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.DATA_LOSS,
})



@dataclass(frozen=True, slots=True)
class LegPolicy:
    prefill_timeout_s: float = 120.0  # longest one prefill call may take (the client's deadline may cut it shorter)
    stall_timeout_s: float = 20.0  # a decode leg that sends nothing for this long is given up and replayed
    migration_limit: int = 3  # replays of one request after failed legs before it fails with UNAVAILABLE
    pick_wait_s: float = 5.0  # how long a replay waits for a worker of the needed role to be available


@dataclass(slots=True)
class Prefilled:
    """A prefill leg's result, until a decode worker takes it."""

    prompt: list[int]  # what was prefilled: the client's prompt plus the tokens emitted before
    params: common_pb2.SamplingParams  # the leg's params (max_tokens left, output_offset)
    first_token: int
    first_logprob: float
    worker_id: str  # the prefill worker holding the KV
    handle: common_pb2.KvHandle | None  # the held KV; None once a decode worker took it (or none was kept)
    first_top_logprobs: common_pb2.TopLogprobs | None = None  # when params.top_logprobs asked for them


@dataclass(slots=True)
class Run:
    rid: str  # the request's id (the client's, or one the router made)
    prompt: list[int]  # the client's prompt
    params: SamplingParams  # validated; stop strings and max_tokens are read here
    params_pb: common_pb2.SamplingParams  # what the client sent: forwarded to workers, only max_tokens and output_offset change
    deadline: float | None  # monotonic time the client's deadline passes; None = none
    detok: IncrementalDetokenizer  # the output's text so far (resumed tokens included)
    text_sent: int = 0  # characters of detok.text the client has (the rest may begin a stop string)
    stop_cut: bool = False  # a stop string ended the text
    emitted: list[int] = field(default_factory=list)  # tokens the client has (resumed ones included)
    resumed: int = 0  # of which it had before this call (a router failover)
    t0: float = field(default_factory=time.monotonic)
    first_at: float | None = None  # monotonic time of the first token this call sent
    last_at: float | None = None
    finish: int = common_pb2.FINISH_REASON_UNSPECIFIED
    prefilled: Prefilled | None = None
    attempt: int = 0  # 0, then one more per replay
    key: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # this call's own id (see leg_id)
    avoid: set[str] = field(default_factory=set)  # workers this request failed on
    kv_losses: int = 0  # prefilled KV that decode workers could not pull
    local_prefill: bool = False  # later attempts prefill on the decode worker itself (the KV got lost twice)
    metrics: common_pb2.RequestMetrics = field(default_factory=common_pb2.RequestMetrics)

    @property
    def leg_id(self) -> str:
        """The id the workers know this attempt by, made here: the client's id is a label (two clients
        may send the same one, and a request resumed on another router meets workers that still hold
        the dead router's legs), and a replay may meet a worker that has not yet dropped the failed
        attempt. So each call and attempt has its own; it starts with the label, for the logs."""
        return f"{self.rid}~{self.key}.{self.attempt}"

    @property
    def tokens_left(self) -> int:
        return self.params.max_tokens - len(self.emitted)

    def leg_prompt(self) -> list[int]:
        return self.prompt + self.emitted

    def leg_params(self) -> common_pb2.SamplingParams:
        """The client's params for the next leg: what is left of max_tokens, and where its draws start."""
        pb = common_pb2.SamplingParams()
        pb.CopyFrom(self.params_pb)
        pb.max_tokens = self.tokens_left
        pb.output_offset = len(self.emitted)
        return pb

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def timeout(self, cap: float | None = None) -> float | None:
        """A leg's deadline: the client's remaining time, capped."""
        left = self.remaining_s()
        if left is None:
            return cap
        return max(0.001, left if cap is None else min(cap, left))


class LegFailure(Exception):
    """A leg failed in a way another worker may not: the request can be replayed."""

    def __init__(self, reason: str, worker_id: str, detail: str):
        super().__init__(f"{reason} on {worker_id}: {detail}")
        self.reason = reason  # one of distserve.metrics.MIGRATION_REASONS
        self.worker_id = worker_id  # whom to blame (and avoid)
        self.detail = detail


def rpc_failure(exc: grpc.aio.AioRpcError, run: Run) -> bool:
    """Whether a failed call counts as the worker's failure (and is worth a replay)."""
    if exc.code() not in RETRYABLE:
        return False
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        left = run.remaining_s()
        return left is None or left > 0.05  # the leg's own cap, not the client's deadline
    return True


def kv_fault(exc: grpc.aio.AioRpcError) -> bool:
    """The decode worker said the KV it was handed could not be pulled."""
    return any((k, v) == KV_FAULT for k, v in exc.trailing_metadata() or ())
