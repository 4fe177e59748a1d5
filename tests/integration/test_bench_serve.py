"""`distserve bench serve` / `bench goodput` against a real tiny-llama suite (`distserve up` as processes),
through both targets: the SDK (distserve://) and an OpenAI-compatible streaming HTTP server written
here that forwards to the same router (openai://), so the SSE client path really runs."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from distserve.bench.metrics import RequestResult, attainment
from distserve.bench.workloads import build_requests
from distserve.cli import build_parser
from distserve.up import UpProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    up = UpProcess(tmp_path_factory.mktemp("up"), "--model", "tiny-llama", "--prefill", "1", "--decode", "1", timeout_s=90)
    # the suite serves TLS: the bench (through the SDK) finds the CA where users put it, $DISTSERVE_TLS_CA
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTSERVE_TLS_CA", up.tls_ca)
    try:
        yield up
    finally:
        mp.undo()
        up.stop()


@pytest.fixture(scope="module")
def suite(up):
    return up.target


def cli(argv: list[str], capsys) -> str:
    args = build_parser().parse_args(argv)
    args.fn(args)
    return capsys.readouterr().out


# -- a minimal OpenAI-compatible server: POST /v1/completions with stream=true, forwarded to the router --


async def _completions(router: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    from distserve.client import AsyncClient

    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    request_line, *header_lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
    raw = await reader.readexactly(int(headers.get("content-length", "0")))
    body = json.loads(raw) if request_line.startswith("POST /v1/completions ") else {}
    if not body.get("stream"):
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found")
        await writer.drain()
        writer.close()
        return

    def event(obj) -> bytes:
        data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"  # one HTTP chunk per event

    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    n = 0
    async with AsyncClient(router) as c:
        async for chunk in c.stream(body["prompt"], max_tokens=body["max_tokens"], temperature=body.get("temperature", 1.0),
                                    ignore_eos=bool(body.get("ignore_eos"))):
            if chunk.token_ids:
                n += len(chunk.token_ids)
                writer.write(event({"object": "text_completion", "choices": [{"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason}]}))
                await writer.drain()
    writer.write(event({"object": "text_completion", "choices": [], "usage": {"completion_tokens": n}}) + event("[DONE]") + b"0\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.fixture(scope="module")
def openai_server(suite):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        asyncio.start_server(lambda r, w: _completions(suite, r, w), "127.0.0.1", 0), loop).result(10)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _check_run(out: dict, n: int) -> list[RequestResult]:
    rs = [RequestResult.from_dict(d) for d in out["requests"]]
    assert len(rs) == n and all(r.ok for r in rs), [r.error for r in rs]
    for r in rs:
        assert r.completion_tokens == r.output_len  # ignore_eos forced the length; the real count says so
        assert len(r.token_times) >= 1 and r.token_times == sorted(r.token_times)
        assert r.send_s < r.token_times[0] <= r.token_times[-1] <= r.end_s
    s = out["summary"]
    assert s["failed"] == 0 and s["attainment"] == attainment(rs, out["config"]["slo_ttft"], out["config"]["slo_tpot"])
    assert s["ttft"]["p50"] <= s["ttft"]["p90"] <= s["ttft"]["p99"] and s["throughput_rps"] > 0
    return rs


def test_serve_distserve_target_records_tokens_and_phases(suite, tmp_path, capsys):
    path = tmp_path / "run.json"
    text = cli(["bench", "serve", "--target", f"distserve://{suite}", "--workload", "chat", "--rate", "20", "--num-requests", "6",
                "--seed", "3", "--slo-ttft", "30", "--slo-tpot", "5", "--no-progress", "--out", str(path)], capsys)
    assert "SLO attainment" in text and "prefill_compute_s" in text
    out = json.loads(path.read_text())
    rs = _check_run(out, 6)
    assert out["model"] == "tiny-llama" and out["commit"]
    for r in rs:
        assert len(r.token_times) == r.output_len  # one time per token through the SDK
        assert r.phases["prefill_compute_s"] > 0 and r.phases["decode_s"] > 0 and r.phases["kv_transfer_s"] > 0
    assert out["summary"]["attainment"] == 1.0  # SLOs far above anything tiny-llama takes
    assert set(out["summary"]["phases_mean"]) >= {"router_s", "prefill_queue_s", "kv_transfer_s", "decode_queue_s"}
    # the router's default mode prefills every prompt on the prefill pool, and says so per request
    assert [r.disagg for r in rs] == ["remote"] * 6 and out["summary"]["disagg_decisions"] == {"remote": 6}
    assert "prefilled remote 6" in text


def test_serve_says_where_each_workers_time_went(up, tmp_path, capsys):
    """up names every process's metrics endpoint; the bench reads the workers' before and after the run."""
    assert set(up.metrics) == {"prefill-1", "decode-1", "router"}
    path = tmp_path / "run.json"
    scrape = f"{up.metrics['prefill-1']},{up.metrics['decode-1']}"
    text = cli(["bench", "serve", "--target", f"distserve://{up.target}", "--workload", "chat", "--rate", "20", "--num-requests", "6",
                "--seed", "11", "--slo-ttft", "30", "--slo-tpot", "5", "--no-progress", "--scrape", scrape, "--out", str(path)], capsys)
    assert "where each worker's time went" in text
    out = json.loads(path.read_text())
    rs = _check_run(out, 6)
    acc = out["summary"]["cores"]
    assert acc["errors"] == []
    prefill, decode = acc["workers"]
    assert (prefill["role"], prefill["instance"], decode["role"], decode["instance"]) == ("prefill", "prefill-1", "decode", "decode-1")
    # the prefill worker ran every prompt token not cached, in prompt-only steps, and nothing else
    assert prefill["prompt_tokens"] == sum(r.prompt_len - r.cached_tokens for r in rs) > 0
    assert prefill["steps"]["prefill"] >= 1 and prefill["steps"]["decode"] == prefill["steps"]["mixed"] == 0
    # the decode worker ran decode-only steps (remote prefill: no prompt of its own)
    assert decode["steps"]["decode"] >= max(r.output_len for r in rs) - 1 and decode["prompt_tokens"] == 0
    for w in (prefill, decode):
        assert 0 < w["busy"] <= 1 and w["busy"] == pytest.approx(sum(w["busy_by_step"].values()), abs=1e-3)
        assert w["wall_s"] >= out["summary"]["duration_s"] * 0.9 and w["threads"] == 1


def test_serve_multiturn_resends_each_conversation_with_its_answers(suite, tmp_path, capsys):
    path = tmp_path / "run.json"
    text = cli(["bench", "serve", "--target", f"distserve://{suite}", "--workload", "multiturn", "--rate", "50", "--num-requests", "5",
                "--seed", "4", "--slo-ttft", "30", "--slo-tpot", "5", "--no-progress", "--warmup", "1", "--out", str(path)], capsys)
    assert "prefix cache:" in text
    out = json.loads(path.read_text())
    rs = _check_run(out, 5)
    from distserve.bench.workloads import build_requests, conversations
    from distserve.tokenization import load_tokenizer

    specs = build_requests("multiturn", 5, load_tokenizer("tiny-llama"), seed=4)
    by_index = {r.index: r for r in rs}
    for conv in conversations(specs):
        for prev, spec in zip(conv, conv[1:]):  # history + the server's answer + the new message
            assert by_index[spec.index].prompt_len == by_index[prev.index].prompt_len + by_index[prev.index].completion_tokens + len(spec.user_ids)
            assert by_index[spec.index].send_s >= by_index[prev.index].end_s + spec.think_s - 0.01
            # the history's blocks were cached where it was prefilled (one prefill worker here)
            assert by_index[spec.index].cached_tokens >= by_index[prev.index].prompt_len // 16 * 16 - 16
    assert out["summary"]["cache_hit_rate"] > 0.3


def test_serve_openai_target_same_requests(suite, openai_server, tmp_path, capsys):
    path = tmp_path / "run.json"
    text = cli(["bench", "serve", "--target", f"openai://{openai_server}", "--model", "tiny-llama", "--workload", "chat",
                "--concurrency", "3", "--num-requests", "5", "--seed", "3", "--slo-ttft", "0.000001", "--slo-tpot", "5",
                "--no-progress", "--out", str(path)], capsys)
    assert "closed loop, 3 clients" in text
    out = json.loads(path.read_text())
    rs = _check_run(out, 5)
    assert out["summary"]["attainment"] == 0.0 and out["summary"]["ttft_attainment"] == 0.0  # an impossible TTFT SLO
    from distserve.tokenization import load_tokenizer

    same = build_requests("chat", 5, load_tokenizer("tiny-llama"), seed=3)
    assert [(r.prompt_len, r.output_len) for r in rs] == [(s.prompt_len, s.output_len) for s in same]
    assert all(r.phases is None for r in rs)


def test_openai_target_reports_http_errors(openai_server):
    from distserve.bench.openai_target import OpenAITarget
    from distserve.bench.workloads import RequestSpec

    host, port = openai_server.split(":")
    target = OpenAITarget(host, int(port), "tiny-llama", timeout_s=10)
    target._request = lambda spec: b"GET /nope HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    res = asyncio.run(target.send(RequestSpec(0, None, "hi", 2, 3), time.monotonic()))
    assert not res.ok and "HTTP 404" in res.error


def test_goodput_runs_sweep_and_writes_json_and_plots(up, tmp_path, capsys):
    suite = up.target
    out_path = tmp_path / "g.json"
    text = cli(["bench", "goodput", "--target", f"distserve://{suite}", "--label", "disagg", "--workload", "code",
                "--rates", "5", "--bisect-steps", "1", "--num-requests", "5", "--slo-ttft", "30", "--slo-tpot", "5",
                "--also-slo", "0.0001,0.0001", "--no-progress", "--scrape", up.metrics["decode-1"], "--out", str(out_path)], capsys)
    doc = json.loads(out_path.read_text())
    (sys_,) = doc["systems"]
    # each point says where the decode worker's time went; the table gives it at the fixed rate
    for point in sys_["points"]:
        (w,) = point["summary"]["cores"]["workers"]
        assert w["instance"] == "decode-1" and w["steps"]["decode"] > 0
    assert "disagg at 5 req/s:" in text and "decode decode-1" in text
    assert sys_["label"] == "disagg" and "disagg" in text and doc["commit"]
    assert [p["rate"] for p in sys_["points"]] == [5.0] and sys_["goodput_rps"] == 5.0 and not sys_["bounded"]
    # the unreachable SLO pair reuses the run at 5 req/s (failing there) and bisects down to 2.5, which it runs
    (also,) = sys_["also_slo"]
    assert (also["slo_ttft"], also["goodput_rps"], also["bounded"]) == (0.0001, 0.0, True)
    assert [(p["rate"], p["attainment"]) for p in also["points"]] == [(5.0, 0.0), (2.5, 0.0)]
    assert "0.000 at TTFT <= 0.0001s, TPOT <= 0.1ms" in text
    assert sys_["scale"]["rate"] == 5.0 and 0 < sys_["scale"]["factor"] <= 1.0 and len(sys_["scale"]["ttft"]) == 5
    pytest.importorskip("matplotlib")
    second = tmp_path / "g2.json"
    second.write_text(json.dumps(doc | {"systems": [sys_ | {"label": "other"}]}))
    text = cli(["bench", "goodput", "--from-json", str(out_path), str(second), "--plot-dir", str(tmp_path / "png")], capsys)
    assert "disagg / other: 1.00x goodput" in text
    for name in ("code_attainment.png", "code_cdf.png"):
        assert (tmp_path / "png" / name).read_bytes()[:4] == b"\x89PNG"
