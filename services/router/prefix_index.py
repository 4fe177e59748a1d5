"""What a router knows of each worker's prefix cache, and the cost that decides KV-aware routing.

Each worker publishes a Bloom filter of the block hashes it holds in its registry entry, and a version
in its load that moves when they change (distserve.state.registry, distserve.engine.prefix). The
picker fetches a worker's filter only when that version moved (one pipelined HMGET for all of them,
at a registry read), so a quiet pool costs nothing beyond the heartbeat. Between two publishes, the
index also remembers the prompts this router sent to each worker in the last `recent_s` seconds: a
burst of requests sharing a new prefix follows the first one instead of waiting a heartbeat.

The cost (KV-aware routing, `--routing kv`): a prefill worker w is charged the prompt tokens it must
compute before this prompt's first token,

    cost(w) = queued_tokens(w) + P - cached(w)

with P the prompt's tokens, queued_tokens(w) the prompt tokens waiting on w (its last publish plus
what this router sent it since, themselves counted without their cached part) and cached(w) the
tokens of the longest prefix of the prompt's full blocks that w holds (less the last block when
that covers the whole prompt: the last token is always computed, as the engine does). The cheapest worker wins; ties go at random. So a worker holding a prompt's
prefix gets it unless its queue is longer than the prefix it would save: e.g. for a 900-token prompt
of which worker A holds 800, A wins while it has fewer than 800 more tokens queued than B. Least-loaded
routing (`--routing load`) is the same with cached(w) = 0.
"""

from __future__ import annotations

import time

from distserve.engine.prefix import BlockBloom, block_hashes
from distserve.state.registry import WorkerView

RECENT_S = 10.0  # how long a prompt routed to a worker counts as (soon) cached there without its publish


class PrefixIndex:
    def __init__(self, recent_s: float = RECENT_S):
        self.recent_s = recent_s
        self._filters: dict[str, tuple[tuple[float, int], BlockBloom]] = {}  # worker id -> ((its start, published version), its filter)
        self._recent: dict[str, dict[int, float]] = {}  # worker id -> block hash -> monotonic time routed

    def stale(self, views: list[WorkerView]) -> list[str]:
        """Workers with a prefix cache whose published filter is newer than the one held here."""
        out = []
        for v in views:
            ver = (v.info.started_at, v.load.prefix_version)  # a restarted worker counts its versions afresh
            if v.info.prefix_root and v.load.prefix_version and self._filters.get(v.worker_id, (None, None))[0] != ver:
                out.append(v.worker_id)
        return out

    def update(self, views: list[WorkerView], filters: dict[str, bytes]) -> None:
        """Takes freshly read filters (`Registry.prefixes`), and forgets workers no longer in `views`."""
        live = {v.worker_id: v for v in views}
        for wid, bits in filters.items():
            if wid in live:
                try:
                    self._filters[wid] = ((live[wid].info.started_at, live[wid].load.prefix_version), BlockBloom(bits))
                except ValueError:
                    self._filters.pop(wid, None)
        for wid in list(self._filters):
            if wid not in live:
                del self._filters[wid]
        for wid in list(self._recent):
            if wid not in live:
                del self._recent[wid]

    @staticmethod
    def hashes(view: WorkerView, prompt: list[int], memo: dict | None = None) -> list[int]:
        """The prompt's full-block hashes in a worker's chain (memo: shared by workers of one root)."""
        key = (view.info.prefix_root, view.info.block_size)
        if memo is not None and key in memo:
            return memo[key]
        out = block_hashes(prompt, view.info.block_size, int(view.info.prefix_root, 16)) if view.info.prefix_root else []
        if memo is not None:
            memo[key] = out
        return out

    def cached_tokens(self, view: WorkerView, prompt: list[int], memo: dict | None = None) -> int:
        """Tokens of the prompt's prefix a worker (maybe) holds: its filter, or routed there lately."""
        hashes = self.hashes(view, prompt, memo)
        if not hashes:
            return 0
        entry = self._filters.get(view.worker_id)
        recent = self._recent.get(view.worker_id, {})
        now = time.monotonic()
        n = 0
        for h in hashes:
            if (entry is not None and h in entry[1]) or now - recent.get(h, -1e18) <= self.recent_s:
                n += 1
            else:
                break
        if n * view.info.block_size >= len(prompt):  # as the engine: the last token is computed, with its block
            n -= 1
        return n * view.info.block_size

    def routed(self, view: WorkerView, prompt: list[int], memo: dict | None = None) -> None:
        """Remembers that this prompt goes to this worker (its blocks will be cached there)."""
        hashes = self.hashes(view, prompt, memo)
        if not hashes:
            return
        now = time.monotonic()
        recent = self._recent.setdefault(view.worker_id, {})
        if len(recent) > 65536:  # old entries out, so a busy router's memory stays bounded
            for h in [h for h, t in recent.items() if now - t > self.recent_s]:
                del recent[h]
        for h in hashes:
            recent[h] = now


def prefill_cost(queued_tokens: int, prompt_tokens: int, cached_tokens: int) -> int:
    """The KV-aware cost of a prefill worker (module docstring): tokens it computes before this prompt's first token."""
    return queued_tokens + prompt_tokens - cached_tokens
