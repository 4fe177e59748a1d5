"""The chaos suite's load generator, run as its own process (`python -m tests.chaos.load SPEC_JSON`).

A process of its own so the same code runs in the test's network namespace and in a client
namespace (tests/chaos/test_partition.py), and so a hung stream can never hang pytest.

It sends every request of the spec at once through one SDK client given all routers, and while they
run prints progress lines `P <with first token> <tokens received> <resolved>` (at most every 50 ms).
A line `FAULT <monotonic time>` on stdin starts the recovery probe: a new small request every 0.25 s
(each with its own deadline) until one returns exactly its reference tokens; the time from the fault
to that success is the recovery time. CLOCK_MONOTONIC is one clock for every process on the machine,
whatever their network namespace, so the test's fault time can be compared with times taken here.
The last line is `RESULT {json}`: per request its tokens, finish reason, status and times.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from distserve import AsyncClient

PROBE_EVERY_S = 0.25
PROBE_TIMEOUT_S = 15.0


def make_client(targets: list[str], out: dict) -> AsyncClient:
    """One SDK client over every router. An SDK that takes one target only (before multi-router
    failover) gets the first router, and the result says so (`sdk_targets`)."""
    try:
        client = AsyncClient(targets)
        out["sdk_targets"] = len(targets)
        return client
    except (TypeError, AttributeError):
        print(f"this SDK takes one target: the load uses {targets[0]} only", file=sys.stderr, flush=True)
        out["sdk_targets"] = 1
        return AsyncClient(targets[0])


async def one(client: AsyncClient, req: dict, deadline_s: float, rec: dict, progress) -> None:
    rec.update(tokens=[], finish=None, code=None, error=None, t_start=time.monotonic(), t_end=None, t_first=None)

    async def consume():
        async for ch in client.stream(req["prompt"], max_tokens=req["max_tokens"], temperature=0.0, ignore_eos=True,
                                      timeout_s=deadline_s):
            if ch.token_ids and rec["t_first"] is None:
                rec["t_first"] = time.monotonic()
            rec["tokens"].extend(ch.token_ids)
            progress()
            if ch.finish_reason:
                rec["finish"] = ch.finish_reason

    try:
        # The SDK's own deadline should end the call; this outer bound only catches a stream that hangs past it.
        await asyncio.wait_for(consume(), deadline_s + 10.0)
    except asyncio.TimeoutError:
        rec.update(code="HUNG", error=f"no end {deadline_s + 10:.0f}s after the start")
    except Exception as exc:  # noqa: BLE001 - every outcome is recorded and judged by the test
        code = getattr(exc, "grpc_code", None)
        rec.update(code=code.name if code is not None else "UNTYPED", error=f"{type(exc).__name__}: {exc}"[:300])
    rec["t_end"] = time.monotonic()
    progress()


async def probe(client: AsyncClient, spec: dict, t_fault: float, out: dict) -> None:
    """New requests until one succeeds with its reference tokens; out['recovery_s'] = success - fault."""
    p = spec["probe"]
    stop_at = t_fault + spec["probe_window_s"]
    done = asyncio.Event()
    tasks = []

    async def attempt():
        try:
            toks = []
            async for ch in client.stream(p["prompt"], max_tokens=p["max_tokens"], temperature=0.0, ignore_eos=True,
                                          timeout_s=PROBE_TIMEOUT_S):
                toks.extend(ch.token_ids)
            if toks == p["reference"] and not done.is_set():
                out["recovery_s"] = time.monotonic() - t_fault
                done.set()
        except Exception as exc:  # noqa: BLE001
            out["probe_errors"] = out.get("probe_errors", 0) + 1
            out["last_probe_error"] = f"{type(exc).__name__}: {exc}"[:200]

    while not done.is_set() and time.monotonic() < stop_at:
        tasks.append(asyncio.ensure_future(attempt()))
        out["probes"] = len(tasks)
        try:
            await asyncio.wait_for(done.wait(), PROBE_EVERY_S)
        except asyncio.TimeoutError:
            pass
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def main(spec: dict) -> dict:
    recs = [{} for _ in spec["requests"]]
    state = {"last": 0.0, "line": ""}

    def progress(force: bool = False):
        now = time.monotonic()
        if not force and now - state["last"] < 0.05:
            return
        first = sum(1 for r in recs if r.get("t_first") is not None)
        toks = sum(len(r.get("tokens", ())) for r in recs)
        resolved = sum(1 for r in recs if r.get("t_end") is not None)
        line = f"P {first} {toks} {resolved}"
        if line != state["line"]:
            print(line, flush=True)
            state.update(last=now, line=line)

    out: dict = {"recovery_s": None}
    probe_task = None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def watch_stdin(client):
        nonlocal probe_task
        while True:
            line = (await reader.readline()).decode().split()
            if not line:
                return
            if line[0] == "FAULT" and probe_task is None:
                out["t_fault"] = float(line[1])
                probe_task = asyncio.ensure_future(probe(client, spec, float(line[1]), out))

    client = make_client(spec["targets"], out)
    try:
        watcher = asyncio.ensure_future(watch_stdin(client))
        t0 = time.monotonic()
        print("START", flush=True)
        await asyncio.gather(*(one(client, r, spec["deadline_s"], rec, progress) for r, rec in zip(spec["requests"], recs)))
        out["load_s"] = time.monotonic() - t0
        progress(force=True)
        if spec.get("expect_fault"):
            # the fault may come after the load (a test that never injects ends the wait on EOF)
            wait_until = time.monotonic() + spec["probe_window_s"]
            while probe_task is None and not watcher.done() and time.monotonic() < wait_until:
                await asyncio.sleep(0.05)
        if probe_task is not None:
            await probe_task
        watcher.cancel()
    finally:
        await client.close()
    out["requests"] = recs
    return out


if __name__ == "__main__":
    result = asyncio.run(main(json.loads(sys.argv[1])))
    print("RESULT " + json.dumps(result), flush=True)
