"""`RouterSettings`: what `distserve serve router` is configured by (flags and `DISTSERVE_*`).

Torch-free and light, like the router: `distserve serve router --help`, `distserve settings` and the
CLI's parser read it without importing the router's request path.
"""

from __future__ import annotations

from dataclasses import dataclass

from distserve.config import setting
from distserve.errors import InvalidRequest
from distserve.rpc.auth import ApiKeys
from distserve.rpc.tls import TlsSettings


@dataclass(frozen=True, slots=True)
class RouterSettings(TlsSettings):
    model: str = setting("smollm2-135m", "model served (its tokenizer is loaded here)")
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(50051, "gRPC port of the public API (0 = any free port)")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis holding the registry and request state")
    redis_max_connections: int = setting(64, "Redis connections this router opens at most; a call that finds them all busy waits up to redis_timeout_s")
    redis_timeout_s: float = setting(0.5, "a Redis call (connect, reply, wait for a pooled connection) gives up after this long (retried once); the router then routes from its last registry read")
    refresh_s: float = setting(0.2, "longest time between two reads of the worker registry")
    prefill_timeout_s: float = setting(120.0, "deadline of one prefill call")
    migration_limit: int = setting(3, "replays of one request on other workers after a leg fails (0 = fail at once)")
    stall_timeout_s: float = setting(20.0, "a decode leg that sends nothing for this long is given up and its request replayed elsewhere")
    eject_after: int = setting(3, "failures in a row after which a worker is left out of routing for a cool-down")
    eject_s: float = setting(10.0, "first cool-down of an ejected worker (doubles while it keeps failing, up to 12x)")
    state_ttl_s: float = setting(3600.0, "how long request state stays in Redis")
    heartbeat_s: float = setting(2.0, "how often this router renews its presence in Redis")
    router_ttl_s: float = setting(10.0, "this router's presence lifetime without a heartbeat; after it, other routers close its open requests as EXPIRED")
    reap_s: float = setting(5.0, "how often this router looks for dead routers' open requests to close")
    metrics_port: int = setting(0, "Prometheus HTTP port (0 = any free port, -1 = off)")
    api_keys_file: str = setting("", "file of API keys clients must send (authorization: Bearer <key>), one a line or sha256:<hex>; empty and no api_keys = no authentication")
    api_keys: str = setting("", "API keys, comma-separated (prefer DISTSERVE_API_KEYS or the file: flags show in ps)")
    http_port: int = setting(-1, "OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, /v1/models; 0 = any free port, -1 = off)")
    drain_s: float = setting(30.0, "grace period for in-flight requests on shutdown")
    max_inflight: int = setting(512, "requests this router serves at once; more are refused at once with RESOURCE_EXHAUSTED and a retry-after-ms hint")
    max_queued_tokens: int = setting(262144, "prompt tokens of admitted requests not yet prefilled; a request that would pass it is refused like one past max_inflight")
    retry_after_ms: int = setting(500, "retry-after-ms hint sent with a refusal")
    max_prompt_bytes: int = setting(1 << 20, "largest text prompt in UTF-8 bytes, checked before tokenizing (INVALID_ARGUMENT beyond)")
    max_prompt_tokens: int = setting(1 << 17, "largest token-id prompt (and resumed tokens), checked before anything else reads them")
    disagg_mode: str = setting("remote", "where prompts are prefilled: remote = the prefill pool, then the KV moves to a decode worker; local = on the decode worker itself (no KV transfer); conditional = per request, local when the decode worker is expected to give its first token sooner than the prefill pool by disagg_margin_s (docs/conditional-disaggregation.md)", ("conditional", "remote", "local"))
    local_max_prompt_tokens: int = setting(0, "conditional: prompts longer than this always prefill on the prefill pool (0 = no cap: the rule weighs every prompt by its length)")
    disagg_margin_s: float = setting(0.2, "conditional: how much sooner (seconds) a local prefill must be expected to give the first token than the prefill pool (queue, compute and KV transfer) to be chosen")
    routing: str = setting("kv", "how a prefill worker is chosen: kv = the fewest tokens to compute before the prompt's first token (its queue plus the part of the prompt it has not cached, from the prefix caches workers publish); load = the least queued tokens, caches ignored (docs/prefix-caching.md)", ("kv", "load"))
    tls_client_certs: bool = setting(False, "with TLS: clients of the public APIs must also present a certificate from tls_ca (mutual TLS), besides any API key")

    def __post_init__(self):
        rules = (  # (setting, valid?, what it must be); every failure is named at start
            ("port", 0 <= self.port <= 65535, "a TCP port (0 = any)"),
            ("metrics_port", -1 <= self.metrics_port <= 65535, "a TCP port (0 = any, -1 = off)"),
            ("http_port", -1 <= self.http_port <= 65535, "a TCP port (0 = any, -1 = off)"),
            ("redis_url", self.redis_url.startswith(("redis://", "rediss://", "unix://")), "a redis://, rediss:// or unix:// URL"),
            ("refresh_s", self.refresh_s > 0, "> 0"),
            ("prefill_timeout_s", self.prefill_timeout_s > 0, "> 0"),
            ("migration_limit", self.migration_limit >= 0, ">= 0"),
            ("stall_timeout_s", self.stall_timeout_s > 0, "> 0"),
            ("eject_after", self.eject_after >= 1, ">= 1"),
            ("eject_s", self.eject_s > 0, "> 0"),
            ("state_ttl_s", self.state_ttl_s > 0, "> 0"),
            ("redis_max_connections", self.redis_max_connections >= 1, ">= 1"),
            ("redis_timeout_s", self.redis_timeout_s > 0, "> 0"),
            ("heartbeat_s", self.heartbeat_s > 0, "> 0"),
            ("router_ttl_s", self.router_ttl_s > self.heartbeat_s, f"more than heartbeat_s ({self.heartbeat_s})"),
            ("reap_s", self.reap_s > 0, "> 0"),
            ("drain_s", self.drain_s >= 0, ">= 0"),
            ("max_inflight", self.max_inflight >= 1, ">= 1"),
            ("max_queued_tokens", self.max_queued_tokens >= 1, ">= 1"),
            ("retry_after_ms", self.retry_after_ms >= 0, ">= 0"),
            ("max_prompt_bytes", self.max_prompt_bytes >= 1, ">= 1"),
            ("max_prompt_tokens", self.max_prompt_tokens >= 1, ">= 1"),
            ("local_max_prompt_tokens", self.local_max_prompt_tokens >= 0, ">= 0"),
            ("disagg_margin_s", self.disagg_margin_s >= 0, ">= 0"),
        )
        bad = [f"{name} must be {what}, got {getattr(self, name)!r}" for name, ok, what in rules if not ok]
        bad += self.tls_problems()
        if self.tls_client_certs and not self.tls_cert:
            bad.append("tls_client_certs needs TLS (tls_ca, tls_cert, tls_key)")
        try:
            ApiKeys.load(self.api_keys_file, self.api_keys)
        except InvalidRequest as exc:
            bad.append(str(exc))
        if bad:
            raise ValueError("; ".join(bad))
