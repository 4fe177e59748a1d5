"""How an engine is set up (`EngineConfig`): its role, KV capacity, step budget, weights and KV
formats, prefix caching and speculative decoding, each checked when the config is made."""

from __future__ import annotations

from dataclasses import dataclass

from distserve.engine import quant
from distserve.engine.speculative import METHODS as SPEC_METHODS

MODES = ("prefill", "decode", "colocated")
WEIGHTS = ("auto", "fp32", "int8")
KV_DTYPES = ("auto", "int8")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    mode: str = "colocated"  # prefill: hold KV after the first token; decode/colocated: run to the end
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV capacity in blocks; overrides kv_cache_bytes
    kv_cache_bytes: int = 1 << 30  # KV capacity in bytes when num_blocks is unset
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill tokens + decodes)
    max_num_seqs: int = 64  # most sequences in one step
    chunked_prefill: bool = False  # mix prompt chunks into decode steps (colocated/decode modes)
    tpot_target_s: float = 0.0  # chunked: a step with running decodes takes only the prompt tokens that keep it within this (0 = no cap)
    seed: int | None = None  # seeds sampling of requests that bring no seed
    weights: str = "fp32"  # linear layers: "fp32" (the model's dtype), "int8" or "auto" (weights.resolve_format)
    kv_dtype: str = "auto"  # KV cache: "auto" (the model's dtype) or "int8" (per-block scales)
    prefill_gemm: str = "auto"  # CPU int8 weights, batches of 512+ rows: "native" kernel, "fp32" or "bf16" GEMM, "auto" (quant.resolve_prefill_gemm)
    share_weights: bool | str = False  # weights from a read-only map of a file the host's workers share; "auto": int8 only
    free_model_weights: bool = False  # drop the LoadedModel's own weights once the runner has its own (workers)
    prefix_caching: bool = False  # keep computed full blocks by prefix hash and reuse them for later prompts (workers: on by default, --prefix-cache; off here so engine benchmarks time every token)
    speculative: str = "none"  # decode/colocated: "ngram" drafts by prompt lookup, "draft" with a draft model; verified in the step (speculative.py)
    speculative_k: int = 5  # most draft tokens per request and step (fewer when its drafts are rarely accepted)
    speculative_adaptive: bool = True  # False: verify every draft up to speculative_k (measures the drafts' own acceptance)
    draft_model: str = ""  # speculative="draft": a smaller model sharing the tokenizer ("": a self-draft of this model's first layers)
    draft_layers: int = 0  # self-draft: layers kept (0 = a quarter of the model's)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.share_weights not in (True, False, "auto"):
            raise ValueError(f"share_weights must be True, False or 'auto', got {self.share_weights!r}")
        if self.speculative not in SPEC_METHODS:
            raise ValueError(f"speculative must be one of {SPEC_METHODS}, got {self.speculative!r}")
        if self.speculative_k < 1:
            raise ValueError(f"speculative_k must be >= 1, got {self.speculative_k}")
        if self.draft_layers < 0:
            raise ValueError(f"draft_layers must be >= 0, got {self.draft_layers}")
        if self.prefill_gemm not in quant.PREFILL_GEMMS:
            raise ValueError(f"prefill_gemm must be one of {quant.PREFILL_GEMMS}, got {self.prefill_gemm!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        if not self.tpot_target_s >= 0:
            raise ValueError(f"tpot_target_s must be >= 0, got {self.tpot_target_s}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
