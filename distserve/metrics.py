"""Prometheus metrics of one service process, on its own registry and HTTP port.

Names follow Prometheus conventions with a `distserve_` prefix (counters end in `_total` on the wire,
durations are in seconds, sizes in bytes). Every service creates one `Metrics` and updates it from its
servicers; gauges that mirror engine state are refreshed by the worker's heartbeat, and the router's
pool gauges by each read of the registry. The series, by who exports them:

| series | labels | router | prefill | decode |
|---|---|---|---|---|
| `distserve_requests_total` | role, outcome | finished, failed, cancelled, rejected (invalid), unavailable (no worker serves the model yet), shed (refused by admission control) | held, finished, failed, cancelled | finished, failed, cancelled |
| `distserve_ttft_seconds`, `distserve_tpot_seconds`, `distserve_e2e_seconds` | | x | | |
| `distserve_queue_seconds` | role | | x | x |
| `distserve_queue_depth`, `distserve_queued_tokens`, `distserve_running_requests` | role | | x | x |
| `distserve_inflight_requests`, `distserve_draining` | role | x | x | x |
| `distserve_kv_blocks_used`, `distserve_kv_blocks_total` | role | | x | x |
| `distserve_kv_leases_held` | | | x | |
| `distserve_kv_transfer_seconds`, `distserve_kv_transfer_bytes_total` | transport | | | x |
| `distserve_disaggregation_decisions_total` | decision | x | | x |
| `distserve_disagg_decision_total` | decision (local, remote) | x | | |
| `distserve_retries_total` | leg | x | | x |
| `distserve_migrations_total` | reason | x | | |
| `distserve_ejections_total` | | x | | |
| `distserve_generated_tokens_total` | role | x | x | x |
| `distserve_pool_workers`, `distserve_pool_queue_depth`, `distserve_pool_queued_tokens`, `distserve_pool_running_requests`, `distserve_pool_kv_blocks_free`, `distserve_pool_kv_blocks_total` | role | x | | |
| `distserve_info` | role, model, instance_id | x | x | x |
| `distserve_registry_up` | | x | | |
| `distserve_requests_expired_total` | | x | | |
| `distserve_native_kernels` | kernel | | x | x |
| `distserve_prefix_cache_queried_tokens_total`, `distserve_prefix_cache_hit_tokens_total` | role | x (as workers reported per request) | x | x |
| `distserve_prefix_cache_evictions_total`, `distserve_prefix_cache_blocks` | role | | x | x |
| `distserve_engine_busy_seconds_total`, `distserve_engine_steps_total` | role, step (decode, mixed, prefill) | | x | x |
| `distserve_engine_prompt_tokens_total`, `distserve_engine_threads` | role | | x | x |
| `process_cpu_seconds_total`, `process_resident_memory_bytes` and the rest of Prometheus' process series | | x | x | x |

Prefix-cache hit rate: `rate(distserve_prefix_cache_hit_tokens_total[5m]) / rate(distserve_prefix_cache_queried_tokens_total[5m])`
(per worker, or the router's for the whole pool).
| `distserve_spec_draft_tokens_total`, `distserve_spec_accepted_tokens_total` | role | | | x |
| `distserve_decode_sequence_steps_total`, `distserve_decode_step_tokens_total` | role | | | x |
| `distserve_spec_acceptance_rate`, `distserve_spec_tokens_per_step` | role | | | x |

Speculative decoding (decode and colocated workers, `--speculative`): draft tokens verified and
accepted; sequence-steps of decoding (one per running request per engine step) and the tokens they
produced, so `rate(..._step_tokens_total) / rate(..._sequence_steps_total)` is tokens per step (1
without speculation); the two gauges are the same ratios since the process started.

Where a worker's cores go: `sum by (instance) (rate(distserve_engine_busy_seconds_total[1m]))` is the
share of the time its engine was running steps (1: it never waited for work), split by `step` into
decode-only, prompt-only and mixed steps; beside `rate(process_cpu_seconds_total[1m])` (every thread of
the process, the gRPC and KV threads too) it shows what is spent outside steps. `distserve bench serve
--scrape URL` prints both for each worker over the run (benchmarks/README.md).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from distserve.engine.step_times import STEP_KINDS  # standard library only: routers still load no torch

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

POOL_ROLES = ("prefill", "decode", "colocated")
# why a router replayed a request: its prefill call failed; its prefilled KV was lost before a decode
# worker pulled it; its decode stream broke; its decode stream stalled past the stall timeout
MIGRATION_REASONS = ("prefill_failed", "kv_lost", "decode_failed", "decode_stalled")


class NativeKernels:
    """`distserve_native_kernels{kernel}`: 1 where this process runs the kernel's native build, 0 where it
    asked for one and runs the slower torch path; read at each scrape from what the engine loaded
    (distserve.engine.kernels.status()), so no series until it asks, and none in a router."""

    def describe(self):
        yield GaugeMetricFamily("distserve_native_kernels", "1 per native kernel in use, 0 per kernel on the torch fallback", labels=["kernel"])

    def collect(self):
        family = next(self.describe())
        loaded = sys.modules.get("distserve.engine.kernels")  # never imported here: routers need not load the engine
        for name, st in (loaded.status().items() if loaded else ()):
            family.add_metric([name], float(st.native))
        yield family


class EngineTime:
    """Where a worker's engine spent its time since start, read at each scrape from its latest stats
    (`source()`: (role, EngineStats, compute threads), or None before the engine runs):
    `distserve_engine_busy_seconds_total{role, step}` and `distserve_engine_steps_total{role, step}` by
    what a step carried (`decode`: running decodes only; `prefill`: prompt chunks only; `mixed`: both),
    `distserve_engine_prompt_tokens_total{role}`, the prompt tokens its steps computed, and
    `distserve_engine_threads{role}`, the threads it computes with (the cores it is given)."""

    def __init__(self, source: Callable[[], tuple | None]):
        self.source = source

    def describe(self):
        yield CounterMetricFamily("distserve_engine_busy_seconds", "Seconds the engine spent in steps, by what the step carried", labels=["role", "step"])
        yield CounterMetricFamily("distserve_engine_steps", "Engine steps, by what the step carried", labels=["role", "step"])
        yield CounterMetricFamily("distserve_engine_prompt_tokens", "Prompt tokens computed in engine steps (prefix-cache hits excluded)", labels=["role"])
        yield GaugeMetricFamily("distserve_engine_threads", "Threads the engine computes with", labels=["role"])

    def collect(self):
        busy, steps, prompt, threads = self.describe()
        now = self.source()
        if now is not None:
            role, st, n = now
            threads.add_metric([role], n)
            for kind, seconds, count in zip(STEP_KINDS, st.step_seconds, st.step_counts):
                busy.add_metric([role, kind], seconds)
                steps.add_metric([role, kind], count)
            prompt.add_metric([role], st.prompt_tokens_computed)
        yield from (busy, steps, prompt, threads)


class Metrics:
    def __init__(self, role: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.role = role
        # requests and latency
        self.requests = Counter("distserve_requests", "Requests ended, by outcome", ["role", "outcome"], registry=r)
        self.ttft = Histogram("distserve_ttft_seconds", "Time to first token, as the router saw it", registry=r, buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("distserve_tpot_seconds", "Time per output token after the first", registry=r, buckets=TPOT_BUCKETS)
        self.e2e = Histogram("distserve_e2e_seconds", "End-to-end request latency", registry=r, buckets=LATENCY_BUCKETS)
        self.queue_seconds = Histogram("distserve_queue_seconds", "Time a request waited for the engine (prefill) or for KV blocks (decode)", ["role"], registry=r, buckets=LATENCY_BUCKETS)
        self.tokens = Counter("distserve_generated_tokens", "Tokens generated", ["role"], registry=r)
        # this process's load
        self.queue_depth = Gauge("distserve_queue_depth", "Requests waiting for the engine", ["role"], registry=r)
        self.queued_tokens = Gauge("distserve_queued_tokens", "Prompt tokens waiting for prefill", ["role"], registry=r)
        self.running = Gauge("distserve_running_requests", "Requests in the running batch", ["role"], registry=r)
        self.inflight = Gauge("distserve_inflight_requests", "RPCs this process is serving now", ["role"], registry=r)
        self.draining = Gauge("distserve_draining", "1 while the process drains before it exits", ["role"], registry=r)
        self.kv_blocks_used = Gauge("distserve_kv_blocks_used", "KV blocks in use", ["role"], registry=r)
        self.kv_blocks_total = Gauge("distserve_kv_blocks_total", "KV blocks in the cache", ["role"], registry=r)
        self.kv_leases = Gauge("distserve_kv_leases_held", "Prefilled KV held under a lease for a decode worker", registry=r)
        # KV data plane and routing
        self.transfer_seconds = Histogram("distserve_kv_transfer_seconds", "Time to pull one request's KV, by transport", ["transport"], registry=r, buckets=TRANSFER_BUCKETS)
        self.transfer_bytes = Counter("distserve_kv_transfer_bytes", "KV bytes pulled, by transport", ["transport"], registry=r)
        self.decisions = Counter("distserve_disaggregation_decisions", "Where a request's prefill ran", ["decision"], registry=r)
        self.disagg_decisions = Counter("distserve_disagg_decision", "The router's choice of where to prefill a prompt: on its decode worker (local) or the prefill pool (remote)", ["decision"], registry=r)
        self.retries = Counter("distserve_retries", "Calls retried, by leg (prefill, decode, kv_pull)", ["leg"], registry=r)
        self.migrations = Counter("distserve_migrations", "Requests replayed on other workers after a leg failed, by reason", ["reason"], registry=r)
        self.ejections = Counter("distserve_ejections", "Workers ejected from the picker for a cool-down after repeated failures", registry=r)
        # the pools, as the router's last read of the registry saw them
        self.pool_workers = Gauge("distserve_pool_workers", "Live, non-draining workers", ["role"], registry=r)
        self.pool_queue_depth = Gauge("distserve_pool_queue_depth", "Requests queued on the pool's workers", ["role"], registry=r)
        self.pool_queued_tokens = Gauge("distserve_pool_queued_tokens", "Prompt tokens queued on the pool's workers", ["role"], registry=r)
        self.pool_running = Gauge("distserve_pool_running_requests", "Requests running on the pool's workers", ["role"], registry=r)
        self.pool_blocks_free = Gauge("distserve_pool_kv_blocks_free", "Free KV blocks on the pool's workers", ["role"], registry=r)
        self.pool_blocks_total = Gauge("distserve_pool_kv_blocks_total", "KV blocks on the pool's workers", ["role"], registry=r)
        # automatic prefix caching (prompt tokens looked up / found at admission; cached blocks reused for other data)
        self.prefix_queried = Counter("distserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache", ["role"], registry=r)
        self.prefix_hits = Counter("distserve_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache", ["role"], registry=r)
        self.prefix_evictions = Counter("distserve_prefix_cache_evictions", "Cached KV blocks evicted to make room", ["role"], registry=r)
        self.prefix_blocks = Gauge("distserve_prefix_cache_blocks", "KV blocks holding a cached prefix (in use or evictable)", ["role"], registry=r)
        self._prefix_seen = (0, 0, 0)  # the engine's cumulative (queried, hits, evictions) at the last observe_engine
        self.info = Gauge("distserve_info", "Always 1; labels name the process", ["role", "model", "instance_id"], registry=r)
        # Redis outages and dead routers, as this router sees them
        self.registry_up = Gauge("distserve_registry_up", "1 while the worker registry in Redis is readable, 0 while the router routes from its last read", registry=r)
        self.expired = Counter("distserve_requests_expired", "Requests of dead routers this router closed as EXPIRED", registry=r)
        # speculative decoding (worker roles that decode), as counters mirrored from the engine's own
        self.spec_drafted = Counter("distserve_spec_draft_tokens", "Speculative draft tokens verified", ["role"], registry=r)
        self.spec_accepted = Counter("distserve_spec_accepted_tokens", "Speculative draft tokens accepted", ["role"], registry=r)
        self.decode_steps = Counter("distserve_decode_sequence_steps", "Decode steps per sequence (one per running request per engine step)", ["role"], registry=r)
        self.decode_step_tokens = Counter("distserve_decode_step_tokens", "Tokens those sequence-steps produced (more than one per step where drafts were accepted)", ["role"], registry=r)
        self.spec_acceptance = Gauge("distserve_spec_acceptance_rate", "Share of verified draft tokens accepted, since start", ["role"], registry=r)
        self.spec_tokens_per_step = Gauge("distserve_spec_tokens_per_step", "Tokens per decode sequence-step, since start (1 without speculation)", ["role"], registry=r)
        self._engine_counts = (0, 0, 0, 0)  # the engine's cumulative figures at the last observe_engine
        r.register(NativeKernels())
        ProcessCollector(registry=r)  # process_cpu_seconds_total and the rest, as every Prometheus exporter has
        # zero-valued children, so every series is scrapeable before its first event
        for outcome in ("finished", "failed", "cancelled"):
            self.requests.labels(role, outcome)
        for gauge in (self.inflight, self.draining):
            gauge.labels(role).set(0)
        for decision in ("disaggregated", "colocated", "local_prefill"):
            self.decisions.labels(decision)
        for leg in ("prefill", "decode", "kv_pull"):
            self.retries.labels(leg)
        for counter in (self.prefix_queried, self.prefix_hits):
            counter.labels(role)
        self.registry_up.set(1)  # until a read of the registry fails
        if role == "router":
            for reason in MIGRATION_REASONS:
                self.migrations.labels(reason)
            for decision in ("local", "remote"):
                self.disagg_decisions.labels(decision)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Starts the HTTP endpoint; port 0 picks a free one. Returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

    def watch_engine(self, source: Callable[[], tuple | None]) -> None:
        """Exports where the engine's time goes (EngineTime), read from `source` at each scrape."""
        self.registry.register(EngineTime(source))

    def set_info(self, model: str, instance_id: str) -> None:
        self.info.labels(self.role, model, instance_id).set(1)

    def observe_engine(self, stats, inflight: int = 0, draining: bool = False) -> None:
        role = self.role
        self.queue_depth.labels(role).set(stats.queued_requests)
        self.queued_tokens.labels(role).set(stats.queued_tokens)
        self.running.labels(role).set(stats.running_requests)
        self.kv_blocks_used.labels(role).set(stats.total_blocks - stats.free_blocks)
        self.kv_blocks_total.labels(role).set(stats.total_blocks)
        self.inflight.labels(role).set(inflight)
        self.draining.labels(role).set(int(draining))
        now = (getattr(stats, "prefix_query_tokens", 0), getattr(stats, "prefix_hit_tokens", 0), getattr(stats, "prefix_evictions", 0))
        for counter, new, old in zip((self.prefix_queried, self.prefix_hits, self.prefix_evictions), now, self._prefix_seen):
            if new > old:
                counter.labels(role).inc(new - old)
        self._prefix_seen = now
        self.prefix_blocks.labels(role).set(getattr(stats, "prefix_cached_blocks", 0))
        counts = (getattr(stats, "spec_drafted_tokens", 0), getattr(stats, "spec_accepted_tokens", 0),
                  getattr(stats, "decode_seq_steps", 0), getattr(stats, "decode_seq_tokens", 0))
        if counts != self._engine_counts:
            for counter, now, before in zip((self.spec_drafted, self.spec_accepted, self.decode_steps, self.decode_step_tokens), counts, self._engine_counts):
                if now > before:
                    counter.labels(role).inc(now - before)
            self._engine_counts = counts
            drafted, accepted, steps, tokens = counts
            if drafted:
                self.spec_acceptance.labels(role).set(accepted / drafted)
            if steps:
                self.spec_tokens_per_step.labels(role).set(tokens / steps)

    def observe_pool(self, views: Iterable) -> None:
        """Pool gauges from registry views (`WorkerView`: .info.role and .load)."""
        sums = {role: [0, 0, 0, 0, 0, 0] for role in POOL_ROLES}
        for v in views:
            s = sums.setdefault(v.info.role, [0, 0, 0, 0, 0, 0])
            ld = v.load
            for i, x in enumerate((1, ld.queued_requests, ld.queued_tokens, ld.running_requests, ld.free_blocks, ld.total_blocks)):
                s[i] += x
        gauges = (self.pool_workers, self.pool_queue_depth, self.pool_queued_tokens, self.pool_running, self.pool_blocks_free, self.pool_blocks_total)
        for role, s in sums.items():
            for gauge, x in zip(gauges, s):
                gauge.labels(role).set(x)
