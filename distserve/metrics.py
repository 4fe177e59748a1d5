"""Prometheus metrics of one service process, on its own registry and HTTP port.

Names follow Prometheus conventions with a `distserve_` prefix; every service creates one `Metrics`
and updates it from its servicers. Gauges that mirror engine state are refreshed by the heartbeat.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)


class Metrics:
    def __init__(self, role: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.role = role
        self.requests = Counter("distserve_requests", "Requests finished, by outcome", ["role", "outcome"], registry=r)
        self.ttft = Histogram("distserve_ttft_seconds", "Time to first token", registry=r, buckets=LATENCY_BUCKETS)
        self.tpot = Histogram("distserve_tpot_seconds", "Time per output token after the first", registry=r, buckets=TPOT_BUCKETS)
        self.e2e = Histogram("distserve_e2e_seconds", "End-to-end request latency", registry=r, buckets=LATENCY_BUCKETS)
        self.queue_depth = Gauge("distserve_queue_depth", "Requests waiting for the engine", ["role"], registry=r)
        self.queued_tokens = Gauge("distserve_queued_tokens", "Prompt tokens waiting for prefill", ["role"], registry=r)
        self.running = Gauge("distserve_running_requests", "Requests in the running batch", ["role"], registry=r)
        self.kv_blocks_used = Gauge("distserve_kv_blocks_used", "KV blocks in use", ["role"], registry=r)
        self.kv_blocks_total = Gauge("distserve_kv_blocks_total", "KV blocks in the cache", ["role"], registry=r)
        self.kv_leases = Gauge("distserve_kv_leases_held", "Prefilled KV held for decode workers", registry=r)
        self.transfer_seconds = Counter("distserve_kv_transfer_seconds", "Time spent pulling KV, by transport", ["transport"], registry=r)
        self.transfer_bytes = Counter("distserve_kv_transfer_bytes", "KV bytes pulled, by transport", ["transport"], registry=r)
        self.decisions = Counter("distserve_disaggregation_decisions", "Where a request's prefill ran", ["decision"], registry=r)
        self.retries = Counter("distserve_retries", "Calls to a worker retried on another one", ["leg"], registry=r)
        self.tokens = Counter("distserve_generated_tokens", "Tokens generated", ["role"], registry=r)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Starts the HTTP endpoint; port 0 picks a free one. Returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

    def observe_engine(self, stats) -> None:
        role = self.role
        self.queue_depth.labels(role).set(stats.queued_requests)
        self.queued_tokens.labels(role).set(stats.queued_tokens)
        self.running.labels(role).set(stats.running_requests)
        self.kv_blocks_used.labels(role).set(stats.total_blocks - stats.free_blocks)
        self.kv_blocks_total.labels(role).set(stats.total_blocks)
