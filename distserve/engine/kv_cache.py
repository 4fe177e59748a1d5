"""The paged KV cache tensor and the mapping from (sequence, position) to cache slots.

One tensor holds every layer's K and V: [num_layers, 2, kv_heads, num_blocks * block_size, head_dim]
(heads before slots, so a gather of a batch's slots is already laid out for a batched matmul per KV
head). A token at position p of a sequence lives in slot `block_table[p // block_size] * block_size +
p % block_size`. The cache never moves data between blocks; the block manager decides ownership.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    def export_shape(self, num_tokens: int) -> tuple[int, ...]:
        """Shape of one request's KV as exported for transfer."""
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device):
        self.layout = layout
        self.num_blocks = num_blocks
        self.data = torch.zeros(
            (layout.num_layers, 2, layout.num_kv_heads, num_blocks * layout.block_size, layout.head_dim),
            dtype=layout.dtype,
            device=device,
        )

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a sequence with this block table."""
        bs = self.layout.block_size
        pos = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[pos // bs]
        return (blocks * bs + pos % bs).to(self.data.device)

    def export(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """A contiguous copy of one sequence's KV: [layers, 2, num_tokens, kv_heads, head_dim]."""
        kv = self.data.index_select(3, self.slots(block_table, 0, num_tokens))
        return kv.permute(0, 1, 3, 2, 4).contiguous()

    def load(self, block_table: list[int], kv: torch.Tensor) -> None:
        """Writes an exported KV tensor into this sequence's blocks."""
        expected = self.layout.export_shape(kv.shape[2])
        if tuple(kv.shape) != expected or kv.dtype != self.layout.dtype:
            raise ValueError(f"KV of shape {tuple(kv.shape)} {kv.dtype} does not fit {expected} {self.layout.dtype}")
        slots = self.slots(block_table, 0, kv.shape[2])
        self.data.index_copy_(3, slots, kv.to(self.data.device).permute(0, 1, 3, 2, 4))
