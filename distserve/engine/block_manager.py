"""Physical KV blocks: who owns which, how many are left, and which hold a cached prefix.

Blocks move free -> allocated (to one sequence) -> free. `allocate` either hands out every block
asked for or none (never over-commits); `free` returns them. The engine frees a sequence's blocks
exactly once, when the sequence finishes or its KV lease ends.

Automatic prefix caching (docs/prefix-caching.md): a full block whose KV is computed can be
`register`ed under its chained hash (distserve.engine.prefix). Blocks are reference-counted: a block
shared by several sequences (`acquire`d from a `match`) is freed when its last user frees it. A
freed block that carries a hash is not wiped: it stays *cached* (evictable, counted as free) in
least-recently-used order, and a later prompt with the same prefix takes it back with `acquire`.
`allocate` hands out never-hashed blocks first and only then evicts cached ones, oldest first,
dropping their hash. So caching never costs capacity: an evictable block is a free block.

Counters for metrics (cumulative): `evictions` (cached blocks reused for other data), and
`version`, which changes whenever the set of cached hashes does (publishers compare it).
"""

from __future__ import annotations

from collections import OrderedDict, deque


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens' KV."""
    return -(-num_tokens // block_size)


def blocks_needed(prompt_tokens: int, max_tokens: int, block_size: int) -> int:
    """Blocks for a request's whole life: its prompt plus every token whose KV it may still write,
    reserved up front so a running sequence never waits for memory (the last sampled token's KV is
    never written). The one count the engine's admission and reservation and the router's choice of
    a decode worker with room all use."""
    return blocks_for_tokens(prompt_tokens + max_tokens - 1, block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))  # free, holding no cached prefix
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, least recently used first
        self._ref = [0] * num_blocks  # users of each block (0: free or evictable)
        self._hash_of: dict[int, int] = {}  # block -> its prefix hash (cached blocks, in use or not)
        self._by_hash: dict[int, int] = {}  # prefix hash -> block
        self.evictions = 0
        self.version = 0

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out now (cached ones nobody uses included)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks holding a cached prefix, in use or not."""
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for_tokens(num_tokens, self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"{n} blocks asked, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
                self.evictions += 1
                self.version += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._ref[b] <= 0:
                raise RuntimeError(f"block {b} freed twice")
        # in reverse: a sequence's last blocks are the least likely to be shared, so they go first
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # -- prefix caching -------------------------------------------------------------------------
    def match(self, hashes: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of these block hashes (not yet acquired)."""
        out = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def evictable_among(self, blocks: list[int]) -> int:
        """How many of these cached blocks nobody uses now (acquiring them takes them off the free count)."""
        return sum(1 for b in blocks if self._ref[b] == 0)

    def acquire(self, blocks: list[int]) -> None:
        """One more user of each of these cached blocks (from `match`); marks them recently used."""
        for b in blocks:
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1

    def register(self, block: int, h: int) -> bool:
        """Names an allocated, fully computed block by its prefix hash, so it stays cached after its
        users free it. False (and nothing changes) when another block already holds that prefix (two
        prompts computed it at once) or this block is named already."""
        if self._ref[block] <= 0:
            raise RuntimeError(f"block {block} is not allocated")
        if h in self._by_hash or block in self._hash_of:
            return False
        self._by_hash[h] = block
        self._hash_of[block] = h
        self.version += 1
        return True

    def cached_hashes(self) -> list[int]:
        """Every prefix hash held now (in use or evictable)."""
        return list(self._by_hash)
