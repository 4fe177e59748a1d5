"""The Python SDK: `Client` (blocking) and `AsyncClient` (asyncio) for a distserve router.

    from distserve import Client
    c = Client("localhost:50051")
    out = c.generate("What is the capital of France?", max_tokens=32, temperature=0)
    print(out.text, out.finish_reason, out.ttft_s)
    for chunk in c.stream("Tell me a story", max_tokens=64):
        print(chunk.text, end="", flush=True)

Errors are the suite's domain errors (`InvalidRequest`, `ResourceExhausted`, `Unavailable`,
`DeadlineExceeded`, ...), each carrying the gRPC status as `.grpc_code`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from distserve.rpc.channels import channel_options
from distserve.rpc.convert import FINISH_NAMES
from distserve.rpc.errors import error_from_rpc
from distserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc


@dataclass(slots=True)
class Chunk:
    text: str  # new text (whole characters)
    token_ids: list[int]  # new tokens
    logprobs: list[float]
    finish_reason: str | None  # set on the last chunk
    metrics: common_pb2.RequestMetrics | None = None  # server-side metrics, on the last chunk


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

    def to_dict(self) -> dict:
        return {
            "text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
            "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s, "request_id": self.request_id,
        }


def build_request(prompt: str | list[int], *, max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, seed: int | None = None, stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
                  ignore_eos: bool = False, logprobs: bool = False, chat: bool = False, request_id: str = "") -> generation_pb2.GenerateRequest:
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                       stop=stop or [], stop_token_ids=stop_token_ids or [], ignore_eos=ignore_eos, logprobs=logprobs)
    if seed is not None:
        params.seed = seed
    req = generation_pb2.GenerateRequest(request_id=request_id, params=params, apply_chat_template=chat)
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def _chunk(msg: generation_pb2.GenerateResponse) -> Chunk:
    return Chunk(msg.text, list(msg.token_ids), list(msg.logprobs), FINISH_NAMES.get(msg.finish_reason),
                 msg.metrics if msg.HasField("metrics") else None)


class _Collector:
    def __init__(self):
        self.t0 = time.monotonic()
        self.text, self.ids, self.lps, self.times = [], [], [], []
        self.finish = None
        self.metrics = None
        self.rid = ""

    def add(self, msg: generation_pb2.GenerateResponse) -> None:
        now = time.monotonic() - self.t0
        self.rid = self.rid or msg.request_id
        self.text.append(msg.text)
        self.ids.extend(msg.token_ids)
        self.lps.extend(msg.logprobs)
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
        return Completion("".join(self.text), self.ids, self.finish, ttft, tpot, e2e, self.lps, self.times, self.rid, self.metrics)


class Client:
    def __init__(self, target: str = "localhost:50051", timeout_s: float | None = 600.0):
        self.channel = grpc.insecure_channel(target, options=channel_options())
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.timeout_s = timeout_s

    def stream(self, prompt: str | list[int], timeout_s: float | None = None, **kw) -> Iterator[Chunk]:
        call = self.stub.Generate(build_request(prompt, **kw), timeout=timeout_s or self.timeout_s)
        try:
            for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    def generate(self, prompt: str | list[int], timeout_s: float | None = None, **kw) -> Completion:
        col = _Collector()
        try:
            for msg in self.stub.Generate(build_request(prompt, **kw), timeout=timeout_s or self.timeout_s):
                col.add(msg)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return col.result()

    def models(self) -> list[generation_pb2.ModelInfo]:
        return list(self.stub.ListModels(generation_pb2.ListModelsRequest(), timeout=10).models)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    def __init__(self, target: str = "localhost:50051", timeout_s: float | None = 600.0):
        self.channel = grpc.aio.insecure_channel(target, options=channel_options())
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.timeout_s = timeout_s

    async def stream(self, prompt: str | list[int], timeout_s: float | None = None, **kw) -> AsyncIterator[Chunk]:
        call = self.stub.Generate(build_request(prompt, **kw), timeout=timeout_s or self.timeout_s)
        try:
            async for msg in call:
                yield _chunk(msg)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str | list[int], timeout_s: float | None = None, **kw) -> Completion:
        col = _Collector()
        call = self.stub.Generate(build_request(prompt, **kw), timeout=timeout_s or self.timeout_s)
        try:
            async for msg in call:
                col.add(msg)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        except asyncio.CancelledError:
            call.cancel()
            raise
        return col.result()

    async def models(self) -> list[generation_pb2.ModelInfo]:
        return list((await self.stub.ListModels(generation_pb2.ListModelsRequest(), timeout=10)).models)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
