"""An OpenAI-compatible target: streaming `POST /v1/completions` over HTTP/1.1, read as server-sent events.

Written on asyncio streams so the load generator needs no HTTP library: one connection per request
(`Connection: close`), a chunked or plain body, `data: {...}` events until `data: [DONE]`. Each event
with a choice counts as one token (vLLM, llama.cpp and transformers stream one token per event); when
the server reports `usage.completion_tokens` (asked for with `stream_options.include_usage`), that
count is the real one. The output is forced to its length with `ignore_eos` and `min_tokens` (vLLM's
extensions; servers that do not know them ignore them, and the real count shows it), except for a
workload whose answers end at the model's end of turn (rewrite).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator

from distserve.bench.metrics import RequestResult
from distserve.bench.workloads import RequestSpec


class HttpError(Exception):
    pass


async def _read_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = (await reader.readline()).decode("latin-1").strip()
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HttpError(f"not an HTTP response: {status_line!r}")
    headers: dict[str, str] = {}
    while True:
        line = (await reader.readline()).decode("latin-1").strip()
        if not line:
            break
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body as it arrives, chunked transfer encoding undone."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readline()  # CRLF after each chunk
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def sse_events(body: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent event stream (one per event)."""
    buf = b""
    data: list[str] = []
    async for piece in body:
        buf += piece
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
    if data:
        yield "\n".join(data)


class OpenAITarget:
    def __init__(self, host: str, port: int, model: str, timeout_s: float = 600.0, send_token_ids: bool = False,
                 tls: ssl.SSLContext | None = None):
        self.host, self.port, self.model = host, port, model
        self.tls = tls  # HTTPS when set
        self.timeout_s = timeout_s
        self.send_token_ids = send_token_ids

    def _request(self, spec: RequestSpec) -> bytes:
        prompt = spec.prompt_ids if self.send_token_ids and spec.prompt_ids is not None else spec.prompt_text
        body = {"model": self.model, "prompt": prompt, "max_tokens": spec.output_len, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if spec.ignore_eos:
            body.update(min_tokens=spec.output_len, ignore_eos=True)
        body = json.dumps(body).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        return head.encode() + body

    async def send(self, spec: RequestSpec, t0: float) -> RequestResult:
        res = RequestResult(spec.index, spec.prompt_len, spec.output_len, time.monotonic() - t0, ignore_eos=spec.ignore_eos)
        try:
            await asyncio.wait_for(self._stream(spec, t0, res), self.timeout_s)
        except Exception as exc:  # a failed request is a result, not a crash of the run
            res.error = f"{type(exc).__name__}: {exc}"[:300]
        res.end_s = time.monotonic() - t0
        return res

    async def _stream(self, spec: RequestSpec, t0: float, res: RequestResult) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls)
        try:
            writer.write(self._request(spec))
            await writer.drain()
            status, headers = await _read_headers(reader)
            if status != 200:
                body = b"".join([c async for c in _body(reader, headers)])
                raise HttpError(f"HTTP {status}: {body[:200].decode(errors='replace')}")
            usage = None
            async for data in sse_events(_body(reader, headers)):
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise HttpError(str(event["error"])[:200])
                if event.get("usage"):
                    usage = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    res.token_times.append(time.monotonic() - t0)
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
            res.completion_tokens = usage or len(res.token_times)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def close(self) -> None:
        pass
