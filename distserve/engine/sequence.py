"""One request inside an engine, from arrival to the freeing of its blocks.

Lifecycle: WAITING (queued for prefill) -> RUNNING (has blocks; prefilled chunk by chunk, then
decoding) -> FINISHED. In a prefill-only engine a prefilled sequence becomes HELD: its blocks stay
allocated until `LLMEngine.free` (the KV lease ended). A sequence imported with transferred KV starts
RUNNING. Whoever moves a sequence to FINISHED frees its blocks in the same call. With prefix caching
its leading blocks may be shared with other sequences (taken from the cache at admission); freeing
drops its references, and the block manager keeps hashed blocks cached until it needs them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from distserve.engine.block_manager import blocks_needed
from distserve.engine.sampling import SamplingParams
from distserve.tokenization import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # aborted by the caller


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float  # monotonic time it reached the engine
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)  # physical block ids, in token order
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    detok: IncrementalDetokenizer | None = None  # its output as text, made token by token, only when stop strings are set
    first_scheduled_s: float | None = None  # when its prefill (or import) first ran
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed for it)
    block_hashes: list[int] = field(default_factory=list)  # prefix hashes of its full blocks, as far as computed
    num_registered: int = 0  # leading blocks offered to the prefix cache (or taken from it)
    spec: object | None = None  # speculative decoding's per-request state (speculative.SpecState), made on first draft

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def prefilled(self) -> bool:
        return self.num_computed_tokens >= len(self.prompt_token_ids)

    def token_id_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def blocks_needed(self, block_size: int) -> int:
        """Blocks for its whole life (block_manager.blocks_needed)."""
        return blocks_needed(len(self.prompt_token_ids), self.params.max_tokens, block_size)
