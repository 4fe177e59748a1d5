"""The Python SDK: `Client` (blocking) and `AsyncClient` (asyncio) for a distserve router.

    from distserve import Client
    c = Client("localhost:50051")
    out = c.generate("What is the capital of France?", max_tokens=32, temperature=0)
    print(out.text, out.finish_reason, out.ttft_s)
    for chunk in c.stream("Tell me a story", max_tokens=64):
        print(chunk.text, end="", flush=True)

Given several routers (`Client("host1:50051,host2:50051")`), a call whose router fails goes on at
another one, and a stream cut mid-way resumes after the last token received (exact for greedy and
seeded requests). Errors are the suite's domain errors (`InvalidRequest`, `ResourceExhausted`,
`Unavailable`, `DeadlineExceeded`, ...), each carrying the gRPC status as `.grpc_code`; a request the
router refused under load (`ResourceExhausted`) carries its hint `.retry_after_s`. A router that
requires API keys gets `api_key=` (or $DISTSERVE_API_KEY) as `authorization: Bearer <key>`. A router
serving TLS is reached with `tls_ca=` (or $DISTSERVE_TLS_CA), the CA file its certificate chains to;
`tls_cert=`/`tls_key=` (or $DISTSERVE_TLS_CERT/_KEY) add a client certificate where the router asks for
one, and `tls_server_name=` the name to verify when the target's host is not in the certificate.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from distserve.rpc.auth import bearer
from distserve.rpc.channels import aio_channel, channel_options, sync_channel
from distserve.rpc.convert import FINISH_NAMES, top_logprobs_from_pb
from distserve.rpc.errors import error_from_rpc
from distserve.rpc.tls import Tls
from distserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc


@dataclass(slots=True)
class Chunk:
    text: str  # new text (whole characters)
    token_ids: list[int]  # new tokens
    logprobs: list[float]
    finish_reason: str | None  # set on the last chunk
    metrics: common_pb2.RequestMetrics | None = None  # server-side metrics, on the last chunk
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per new token when asked: (id, log-prob), best first


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    ttft_s: float  # measured here, from the call to the first token
    tpot_s: float  # (last token time - first token time) / (tokens - 1)
    e2e_s: float
    logprobs: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # seconds since the call, per token
    request_id: str = ""
    metrics: common_pb2.RequestMetrics | None = None  # the server's view, phases included
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token when asked: (id, log-prob), best first

    def to_dict(self) -> dict:
        return {
            "text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
            "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s, "request_id": self.request_id,
        }


def build_request(prompt: str | list[int], *, max_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None, stop: list[str] | None = None,
                  stop_token_ids: list[int] | None = None, ignore_eos: bool = False, logprobs: bool = False, chat: bool = False,
                  request_id: str = "", top_logprobs: int = 0, min_tokens: int = 0) -> generation_pb2.GenerateRequest:
    """max_tokens, temperature, top_p, top_k, seed: None leaves the field unset, and the server applies its
    defaults (16 tokens, temperature 1, no top-p or top-k cut: distserve.engine.sampling.SamplingParams).
    top_logprobs > 0 (up to 20) asks for that many most likely tokens per position and implies logprobs;
    min_tokens: no EOS, stop token or stop string ends the output before that many tokens."""
    params = common_pb2.SamplingParams(stop=stop or [], stop_token_ids=stop_token_ids or [], ignore_eos=ignore_eos,
                                       logprobs=logprobs or top_logprobs > 0, top_logprobs=top_logprobs, min_tokens=min_tokens)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(params, name, value)
    req = generation_pb2.GenerateRequest(request_id=request_id, params=params, apply_chat_template=chat)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def _chunk(msg: generation_pb2.GenerateResponse) -> Chunk:
    return Chunk(msg.text, list(msg.token_ids), list(msg.logprobs), FINISH_NAMES.get(msg.finish_reason),
                 msg.metrics if msg.HasField("metrics") else None, [top_logprobs_from_pb(t) for t in msg.top_logprobs])


class _Collector:
    def __init__(self):
        self.t0 = time.monotonic()
        self.text, self.ids, self.lps, self.times, self.tops = [], [], [], [], []
        self.finish = None
        self.metrics = None
        self.rid = ""

    def add(self, msg: generation_pb2.GenerateResponse) -> None:
        now = time.monotonic() - self.t0
        self.rid = self.rid or msg.request_id
        self.text.append(msg.text)
        self.ids.extend(msg.token_ids)
        self.lps.extend(msg.logprobs)
        self.tops.extend(top_logprobs_from_pb(t) for t in msg.top_logprobs)
        self.times.extend([now] * len(msg.token_ids))
        if msg.finish_reason:
            self.finish = FINISH_NAMES.get(msg.finish_reason)
        if msg.HasField("metrics"):
            self.metrics = msg.metrics

    def result(self) -> Completion:
        e2e = time.monotonic() - self.t0
        n = len(self.times)
        ttft = self.times[0] if n else e2e
        tpot = (self.times[-1] - self.times[0]) / (n - 1) if n > 1 else 0.0
        return Completion("".join(self.text), self.ids, self.finish, ttft, tpot, e2e, self.lps, self.times, self.rid, self.metrics, self.tops)


def targets_of(target: str | Sequence[str]) -> list[str]:
    """Router addresses from "host:port", "host:port,host:port" or a list of them."""
    items = target.split(",") if isinstance(target, str) else list(target)
    out = [t.strip() for t in items if t.strip()]
    if not out:
        raise ValueError("no router address given")
    return out


class _Failover:
    """Which router a call goes to, and whether a failed call moves to the next one.

    A call starts on the routers in turn (so clients spread over them). When it fails with UNAVAILABLE
    (the router died, is unreachable, or had no worker for it) and another router is known, it goes
    on there: before any token, as a plain retry; after some tokens, as a resume that sends the
    tokens received so far (`resume_token_ids`, same request id), so the stream continues after the
    last token this client got, with none repeated. At most `max_failovers` moves per call.
    """

    def __init__(self, targets: list[str], max_failovers: int | None):
        self.targets = targets
        self.max_failovers = 2 * (len(targets) - 1) if max_failovers is None else max_failovers
        self._next = 0

    def first(self) -> int:
        i, self._next = self._next, (self._next + 1) % len(self.targets)
        return i

    def prepare(self, request: generation_pb2.GenerateRequest) -> generation_pb2.GenerateRequest:
        if not request.request_id and self.max_failovers > 0:
            request.request_id = uuid.uuid4().hex  # a resume names the request it continues
        return request

    @staticmethod
    def resume(request: generation_pb2.GenerateRequest, received: list[int]) -> generation_pb2.GenerateRequest:
        """The request to send next: after some tokens, it names them so the stream resumes after them."""
        if received:
            del request.resume_token_ids[:]
            request.resume_token_ids.extend(received)
        return request

    def again(self, exc: grpc.RpcError, moves: int, deadline: float | None) -> bool:
        return (exc.code() == grpc.StatusCode.UNAVAILABLE and moves < self.max_failovers
                and (deadline is None or deadline - time.monotonic() > 0.05))


def _auth(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata with the API key: the one given, else $DISTSERVE_API_KEY, else none."""
    key = api_key if api_key is not None else os.environ.get("DISTSERVE_API_KEY", "")
    return bearer(key) if key else None


def _tls(ca: str | None, cert: str | None, key: str | None) -> Tls | None:
    """TLS from the files given, else from $DISTSERVE_TLS_CA/_CERT/_KEY; None (plaintext) without a CA."""
    env = os.environ.get
    ca = ca if ca is not None else env("DISTSERVE_TLS_CA", "")
    if not ca:
        return None
    return Tls.load(ca, cert if cert is not None else env("DISTSERVE_TLS_CERT", ""),
                    key if key is not None else env("DISTSERVE_TLS_KEY", ""))


def _options(server_name: str | None) -> list:
    return [*channel_options(), *([("grpc.ssl_target_name_override", server_name)] if server_name else [])]


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())


class Client:
    """Blocking client. `target`: one router ("host:port"), or several ("a:1,b:2" or a list): a call
    then fails over to another router when its router fails, resuming a cut stream where it stopped."""

    def __init__(self, target: str | Sequence[str] = "localhost:50051", timeout_s: float | None = 600.0,
                 max_failovers: int | None = None, api_key: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_server_name: str | None = None):
        self.metadata = _auth(api_key)
        self.failover = _Failover(targets_of(target), max_failovers)
        tls = _tls(tls_ca, tls_cert, tls_key)
        self.channels = [sync_channel(t, tls, _options(tls_server_name)) for t in self.failover.targets]
        self.stubs = [generation_pb2_grpc.GenerationStub(ch) for ch in self.channels]
        self.timeout_s = timeout_s

    @property
    def stub(self) -> generation_pb2_grpc.GenerationStub:
        return self.stubs[0]

    def _messages(self, request: generation_pb2.GenerateRequest, timeout_s: float | None) -> Iterator[generation_pb2.GenerateResponse]:
        timeout = timeout_s or self.timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        request = self.failover.prepare(request)
        i, moves, received = self.failover.first(), 0, []
        while True:
            call = self.stubs[i].Generate(self.failover.resume(request, received), timeout=_remaining(deadline), metadata=self.metadata)
            try:
                for msg in call:
                    received.extend(msg.token_ids)
                    yield msg
                return
            except grpc.RpcError as exc:
                if not self.failover.again(exc, moves, deadline):
                    raise error_from_rpc(exc) from None
                moves, i = moves + 1, (i + 1) % len(self.stubs)
            finally:
                call.cancel()

    def stream(self, prompt: str | list[int], timeout_s: float | None = None, **kw) -> Iterator[Chunk]:
        for msg in self._messages(build_request(prompt, **kw), timeout_s):
            yield _chunk(msg)

    def generate(self, prompt: str | list[int], timeout_s: float | None = None, **kw) -> Completion:
        col = _Collector()
        for msg in self._messages(build_request(prompt, **kw), timeout_s):
            col.add(msg)
        return col.result()

    def models(self) -> list[generation_pb2.ModelInfo]:
        return list(self.stub.ListModels(generation_pb2.ListModelsRequest(), timeout=10, metadata=self.metadata).models)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """The asyncio client; same targets and failover as `Client`."""

    def __init__(self, target: str | Sequence[str] = "localhost:50051", timeout_s: float | None = 600.0,
                 max_failovers: int | None = None, api_key: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_server_name: str | None = None):
        self.metadata = _auth(api_key)
        self.failover = _Failover(targets_of(target), max_failovers)
        tls = _tls(tls_ca, tls_cert, tls_key)
        self.channels = [aio_channel(t, tls, _options(tls_server_name)) for t in self.failover.targets]
        self.stubs = [generation_pb2_grpc.GenerationStub(ch) for ch in self.channels]
        self.timeout_s = timeout_s

    @property
    def stub(self) -> generation_pb2_grpc.GenerationStub:
        return self.stubs[0]

    async def _messages(self, request: generation_pb2.GenerateRequest, timeout_s: float | None) -> AsyncIterator[generation_pb2.GenerateResponse]:
        timeout = timeout_s or self.timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        request = self.failover.prepare(request)
        i, moves, received = self.failover.first(), 0, []
        while True:
            call = self.stubs[i].Generate(self.failover.resume(request, received), timeout=_remaining(deadline), metadata=self.metadata)
            try:
                async for msg in call:
                    received.extend(msg.token_ids)
                    yield msg
                return
            except grpc.aio.AioRpcError as exc:
                if not self.failover.again(exc, moves, deadline):
                    raise error_from_rpc(exc) from None
                moves, i = moves + 1, (i + 1) % len(self.stubs)
            finally:
                call.cancel()

    async def stream(self, prompt: str | list[int], timeout_s: float | None = None, **kw) -> AsyncIterator[Chunk]:
        async for msg in self._messages(build_request(prompt, **kw), timeout_s):
            yield _chunk(msg)

    async def generate(self, prompt: str | list[int], timeout_s: float | None = None, **kw) -> Completion:
        col = _Collector()
        async for msg in self._messages(build_request(prompt, **kw), timeout_s):
            col.add(msg)
        return col.result()

    async def models(self) -> list[generation_pb2.ModelInfo]:
        return list((await self.stub.ListModels(generation_pb2.ListModelsRequest(), timeout=10, metadata=self.metadata)).models)

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
