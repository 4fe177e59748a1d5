"""The router's OpenAI-compatible HTTP API, beside gRPC, on the same event loop and request path.

`POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`.
Each completion choice is one `Generation.generate` call (services/router/generation.py), exactly
what a gRPC `Generate` runs: admission, validation, the two legs, replays; no extra hop. Bodies are
validated by pydantic (services/router/openai_models.py); streams are server-sent events as OpenAI
sends them (`data: {json}` per chunk, `data: [DONE]` last; with `stream_options.include_usage` a final
chunk with empty choices and the usage). Errors use OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}`: 400 invalid, 404 unknown model, 429 shed (with
Retry-After), 503 unavailable, 504 deadline, 500 anything else (logged with a reference, not sent).
A client that disconnects cancels its calls, and so both legs of each.

Why FastAPI/Starlette on uvicorn: it is what vLLM's and SGLang's OpenAI servers run, so clients meet
the HTTP behaviour (SSE framing, keep-alive, disconnect detection) they are tested against; it runs
inside an existing asyncio loop (`uvicorn.Server.serve`), which lets HTTP share the gRPC server's loop
and request path; and pydantic gives the request validation OpenAI clients expect, field by field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl as stdlib_ssl
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from distserve.errors import DistserveError, InvalidRequest, NotFound, Unauthenticated
from distserve.metrics import Metrics
from distserve.rpc.auth import AUTH_HEADER, ApiKeys
from distserve.rpc.convert import FINISH_NAMES
from distserve.rpc.errors import status_for
from distserve.rpc.tls import TlsSettings
from distserve.v1 import common_pb2, generation_pb2
from services.router.admission import Shed
from services.router.generation import Generation
from services.router.openai_models import ChatCompletionRequest, CompletionRequest, _Sampling

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_LABEL = re.compile(r"[A-Za-z0-9._:-]{1,100}")

# gRPC status (from the one domain-error table, distserve/rpc/errors.py) -> (HTTP status, OpenAI error type)
_HTTP_BY_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class UnknownModel(NotFound):
    pass


def error_response(exc: BaseException) -> JSONResponse:
    code, message = status_for(exc)  # logs the traceback of anything that is not a domain error
    status, kind = _HTTP_BY_STATUS.get(code) or (
        (502, "upstream_error") if getattr(exc, "grpc_code", None) is not None  # a worker's status passed on
        else (500, "internal_error"))
    param = exc.field if isinstance(exc, InvalidRequest) else ("model" if isinstance(exc, UnknownModel) else None)
    headers = ({"retry-after": str(max(1, -(-exc.retry_after_ms // 1000)))} if isinstance(exc, Shed)
               else {"www-authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None)
    return _error(status, kind, message, param, headers)


def _error(status: int, kind: str, message: str, param: str | None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _finish(code: int) -> str | None:
    name = FINISH_NAMES.get(code)
    return {"stop": "stop", "length": "length"}.get(name, name)


class OpenAIApi:
    """Turns OpenAI requests into `GenerateRequest`s and their responses back into OpenAI JSON."""

    def __init__(self, generation: Generation, model: str):
        self.g = generation
        self.model = model

    # -- requests ------------------------------------------------------------------------------
    def _check(self, body: _Sampling) -> None:
        if body.model != self.model:
            raise UnknownModel(f"model {body.model!r} is not served here (this router serves {self.model!r})")
        body.check_unsupported()

    def _params(self, body: _Sampling, max_tokens: int | None, seed_shift: int, logprobs: bool, top: int) -> common_pb2.SamplingParams:
        p = common_pb2.SamplingParams(stop=body.stops(), ignore_eos=body.ignore_eos, logprobs=logprobs)
        if max_tokens is not None:
            p.max_tokens = max_tokens
        if body.temperature is not None:
            p.temperature = body.temperature
        if body.top_p is not None:
            p.top_p = body.top_p
        if body.top_k is not None and body.top_k > 0:
            p.top_k = body.top_k
        if body.seed is not None:  # n > 1: each choice its own stream (unseeded ones differ anyway)
            p.seed = (body.seed + seed_shift) % 2**63
        p.min_tokens = body.min_tokens
        p.top_logprobs = top
        return p

    async def _chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        tok = self.g.tokenizer
        if not getattr(tok, "chat_template", None):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return list(tok(text)["input_ids"])

        def apply() -> list[int]:
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
            return list(enc["input_ids"])

        size = sum(len(m["content"]) for m in messages)
        if size > self.g.limits.max_prompt_bytes:
            raise InvalidRequest("messages", f"{size} characters, more than the router's limit of {self.g.limits.max_prompt_bytes}")
        return await asyncio.to_thread(apply) if size > 16 * 1024 else apply()

    @staticmethod
    def _request(prompt: str | list[int], params: common_pb2.SamplingParams, label: str) -> generation_pb2.GenerateRequest:
        req = generation_pb2.GenerateRequest(request_id=label, params=params)
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
        return req

    def _token_text(self, tid: int) -> str:
        return self.g.tokenizer.decode([tid])

    # -- the calls ---------------------------------------------------------------------------
    def calls(self, body: _Sampling, prompts: list[str | list[int]], label: str, logprobs: bool, top: int,
              max_tokens: int | None) -> list[tuple[int, int, generation_pb2.GenerateRequest]]:
        """(choice index, prompt index, request) for every choice: prompts x n."""
        out = []
        for i, prompt in enumerate(prompts):
            for j in range(body.n):
                idx = i * body.n + j
                rid = label if len(prompts) * body.n == 1 else f"{label}-{idx}"
                out.append((idx, i, self._request(prompt, self._params(body, max_tokens, j, logprobs, top), rid)))
        return out

    async def merged(self, calls) -> AsyncIterator[tuple[int, generation_pb2.GenerateResponse]]:
        """The responses of several calls as they come, tagged with their choice index. An error in any
        call ends the whole response (and cancels the others)."""
        if len(calls) == 1:
            idx, _, req = calls[0]
            async for msg in self.g.generate(req, None):
                yield idx, msg
            return
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(idx, req):
            try:
                async for msg in self.g.generate(req, None):
                    await q.put((idx, msg))
                await q.put((idx, done))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                await q.put((idx, exc))

        tasks = [asyncio.create_task(pump(idx, req)) for idx, _, req in calls]
        try:
            left = len(tasks)
            while left:
                idx, item = await q.get()
                if item is done:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield idx, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class _Choice:
    """What one choice has produced so far."""

    __slots__ = ("text", "ids", "lps", "tops", "finish", "prompt_tokens", "completion_tokens", "cached_tokens")

    def __init__(self):
        self.text, self.ids, self.lps, self.tops = [], [], [], []
        self.finish = None
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0

    def add(self, msg: generation_pb2.GenerateResponse) -> None:
        self.text.append(msg.text)
        self.ids.extend(msg.token_ids)
        self.lps.extend(msg.logprobs)
        self.tops.extend(_tops(msg))
        if msg.finish_reason:
            self.finish = _finish(msg.finish_reason)
        if msg.HasField("metrics"):
            self.prompt_tokens = msg.metrics.prompt_tokens
            self.completion_tokens = msg.metrics.completion_tokens
            self.cached_tokens = min(msg.metrics.cached_tokens, msg.metrics.prompt_tokens)


def _tops(msg: generation_pb2.GenerateResponse) -> list[list[tuple[int, float]]]:
    """Per token of msg, its top (token id, logprob) alternatives (empty when not asked for)."""
    entries = msg.top_logprobs
    if not entries:
        return [[] for _ in msg.token_ids]
    return [list(zip(e.token_ids, e.logprobs)) for e in entries]


def _usage(choices: dict[int, _Choice], n: int) -> dict:
    prompt = sum(c.prompt_tokens for i, c in choices.items() if i % n == 0)  # each prompt once
    cached = sum(c.cached_tokens for i, c in choices.items() if i % n == 0)  # its prefill's prefix-cache hit
    completion = sum(c.completion_tokens for c in choices.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def build_app(generation: Generation, metrics: Metrics, model: str, keys: ApiKeys | None = None) -> FastAPI:
    api = OpenAIApi(generation, model)
    keys = keys or ApiKeys()

    async def api_key(request: Request) -> None:
        """/v1/* needs a known key when keys are set; /health and /metrics stay open for probes and scrapers.
        (A dependency, not an HTTP middleware: Starlette's middleware wraps every streamed chunk.)"""
        given = request.headers.get(AUTH_HEADER)
        if not keys.allows(given):
            raise Unauthenticated("invalid API key" if given else "missing API key (Authorization: Bearer <key>)")

    app = FastAPI(title="distserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    v1 = [Depends(api_key)]

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return _error(400, "invalid_request_error", f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}", ".".join(loc) or None)

    @app.exception_handler(DistserveError)
    async def domain_error(request: Request, exc: DistserveError):
        return error_response(exc)

    @app.get("/health")
    async def health():
        views = await generation.picker.workers()
        decoders = [v for v in views if v.info.role in ("decode", "colocated")]
        if not decoders:
            return _error(503, "service_unavailable", "no decode or colocated worker is available", None)
        return {"status": "ok", "workers": len(views)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=v1)
    async def models():
        listed = await generation.list_models()
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "distserve", "max_model_len": m.max_model_len}
            for m in listed.models]}

    def label_of(request: Request) -> str:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        return given if _LABEL.fullmatch(given) else uuid.uuid4().hex

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request):
        api._check(body)
        label = label_of(request)
        top = body.logprobs or 0
        calls = api.calls(body, body.prompts(), label, body.logprobs is not None, top, body.max_tokens)
        echo = {idx: (p if isinstance(p, str) else generation.tokenizer.decode(p)) for idx, i, _ in calls
                for p in [body.prompts()[i]]} if body.echo else {}
        meta = {"id": f"cmpl-{label}", "object": "text_completion", "created": int(time.time()), "model": model}
        want_lp = body.logprobs is not None

        def choice_logprobs(c: _Choice, ids, lps, tops, offset: int) -> dict | None:
            if not want_lp:
                return None
            texts = [api._token_text(t) for t in ids]
            offsets, at = [], offset
            for t in texts:
                offsets.append(at)
                at += len(t)
            return {"tokens": texts, "token_logprobs": list(lps),
                    "top_logprobs": [{api._token_text(t): lp for t, lp in alt} if top else None for alt in tops],
                    "text_offset": offsets}

        if body.stream:
            async def events():
                choices: dict[int, _Choice] = {idx: _Choice() for idx, _, _ in calls}
                started: set[int] = set()
                async for idx, msg in api.merged(calls):
                    if idx not in started and idx in echo:  # the echoed prompt, once the call is under way
                        yield _sse({**meta, "choices": [{"index": idx, "text": echo[idx], "logprobs": None, "finish_reason": None}]})
                    started.add(idx)
                    c = choices[idx]
                    at = len("".join(c.text)) + len(echo.get(idx, ""))
                    c.add(msg)
                    if msg.token_ids or msg.text or msg.finish_reason:
                        yield _sse({**meta, "choices": [{"index": idx, "text": msg.text,
                                                         "logprobs": choice_logprobs(c, msg.token_ids, msg.logprobs, _tops(msg), at),
                                                         "finish_reason": _finish(msg.finish_reason) if msg.finish_reason else None}]})
                if body.include_usage:
                    yield _sse({**meta, "choices": [], "usage": _usage(choices, body.n)})
                yield _sse("[DONE]")

            return await _stream(events(), label)

        choices = await _collect(request, api, calls)
        out = []
        for idx in sorted(choices):
            c = choices[idx]
            text = echo.get(idx, "") + "".join(c.text)
            out.append({"index": idx, "text": text, "logprobs": choice_logprobs(c, c.ids, c.lps, c.tops, len(echo.get(idx, ""))),
                        "finish_reason": c.finish})
        return JSONResponse({**meta, "choices": out, "usage": _usage(choices, body.n)}, headers={REQUEST_ID_HEADER: label})

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatCompletionRequest, request: Request):
        api._check(body)
        label = label_of(request)
        ids = await api._chat_ids(body)
        top = body.top_logprobs or 0
        calls = api.calls(body, [ids], label, body.logprobs, top, body.max_completion_tokens or body.max_tokens)
        meta = {"id": f"chatcmpl-{label}", "created": int(time.time()), "model": model}

        def content_logprobs(ids_, lps, tops) -> dict | None:
            if not body.logprobs:
                return None
            out = []
            for t, lp, alt in zip(ids_, lps, tops):
                s = api._token_text(t)
                out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": api._token_text(a), "logprob": alp, "bytes": list(api._token_text(a).encode())}
                                             for a, alp in alt[:top]]})
            return {"content": out}

        if body.stream:
            async def events():
                chunk = {**meta, "object": "chat.completion.chunk"}
                usage_field = {"usage": None} if body.include_usage else {}
                choices: dict[int, _Choice] = {idx: _Choice() for idx, _, _ in calls}
                started: set[int] = set()
                async for idx, msg in api.merged(calls):
                    if idx not in started:  # the role first, once the call is under way
                        started.add(idx)
                        yield _sse({**chunk, **usage_field, "choices": [{"index": idx, "delta": {"role": "assistant", "content": ""},
                                                                         "logprobs": None, "finish_reason": None}]})
                    choices[idx].add(msg)
                    if msg.token_ids or msg.text:
                        yield _sse({**chunk, **usage_field, "choices": [{"index": idx, "delta": {"content": msg.text},
                                                                         "logprobs": content_logprobs(msg.token_ids, msg.logprobs, _tops(msg)),
                                                                         "finish_reason": None}]})
                    if msg.finish_reason:
                        yield _sse({**chunk, **usage_field, "choices": [{"index": idx, "delta": {}, "logprobs": None,
                                                                         "finish_reason": _finish(msg.finish_reason)}]})
                if body.include_usage:
                    yield _sse({**chunk, "choices": [], "usage": _usage(choices, body.n)})
                yield _sse("[DONE]")

            return await _stream(events(), label)

        choices = await _collect(request, api, calls)
        out = [{"index": idx, "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": content_logprobs(c.ids, c.lps, c.tops), "finish_reason": c.finish}
               for idx, c in sorted(choices.items())]
        return JSONResponse({**meta, "object": "chat.completion", "choices": out, "usage": _usage(choices, body.n)},
                            headers={REQUEST_ID_HEADER: label})

    return app


async def _stream(events: AsyncIterator[bytes], label: str) -> Response:
    """An SSE response, sent once the first event is there: an error before it (admission, validation,
    no worker) is a JSON error with its HTTP status; after it, an error event in OpenAI's shape ends
    the stream."""
    it = events.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    except DistserveError as exc:
        return error_response(exc)

    async def guarded():
        try:
            if first is not None:
                yield first
            async for e in it:
                yield e
        except DistserveError as exc:
            resp = error_response(exc)
            yield b"data: " + resp.body + b"\n\n"
            yield _sse("[DONE]")

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={REQUEST_ID_HEADER: label, "cache-control": "no-cache"})


async def _collect(request: Request, api: OpenAIApi, calls) -> dict[int, _Choice]:
    """Every choice to its end; the calls are cancelled if the client disconnects meanwhile."""
    choices: dict[int, _Choice] = {idx: _Choice() for idx, _, _ in calls}

    async def run():
        async for idx, msg in api.merged(calls):
            choices[idx].add(msg)

    task = asyncio.create_task(run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                log.info("HTTP client of %s went away: its calls are cancelled", calls[0][2].request_id)
                break
        return choices if task.cancelled() else (task.result() or choices)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the router's loop: the router owns the signals and the shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """Lifecycle: `start()` binds host:port (0 = any) and serves on the running loop; `stop()` stops
    accepting and waits up to `grace_s` for open responses. With `tls` (the router's TlsSettings
    carrying files) it serves HTTPS with the router's certificate, asking clients for theirs when
    `client_certs`."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: TlsSettings | None = None, client_certs: bool = False):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.host = host
        self.scheme = "https" if tls is not None else "http"
        ssl = {} if tls is None else dict(ssl_certfile=tls.tls_cert, ssl_keyfile=tls.tls_key, ssl_ca_certs=tls.tls_ca,
                                          ssl_cert_reqs=stdlib_ssl.CERT_REQUIRED if client_certs else stdlib_ssl.CERT_NONE)
        config = uvicorn.Config(app, loop="none", lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=30, **ssl)
        config.load()  # reads the certificate now: a bad file stops the router at start
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float = 30.0) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            await self._task
