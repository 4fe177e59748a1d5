"""Which sequences run in the next forward pass.

Queues: `waiting` (admitted by the caller, no blocks yet) -> `prefilling` (blocks reserved, prompt
partly computed; only with chunked prefill) -> `running` (prompt computed, decoding). A sequence
leaves `waiting` only when the block manager can give it every block it will ever need (prompt only
on a prefill-only engine), so admission never over-commits and running sequences are never preempted.

Policies:
- prefill-only (`hold_after_prefill`): batches waiting prompts up to the token budget.
- prefill priority (vLLM's default without chunking): a step is either all prefill or all decode;
  prefill goes first whenever a waiting prompt fits.
- chunked prefill: every running sequence decodes one token and the rest of the token budget is
  filled with prompt chunks, so decodes never stall behind a long prompt. With a `chunk_cap`
  (a TPOT target, see `distserve.engine.step_times`), a step takes at most `chunk_cap(decodes)` prompt
  tokens, so the time per output token of its running decodes stays within the target while prompts
  advance; the cap of a step with no running decode is the engine's to say (a colocated engine gives
  the whole token budget, a decode worker's keeps it within the target for requests that join it).

Prefix caching (`prefix_root` set): at admission a prompt takes the longest run of its full blocks
already cached (`BlockManager.match`, by chained hash) and starts computing after them, as a chunked
prefill with past context does; at least its last token is always computed (it is sampled from). Each
block a step completes (prompt or generated tokens) is offered to the cache with `cache_computed`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from distserve.engine.block_manager import BlockManager
from distserve.engine.model_runner import PrefillChunk
from distserve.engine.prefix import block_hashes
from distserve.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerOutput:
    decode: list[Sequence] = field(default_factory=list)  # one token each
    chunks: list[PrefillChunk] = field(default_factory=list)  # prompt pieces

    @property
    def empty(self) -> bool:
        return not self.decode and not self.chunks


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        chunked_prefill: bool,
        hold_after_prefill: bool,
        chunk_cap: Callable[[list[Sequence]], int] | None = None,
        prefix_root: int | None = None,
    ):
        self.blocks = blocks
        self.chunk_cap = chunk_cap  # decodes of a step -> prompt tokens it may carry (None: the token budget)
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.chunked = chunked_prefill
        self.hold_after_prefill = hold_after_prefill
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.prefix_root = prefix_root  # chain root of block hashes; None = no prefix caching
        self.prefix_query_tokens = 0  # prompt tokens admitted (cumulative, with prefix caching on)
        self.prefix_hit_tokens = 0  # ... of which came from the cache

    def blocks_for(self, seq: Sequence) -> int:
        if self.hold_after_prefill:
            return self.blocks.blocks_for(seq.num_prompt_tokens)
        return seq.blocks_needed(self.blocks.block_size)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the start of this waiting sequence's prompt (none without caching),
        short of its last token, which must be computed."""
        if self.prefix_root is None:
            return []
        bs = self.blocks.block_size
        full = seq.num_prompt_tokens // bs
        if len(seq.block_hashes) < full:
            seq.block_hashes = block_hashes(seq.prompt_token_ids, bs, self.prefix_root)
        hits = self.blocks.match(seq.block_hashes[:full])
        if len(hits) * bs >= seq.num_prompt_tokens:
            hits = hits[:-1]
        return hits

    def _admit(self, seq: Sequence, hits: list[int] | None = None) -> bool:
        hits = self.cached_prefix(seq) if hits is None else hits
        n = self.blocks_for(seq) - len(hits)
        if n > self.blocks.num_free - self.blocks.evictable_among(hits):
            return False
        self.blocks.acquire(hits)
        seq.block_table = hits + self.blocks.allocate(n)
        cached = len(hits) * self.blocks.block_size
        seq.num_computed_tokens = seq.num_cached_tokens = cached
        seq.num_registered = len(hits)
        if self.prefix_root is not None:
            self.prefix_query_tokens += seq.num_prompt_tokens
            self.prefix_hit_tokens += cached
        seq.status = SequenceStatus.RUNNING
        seq.first_scheduled_s = time.monotonic()
        return True

    def cache_computed(self, seq: Sequence) -> None:
        """Offers the blocks of `seq` whose every token's KV is computed now to the prefix cache."""
        if self.prefix_root is None:
            return
        bs = self.blocks.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if full <= seq.num_registered:
            return
        have = len(seq.block_hashes)
        if have < full:
            parent = seq.block_hashes[-1] if have else None
            toks = [seq.token_id_at(i) for i in range(have * bs, full * bs)]
            seq.block_hashes.extend(block_hashes(toks, bs, self.prefix_root, parent=parent))
        for i in range(seq.num_registered, full):
            self.blocks.register(seq.block_table[i], seq.block_hashes[i])
        seq.num_registered = full

    @property
    def queued_tokens(self) -> int:
        return sum(s.num_prompt_tokens for s in self.waiting) + sum(
            s.num_prompt_tokens - s.num_computed_tokens for s in self.prefilling
        )

    def schedule(self) -> SchedulerOutput:
        if self.chunked:
            return self._schedule_chunked()
        out = SchedulerOutput()
        budget = self.budget
        active = len(self.running)
        while self.waiting and active + len(out.chunks) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.cached_prefix(seq)
            n = seq.num_prompt_tokens - len(hits) * self.blocks.block_size
            if n > budget and out.chunks:
                break
            if not self._admit(seq, hits):
                break
            self.waiting.popleft()
            out.chunks.append(PrefillChunk(seq, seq.num_computed_tokens, seq.num_prompt_tokens))
            budget -= n
            if budget <= 0:
                break
        if out.chunks:
            return out
        out.decode = self.running[: self.max_num_seqs]
        return out

    def _schedule_chunked(self) -> SchedulerOutput:
        out = SchedulerOutput(decode=self.running[: self.max_num_seqs])
        budget = self.budget - len(out.decode)
        if self.chunk_cap is not None and (self.prefilling or self.waiting):
            budget = min(budget, self.chunk_cap(out.decode))
        seats = self.max_num_seqs - len(out.decode)
        for seq in self.prefilling:
            if budget <= 0 or seats <= 0:
                return out
            end = min(seq.num_prompt_tokens, seq.num_computed_tokens + budget)
            out.chunks.append(PrefillChunk(seq, seq.num_computed_tokens, end))
            budget -= end - seq.num_computed_tokens
            seats -= 1
        while self.waiting and budget > 0 and seats > 0:
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self.prefilling.append(seq)
            start = seq.num_computed_tokens
            end = min(seq.num_prompt_tokens, start + budget)
            out.chunks.append(PrefillChunk(seq, start, end))
            budget -= end - start
            seats -= 1
        return out

    def remove(self, seq: Sequence) -> None:
        for queue in (self.prefilling, self.running):
            if seq in queue:
                queue.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
