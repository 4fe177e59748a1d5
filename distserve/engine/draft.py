"""Draft-model drafting for speculative decoding: a smaller model sharing the tokenizer, or the target's
own first layers and its head (a self-draft), proposes tokens greedily on its own small paged cache.

Lifecycle per request (`DraftModel`): on its first draft the request gets draft blocks for every token
it may feed (prompt + max_tokens - 1, as the target reserves; when none are free it simply gets no
draft). Each drafting step first catches the draft cache up on the tokens the request gained since
(its whole prompt the first time: a prefill of the draft model; usually the one token after the last
verification), which also yields the first draft token, then runs further decode rounds, all drafting
requests in one batch per round, until each has its k tokens. After verification (`accepted`) the
draft KV counts as valid up to the last accepted draft it fed; what follows is overwritten next time.
`release` frees the blocks when the request leaves the engine.

The self-draft reuses the target runner's own layer objects (no second copy of any weight, same
format: fp32 or int8) over a cache with fewer layers. Drafts are the draft model's argmax, so they
are deterministic and the acceptance rule of `Sampler.verify` keeps the target distribution exactly.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from distserve.engine.block_manager import BlockManager
from distserve.engine.kv_cache import KVLayout, PagedKVCache
from distserve.engine.model_runner import ModelRunner, PrefillChunk


class _View:
    """What `ModelRunner.prepare` reads of a sequence, over the draft's block table and with the
    draft tokens made so far appended."""

    __slots__ = ("seq", "block_table", "extra")

    def __init__(self, seq, block_table: list[int]):
        self.seq = seq
        self.block_table = block_table
        self.extra: list[int] = []

    @property
    def num_tokens(self) -> int:
        return self.seq.num_tokens + len(self.extra)

    @property
    def last_token_id(self) -> int:
        return self.extra[-1] if self.extra else self.seq.last_token_id

    def token_id_at(self, i: int) -> int:
        n = self.seq.num_tokens
        return self.seq.token_id_at(i) if i < n else self.extra[i - n]


@dataclass(slots=True)
class DraftState:
    blocks: list[int]  # draft-cache blocks, in token order
    computed: int = 0  # tokens whose KV is in the draft cache


class DraftModel:
    def __init__(self, runner: ModelRunner, num_blocks: int, block_size: int, max_model_len: int, name: str):
        self.runner = runner
        self.blocks = BlockManager(num_blocks, block_size)
        self.max_model_len = max_model_len
        self.name = name
        self.round_s = 0.0  # EMA of one draft round's seconds (0: not measured yet)
        self.num_layers = len(runner.layers)

    @classmethod
    def self_draft(cls, target: ModelRunner, layers: int, num_blocks: int, max_model_len: int) -> "DraftModel":
        """The target's first `layers` layers, its final norm and head, sharing its weights."""
        lay = target.cache.layout
        if not 1 <= layers < lay.num_layers:
            raise ValueError(f"a self-draft keeps between 1 and {lay.num_layers - 1} of the model's layers, got {layers}")
        layout = KVLayout(layers, lay.num_kv_heads, lay.head_dim, lay.block_size, lay.dtype)
        runner = copy.copy(target)
        runner.layers = target.layers[:layers]
        runner.cache = PagedKVCache(layout, num_blocks, target.device)
        return cls(runner, num_blocks, lay.block_size, max_model_len, f"self-draft ({layers} of {lay.num_layers} layers)")

    @classmethod
    def separate(cls, loaded, weights, block_size: int, num_blocks: int, kv_dtype: torch.dtype) -> "DraftModel":
        """Another (smaller) model; `weights`: its runner weights (distserve.engine.weights.load)."""
        layout = ModelRunner.layout_of(loaded.model, block_size, kv_dtype)
        cache = PagedKVCache(layout, num_blocks, loaded.device)
        runner = ModelRunner(loaded.model, cache, loaded.max_model_len, weights)
        return cls(runner, num_blocks, block_size, loaded.max_model_len, f"draft model {loaded.name}")

    # -----------------------------------------------------------------------------------------
    def _state(self, seq) -> DraftState | None:
        st = seq.spec.draft
        if st is None:
            total = seq.num_prompt_tokens + seq.params.max_tokens - 1
            if total > self.max_model_len:
                return None
            need = self.blocks.blocks_for(total)
            if not self.blocks.can_allocate(need):
                return None
            st = seq.spec.draft = DraftState(self.blocks.allocate(need))
        return st

    @torch.inference_mode()
    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        """Greedy drafts of ks[i] tokens for seqs[i] (fewer or none where it has no draft blocks)."""
        t0 = time.perf_counter()
        views, want = [], []
        for seq, k in zip(seqs, ks):
            st = self._state(seq) if k > 0 else None
            views.append(_View(seq, st.blocks) if st is not None else None)
            want.append(k if st is not None else 0)
        active = [i for i, v in enumerate(views) if v is not None]
        rounds = 0
        while active:
            decode, chunks = [], []
            for i in active:
                v, st = views[i], seqs[i].spec.draft
                if v.extra or st.computed == v.num_tokens - 1:
                    decode.append(i)
                else:
                    chunks.append(i)
            batch = self.runner.prepare([views[i] for i in decode],
                                        [PrefillChunk(views[i], seqs[i].spec.draft.computed, views[i].num_tokens) for i in chunks],
                                        [True] * len(chunks))
            tokens = self.runner.forward(batch).argmax(dim=-1).tolist()
            rounds += 1
            for i, t in zip(decode + chunks, tokens):
                views[i].extra.append(t)
                seqs[i].spec.draft.computed = views[i].num_tokens - 1  # every token before the new draft is in
            active = [i for i in active if len(views[i].extra) < want[i]]
        if rounds:
            dt = (time.perf_counter() - t0) / rounds
            self.round_s = dt if not self.round_s else 0.8 * self.round_s + 0.2 * dt
        return [v.extra if v is not None else [] for v in views]

    def accepted(self, seq, base_tokens: int, accepted: int) -> None:
        """After verification: of the drafts made when seq had `base_tokens` tokens, `accepted` were
        kept, so the draft KV is valid up to the last accepted draft it fed."""
        st = seq.spec.draft if seq.spec is not None else None
        if st is not None:
            st.computed = min(st.computed, base_tokens + accepted)

    def release(self, seq) -> None:
        st = seq.spec.draft if seq.spec is not None else None
        if st is not None and st.blocks:
            self.blocks.free(st.blocks)
            st.blocks = []
            seq.spec.draft = None
