"""Physical KV blocks: who owns which, and how many are left.

Blocks move free -> allocated (to one sequence) -> free. `allocate` either hands out every block
asked for or none (never over-commits); `free` returns them. The engine frees a sequence's blocks
exactly once, when the sequence finishes or its KV lease ends.
"""

from __future__ import annotations

from collections import deque


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
        self._free: deque[int] = deque(range(num_blocks))
        self._owned = bytearray(num_blocks)  # 1 while a block is allocated (guards double frees)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for_tokens(num_tokens, self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"{n} blocks asked, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._owned[b] = 1
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if not self._owned[b]:
                raise RuntimeError(f"block {b} freed twice")
            self._owned[b] = 0
            self._free.append(b)
