"""The per-worker account of where the time went: a worker's real metrics registry (distserve.metrics)
exports its engine's step account, and bench.cores turns two scrapes into shares of the wall time."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from prometheus_client import generate_latest

from distserve.bench import cores
from distserve.engine.engine import EngineStats
from distserve.metrics import Metrics

BASE = EngineStats(queued_requests=0, queued_tokens=0, running_requests=0, held_requests=0, free_blocks=10, total_blocks=10, block_size=16)


def exported(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_a_worker_exports_its_step_account_and_the_bench_divides_it_by_the_wall_time():
    m = Metrics("decode")
    m.set_info("tiny-llama", "decode-7")
    now = {"stats": None}
    m.watch_engine(lambda: ("decode", now["stats"], 2) if now["stats"] else None)
    assert "distserve_engine_busy_seconds_total{" not in exported(m)  # no engine yet: no series
    now["stats"] = replace(BASE, step_seconds=(1.0, 0.5, 0.25), step_counts=(50, 10, 2), prompt_tokens_computed=300)
    first = cores.parse(exported(m), at=100.0)
    assert (first.role, first.instance, first.threads) == ("decode", "decode-7", 2)
    assert first.busy == {"decode": 1.0, "mixed": 0.5, "prefill": 0.25} and first.prompt_tokens == 300
    assert first.cpu_s is not None and first.cpu_s >= 0  # Prometheus' process series ride along
    m.tokens.labels("decode").inc(40)
    now["stats"] = replace(BASE, step_seconds=(5.0, 2.5, 0.25), step_counts=(250, 30, 2), prompt_tokens_computed=900)
    second = cores.parse(exported(m), at=110.0)
    acc = cores.account({"u": first}, {"u": second})
    assert acc["errors"] == []
    (w,) = acc["workers"]
    assert (w["role"], w["instance"], w["wall_s"], w["threads"]) == ("decode", "decode-7", 10.0, 2)
    assert w["busy"] == pytest.approx(0.6) and w["busy_by_step"] == pytest.approx({"decode": 0.4, "mixed": 0.2, "prefill": 0.0})
    assert w["steps"] == {"decode": 200, "mixed": 20, "prefill": 0}
    assert w["step_ms"] == {"decode": 20.0, "mixed": 100.0, "prefill": None}
    assert (w["prompt_tokens"], w["generated_tokens"]) == (600, 40)
    lines = cores.table(acc)
    assert any(line.startswith("decode decode-7") and "60%" in line and "200 (20)" in line for line in lines)


def test_a_router_shows_its_cpu_only_and_the_load_generator_its_own():
    m = Metrics("router")
    m.set_info("tiny-llama", "router-1")
    text = exported(m)
    first, second = cores.parse(text, at=0.0), cores.parse(text, at=4.0)
    assert first.busy == {} and first.role == "router"
    acc = cores.account({"r": first}, {"r": replace(second, cpu_s=second.cpu_s + 1.0)}, client_cpu=0.25)
    (w,) = acc["workers"]
    assert "busy" not in w and w["cpu"] == pytest.approx(0.25, abs=0.01) and acc["client_cpu"] == 0.25
    lines = cores.table(acc)
    assert any(line.startswith("router router-1") and line.split()[2:6] == ["-"] * 4 for line in lines)
    assert any(line.startswith("load generator (bench)") and line.endswith("25%") for line in lines)


def test_a_restarted_or_unreachable_worker_is_named_not_counted():
    busy = cores.Reading(0.0, "prefill", "p-1", busy={"prefill": 50.0}, prompt_tokens=5000)
    restarted = cores.Reading(10.0, "prefill", "p-1", busy={"prefill": 2.0}, prompt_tokens=100)
    changing = cores.Reading(10.0, "", "p-1")  # scraped while an elastic worker changed role: no engine series
    acc = cores.account({"a": busy, "b": "b: connection refused", "c": busy}, {"a": restarted, "b": "b: connection refused", "c": changing})
    assert acc["workers"] == []
    assert acc["errors"] == ["a: its counters went back (the worker restarted during the run)", "b: connection refused", "b: connection refused",
                             "c: its engine series went away (an elastic worker changing role)"]
    assert "scrape error: b: connection refused" in cores.table(acc)


def test_scrape_reads_a_live_endpoint_and_says_which_one_it_could_not():
    m = Metrics("prefill")
    m.watch_engine(lambda: ("prefill", replace(BASE, step_seconds=(0.0, 0.0, 3.0), step_counts=(0, 0, 7)), 1))
    port = m.serve(0, host="127.0.0.1")
    dead = cores.normalize("127.0.0.1:1")  # nothing listens on port 1
    got = asyncio.run(cores.scrape([cores.normalize(f"127.0.0.1:{port}"), dead]))
    live = got[f"http://127.0.0.1:{port}/metrics"]
    assert isinstance(live, cores.Reading) and live.busy["prefill"] == 3.0 and live.steps["prefill"] == 7
    assert isinstance(got[dead], str) and got[dead].startswith(dead)
    assert cores.normalize("http://h:9/metrics") == "http://h:9/metrics" and cores.normalize("h:9/") == "http://h:9/metrics"
