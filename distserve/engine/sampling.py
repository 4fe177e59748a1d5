"""Sampling parameters, their validation, and stop-string matching.

`SamplingParams` is what a caller asks for; `validate_request` checks a prompt and its params
against the model before anything touches the model, raising `InvalidRequest` that names the field
and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from distserve.errors import InvalidRequest

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens to generate, the first (prefill) token included
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None  # same seed, same tokens, whatever else is batched
    stop: tuple[str, ...] = ()  # stop strings; the text before the first match is kept
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end generation
    ignore_eos: bool = False  # keep going past the model's end-of-sequence tokens
    logprobs: bool = False  # report the log-probability of each sampled token
    top_logprobs: int = 0  # also report the k most likely tokens and their log-probs at each position (needs logprobs)
    min_tokens: int = 0  # no EOS, stop token or stop string ends the output before this many tokens (output_offset included)
    output_offset: int = 0  # output tokens produced before this call (a replay); seeded draws continue from there
    extra: dict = field(default_factory=dict, compare=False)  # caller metadata, never read here

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_request(
    prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int
) -> None:
    """Raises InvalidRequest for the first thing wrong with this request."""
    if len(prompt_token_ids) == 0:
        raise InvalidRequest("prompt", "must not be empty")
    if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        raise InvalidRequest("max_tokens", f"must be an integer >= 1, got {params.max_tokens}")
    if len(prompt_token_ids) + params.max_tokens > max_model_len:
        raise InvalidRequest(
            "max_tokens",
            f"prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({params.max_tokens}) "
            f"exceeds the model's context of {max_model_len} tokens",
        )
    if not (0.0 <= params.temperature < math.inf):  # NaN and inf fail too
        raise InvalidRequest("temperature", f"must be finite and >= 0, got {params.temperature}")
    if not (0.0 < params.top_p <= 1.0):
        raise InvalidRequest("top_p", f"must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise InvalidRequest("top_k", f"must be >= 0 (0 = off), got {params.top_k}")
    if not isinstance(params.output_offset, int) or params.output_offset < 0:
        raise InvalidRequest("output_offset", f"must be an integer >= 0, got {params.output_offset}")
    if not isinstance(params.min_tokens, int) or not 0 <= params.min_tokens <= params.output_offset + params.max_tokens:
        raise InvalidRequest("min_tokens", f"must be an integer in [0, max_tokens ({params.output_offset + params.max_tokens})], got {params.min_tokens}")
    if not isinstance(params.top_logprobs, int) or not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}")
    if params.top_logprobs and not params.logprobs:
        raise InvalidRequest("top_logprobs", "requires logprobs to be set")
    if params.seed is not None and not (0 <= params.seed < 2**63):
        raise InvalidRequest("seed", f"must be in [0, 2**63), got {params.seed}")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest("prompt", f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest("stop_token_ids", f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    if any(not s for s in params.stop):
        raise InvalidRequest("stop", "stop strings must not be empty")


def find_stop(text: str, stops: tuple[str, ...], new_from: int) -> int | None:
    """Index in `text` where the earliest stop string begins, searching only matches that end at
    or after `new_from` (text before it was already checked); None when there is none."""
    best = None
    for s in stops:
        start = max(0, new_from - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best
