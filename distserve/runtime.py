"""What every model worker (prefill, decode, colocated) is configured by: `WorkerSettings`, and the
host facts its registry entry carries (`host_id`, `parse_cpus`).

Torch-free on purpose: `distserve serve ... --help`, `distserve settings` and the planner read these
settings without loading an engine. The process that runs a worker (engine thread, gRPC server,
heartbeat, shutdown in order) is `services.worker.runtime.WorkerRuntime`.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distserve.config import setting
from distserve.rpc.tls import TlsSettings

if TYPE_CHECKING:
    from distserve.engine.engine import EngineConfig


@dataclass(frozen=True, slots=True)
class WorkerSettings(TlsSettings):
    role: str = setting("decode", "what this worker does", ("prefill", "decode", "colocated"))
    model: str = setting("smollm2-135m", "model name, Hugging Face directory or .gguf path")
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(0, "gRPC port (0 = any free port)")
    advertise_host: str = setting("", "address peers use to reach this worker (default: host, or the hostname when binding 0.0.0.0)")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis holding the registry")
    redis_max_connections: int = setting(4, "Redis connections this worker opens at most (its heartbeat needs one)")
    redis_timeout_s: float = setting(0.5, "a Redis call (connect, reply, wait for a pooled connection) gives up after this long (retried once); the worker serves on and re-registers when Redis is back")
    worker_id: str = setting("", "unique id (default: role-hostname-random)")
    device: str = setting("auto", "auto, cpu or cuda[:N]")
    dtype: str = setting("auto", "weights and KV dtype", ("auto", "float32", "bfloat16", "float16"))
    threads: int = setting(0, "torch threads for the engine (0 = torch's default)")
    cpus: str = setting("", "CPU cores to pin this process to, e.g. 0-1 or 2,3 (empty = no pinning)")
    block_size: int = setting(16, "tokens per KV block")
    kv_cache_bytes: int = setting(1 << 30, "KV cache capacity in bytes")
    num_blocks: int = setting(0, "KV cache capacity in blocks (overrides kv_cache_bytes when > 0)")
    max_num_batched_tokens: int = setting(0, "token budget of one engine step; 0 = by role and device: 256 for a prefill worker on CPU (whose prefill rate is flat from about 200 tokens a step, so larger steps only delay first tokens), 2048 otherwise")
    max_num_seqs: int = setting(64, "most sequences in one engine step")
    chunked_prefill: bool = setting(False, "mix prompt chunks into decode steps (decode/colocated)")
    tpot_slo_ms: float = setting(60.0, "TPOT target of steps that carry prompt chunks (decode, and colocated with --chunked-prefill): a step with running decodes takes only the prompt tokens that keep its predicted time within it; decode workers then prefill the prompts routers send them without KV in such chunks (conditional disaggregation). Leave margin below the SLO you measure against; 0 = no cap, and decode workers prefill whole prompts unless --chunked-prefill")
    step_profile: str = setting("", "planner profile JSON (distserve profile) whose step model for this worker's threads and weights predicts step times for the TPOT cap, instead of the times measured online")
    lease_s: float = setting(30.0, "how long prefilled KV waits for a decode worker before it is freed")
    heartbeat_s: float = setting(0.5, "how often load is published to Redis")
    ttl_s: float = setting(3.0, "registry entry lifetime without a heartbeat")
    metrics_port: int = setting(0, "Prometheus HTTP port (0 = any free port, -1 = off)")
    drain_s: float = setting(30.0, "grace period for in-flight requests (and held KV) on shutdown")
    leave_s: float = setting(0.5, "on shutdown, how long requests routed before the worker left the registry are still accepted")
    seed: int = setting(0, "seed of tiny-llama's weights and of unseeded sampling")
    kv_transport: str = setting("auto", "KV transport: auto = the best both sides offer; a name forces it (a prefill worker then offers only it and grpc)", ("auto", "grpc", "gloo", "nccl", "shm", "mooncake"))
    kv_wire_dtype: str = setting("auto", "KV dtype on the wire when pulling (decode): auto = as cached; float16 or int8 (per-block scales) compress it", ("auto", "float16", "int8"))
    kv_idle_s: float = setting(60.0, "pairwise KV channels (torch.distributed groups, shared-memory segments) idle this long are closed")
    kv_buffer_bytes: int = setting(1 << 30, "warm KV receive buffers kept for reuse (decode), bytes")
    weights: str = setting("auto", "linear-layer weights: fp32 (the --dtype), int8, or auto (int8 on CPU for checkpoints, fp32 on CUDA and for tiny-llama; docs/quantization.md)", ("auto", "fp32", "int8"))
    prefill_gemm: str = setting("auto", "int8 weights on CPU, batches of 512 rows and more (prefill): native (the int8 kernel), fp32 or bf16 (a transient weight through oneDNN's GEMM; bf16 does not keep fp32's greedy tokens), or auto (native on AVX-512 VNNI CPUs, fp32 on the others; docs/quantization.md)", ("auto", "native", "fp32", "bf16"))
    kv_dtype: str = setting("auto", "KV cache dtype: auto (the --dtype) or int8 with per-block scales (prefill and decode workers must agree)", ("auto", "int8"))
    elastic: bool = setting(False, "prefill or decode worker: serve both roles' services and change role when asked (distserve role set, or the want_role field of its registry entry); it then needs the decode role's certificate and Redis user (docs/conditional-disaggregation.md)")
    prefix_cache: str = setting("on", "automatic prefix caching: keep computed KV blocks by the hash of their prefix and prefill only the uncached end of a prompt; the worker publishes what it holds so routers send prompts where their prefix is (docs/prefix-caching.md)", ("on", "off"))
    speculative: str = setting("none", "speculative decoding on decode and colocated workers: ngram drafts tokens by prompt lookup (matching the last tokens against the prompt and output so far), draft with a draft model (--draft-model); the drafts are verified in one step, and a request's drafts stop when they do not pay (docs/speculative-decoding.md)", ("none", "ngram", "draft"))
    speculative_k: int = setting(5, "most draft tokens per request and step (--speculative)")
    speculative_adaptive: bool = setting(True, "--speculative: choose k per request from its recent acceptance and the step-time fit, drafting nothing where it would not pay; false: verify every draft up to --speculative-k (to measure the drafts' own acceptance)")
    draft_model: str = setting("", "--speculative draft: a smaller model sharing the tokenizer (name, Hugging Face directory or .gguf); empty = a self-draft of the model's first --draft-layers layers and its head")
    draft_layers: int = setting(0, "--speculative draft without --draft-model: layers of the model the self-draft keeps (0 = a quarter)")
    share_weights: str = setting("auto", "map the weights read-only from a file every worker on the host shares: on, off, or auto (on for int8, off for fp32, whose private packed copy is faster)", ("auto", "on", "off"))

    def __post_init__(self):
        rules = (  # (setting, valid?, what it must be); every failure is named at start
            ("port", 0 <= self.port <= 65535, "a TCP port (0 = any)"),
            ("metrics_port", -1 <= self.metrics_port <= 65535, "a TCP port (0 = any, -1 = off)"),
            ("redis_url", self.redis_url.startswith(("redis://", "rediss://", "unix://")), "a redis://, rediss:// or unix:// URL"),
            ("device", re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device), "auto, cpu or cuda[:N]"),
            ("threads", self.threads >= 0, ">= 0"),
            ("cpus", re.fullmatch(r"(\d+(-\d+)?(,\d+(-\d+)?)*)?", self.cpus), "a core list like 0-1 or 2,3"),
            ("block_size", self.block_size >= 1, ">= 1"),
            ("kv_cache_bytes", self.kv_cache_bytes >= 1, ">= 1"),
            ("num_blocks", self.num_blocks >= 0, ">= 0"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 0, ">= 0 (0 = by role and device)"),
            ("max_num_seqs", self.max_num_seqs >= 1, ">= 1"),
            ("lease_s", self.lease_s > 0, "> 0"),
            ("heartbeat_s", self.heartbeat_s > 0, "> 0"),
            ("ttl_s", self.ttl_s > self.heartbeat_s, f"more than heartbeat_s ({self.heartbeat_s})"),
            ("redis_max_connections", self.redis_max_connections >= 1, ">= 1"),
            ("redis_timeout_s", self.redis_timeout_s > 0, "> 0"),
            ("drain_s", self.drain_s >= 0, ">= 0"),
            ("leave_s", 0 <= self.leave_s <= self.drain_s, f"between 0 and drain_s ({self.drain_s})"),
            ("kv_idle_s", self.kv_idle_s > 0, "> 0"),
            ("kv_buffer_bytes", self.kv_buffer_bytes >= 0, ">= 0"),
            ("tpot_slo_ms", self.tpot_slo_ms >= 0, ">= 0"),
            ("speculative_k", self.speculative_k >= 1, ">= 1"),
            ("draft_layers", self.draft_layers >= 0, ">= 0"),
        )
        bad = [f"{name} must be {what}, got {getattr(self, name)!r}" for name, ok, what in rules if not ok]
        bad += self.tls_problems()
        if bad:
            raise ValueError("; ".join(bad))

    def engine_config(self, mode: str) -> "EngineConfig":
        from distserve.engine.engine import EngineConfig  # torch: only where an engine is built
        from distserve.engine.models import pick_device

        return EngineConfig(
            mode=mode,
            block_size=self.block_size,
            num_blocks=self.num_blocks or None,
            kv_cache_bytes=self.kv_cache_bytes,
            max_num_batched_tokens=self.max_num_batched_tokens or step_tokens(mode, pick_device(self.device).type),
            max_num_seqs=self.max_num_seqs,
            chunked_prefill=self.chunked_prefill or (self.role == "decode" and self.tpot_slo_ms > 0),
            tpot_target_s=self.tpot_slo_ms / 1000,
            seed=self.seed,
            weights=self.weights,
            kv_dtype=self.kv_dtype,
            prefill_gemm=self.prefill_gemm,
            share_weights={"on": True, "off": False}.get(self.share_weights, "auto"),
            free_model_weights=True,  # the worker's LoadedModel serves nothing else
            prefix_caching=self.prefix_cache == "on",
            speculative=self.speculative,  # the engine drafts only where it decodes (not in prefill mode)
            speculative_k=self.speculative_k,
            speculative_adaptive=self.speculative_adaptive,
            draft_model=self.draft_model,
            draft_layers=self.draft_layers,
        )


STEP_TOKENS = 2048  # an engine step's token budget unless the role and device set another
CPU_PREFILL_STEP_TOKENS = 256  # a prefill worker's on CPU (benchmarks/README.md, "Update at `53dceb1`")


def step_tokens(role: str, device: str) -> int:
    """The default token budget of an engine step (`--max-num-batched-tokens 0`) for a role ("prefill":
    a prefill worker's engine, anything else: one that decodes) on a device ("cpu", or a GPU's).

    A prefill worker on CPU takes 256 tokens a step: from about 200 prompt tokens a step its prefill
    rate is flat (one core of the AVX-512 EPYC: 584 tokens/s for one 176-token prompt a step, 559 for
    eight 256-token ones), so a larger budget only holds every prompt of a step until the last one is
    done: with 2048 a chat prompt waited for seven others. A longer prompt still goes alone in one
    step. A GPU gains from large batches up to thousands of tokens, and decoding engines' steps are cut
    by their TPOT target: they keep 2048."""
    return CPU_PREFILL_STEP_TOKENS if role == "prefill" and device == "cpu" else STEP_TOKENS


def parse_cpus(spec: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, spec.split(",")):
        a, _, b = part.partition("-")
        cpus.update(range(int(a), int(b or a) + 1))
    return cpus


def host_id() -> str:
    """Identity of this host for same-host transports (boot id + hostname)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown"
    return f"{socket.gethostname()}:{boot}"
