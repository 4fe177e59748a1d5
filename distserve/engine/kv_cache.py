"""The paged KV cache tensor and the mapping from (sequence, position) to cache slots.

One tensor holds every layer's K and V: [num_layers, 2, kv_heads, num_blocks * block_size, head_dim]
(heads before slots, so a gather of a batch's slots is already laid out for a batched matmul per KV
head). A token at position p of a sequence lives in slot `block_table[p // block_size] * block_size +
p % block_size`. The cache never moves data between blocks; the block manager decides ownership.

int8 cache (layout dtype torch.int8): the values are int8 codes and `scales` [num_layers, 2, kv_heads,
num_blocks] holds one fp32 scale per (layer, K|V, head, block): value = code * scale. A block's scale
only grows (absmax of its rows / 127); rows already in a block are requantised when it grows; a block
whose first slot is written starts afresh (`write`). Per token and head that is head_dim bytes plus a
16th of a scale: 3.98x the tokens of an fp32 cache in the same bytes (head_dim 64, 16-token blocks).

Export format (what a KV transfer carries, `export_shape`): [layers, 2, tokens, kv_heads, head_dim]
of the cache dtype; for int8 the last dimension is head_dim + 4: the codes, then the fp32 scale of the
block holding that token (little-endian bytes; equal for every token of one block). `load` of such a
tensor is bit-exact when both sides use the same block size and requantises otherwise.

On CPU the cache memory is an anonymous mapping: zero from the start and committed page by page as
blocks are first written, so an idle worker does not hold its whole KV capacity in RAM.
"""

from __future__ import annotations

import mmap
import warnings
from dataclasses import dataclass

import torch

from distserve.errors import InvalidRequest

KV_SCALE_BYTES = 4  # bytes appended to each exported int8 row: the fp32 scale of its block

# dtypes a KV cache (and so a KV transfer) may have, by torch name: the name is what travels
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32" (must be one of DTYPES)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InvalidRequest("dtype", f"unsupported KV dtype {name}; allowed: {', '.join(DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """"float32" -> torch.float32."""
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidRequest("dtype", f"unsupported KV dtype {name!r}; allowed: {', '.join(DTYPES)}") from None


@dataclass(frozen=True, slots=True)
class KVLayout:
    """How an engine stores KV: its paged cache's geometry, and the export format a peer needs to
    receive one request's KV (the KV library's handles carry this same type; its wire form is
    distserve.kv.handle's layout_to_proto / layout_from_proto)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block of the paged cache
    dtype: torch.dtype  # one of DTYPES

    def __post_init__(self) -> None:
        dtype_name(self.dtype)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def quantized(self) -> bool:
        return self.dtype == torch.int8

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes per token, rounded up (int8: the codes plus a share of the block scales)."""
        return -(-self.bytes_per_block // self.block_size)

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        rows = self.num_layers * 2 * self.num_kv_heads
        return rows * (self.block_size * self.head_dim * itemsize + (4 if self.quantized else 0))

    def export_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of one request's KV as exported for transfer (int8: each row carries its block's
        fp32 scale too)."""
        last = self.head_dim + (KV_SCALE_BYTES if self.quantized else 0)
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, last)

    def export_nbytes(self, num_tokens: int) -> int:
        """Bytes of one request's exported KV."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.export_shape(1)[-1] * itemsize * num_tokens


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes)  # anonymous, zero-filled, pages committed on first write
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(buf, dtype=dtype).view(shape)


class PagedKVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device):
        self.layout = layout
        self.num_blocks = num_blocks
        L, KH, D, bs = layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size
        self.data = _zeros((L, 2, KH, num_blocks * bs, D), layout.dtype, torch.device(device))
        # int8 only: one fp32 scale per (layer, K|V, head, block)
        self.scales = _zeros((L, 2, KH, num_blocks), torch.float32, torch.device(device)) if layout.quantized else None
        self._writer = None
        if layout.quantized and self.data.device.type == "cpu":
            from distserve.engine import kernels

            mod = kernels.paged_attention()
            self._writer = mod.kv_write_int8 if mod is not None else None

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a sequence with this block table."""
        bs = self.layout.block_size
        pos = torch.arange(start, end)
        blocks = torch.tensor(block_table, dtype=torch.long)[pos // bs]
        return (blocks * bs + pos % bs).to(self.data.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores new K and V rows [n, kv_heads, head_dim] of one layer at `slots` (sequential
        positions per sequence, as a forward pass produces them)."""
        kc, vc = self.data[layer, 0], self.data[layer, 1]
        if self.scales is None:
            kc.index_copy_(1, slots, k.transpose(0, 1))
            vc.index_copy_(1, slots, v.transpose(0, 1))
            return
        ks, vs = self.scales[layer, 0], self.scales[layer, 1]
        bs = self.layout.block_size
        if self._writer is not None and k.dtype == torch.float32:
            self._writer(kc, vc, ks, vs, slots, k, v, bs)
            return
        from distserve.engine.quant import kv_write_int8_torch

        kv_write_int8_torch(kc, ks, slots, k.float(), bs)
        kv_write_int8_torch(vc, vs, slots, v.float(), bs)

    def read(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows [kv_heads, len(slots), head_dim] of one layer, dequantised to `dtype`."""
        kc, vc = self.data[layer, 0], self.data[layer, 1]
        if self.scales is None:
            return kc.index_select(1, slots), vc.index_select(1, slots)
        from distserve.engine.quant import dequantize_kv

        bs = self.layout.block_size
        return (dequantize_kv(kc, self.scales[layer, 0], slots, bs).to(dtype),
                dequantize_kv(vc, self.scales[layer, 1], slots, bs).to(dtype))

    def export(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """A contiguous copy of one sequence's KV in the export format (see the module docstring)."""
        slots = self.slots(block_table, 0, num_tokens)
        kv = self.data.index_select(3, slots)  # [L, 2, KH, T, D]
        if self.scales is not None:
            blocks = torch.div(slots, self.layout.block_size, rounding_mode="floor")
            s = self.scales.index_select(3, blocks)  # [L, 2, KH, T]
            kv = torch.cat([kv, s.contiguous().view(torch.int8).view(*s.shape, KV_SCALE_BYTES)], dim=-1)
        return kv.permute(0, 1, 3, 2, 4).contiguous()

    def load(self, block_table: list[int], kv: torch.Tensor) -> None:
        """Writes an exported KV tensor into this sequence's blocks."""
        expected = self.layout.export_shape(kv.shape[2])
        if tuple(kv.shape) != expected or kv.dtype != self.layout.dtype:
            raise ValueError(f"KV of shape {tuple(kv.shape)} {kv.dtype} does not fit {expected} {self.layout.dtype}")
        T = kv.shape[2]
        slots = self.slots(block_table, 0, T)
        kv = kv.to(self.data.device)
        if self.scales is None:
            self.data.index_copy_(3, slots, kv.permute(0, 1, 3, 2, 4))
            return
        D, bs = self.layout.head_dim, self.layout.block_size
        codes = kv[..., :D]  # [L, 2, T, KH, D]
        scale = kv[..., D:].contiguous().view(torch.float32)[..., 0]  # [L, 2, T, KH]
        if not bool((scale >= 0).all()):
            raise ValueError("int8 KV carries negative or NaN scales")
        self.data.index_copy_(3, slots, codes.permute(0, 1, 3, 2, 4))
        first = torch.arange(0, T, bs, device=slots.device)  # each block's first token
        blocks = torch.div(slots[first], bs, rounding_mode="floor")
        self.scales.index_copy_(3, blocks, scale[:, :, first].permute(0, 1, 3, 2))
        if not bool((scale == scale[:, :, first].repeat_interleave(bs, dim=2)[:, :, :T]).all()):
            # the sender's blocks were not ours (another block size): requantise token by token
            values = codes.to(torch.float32) * scale[..., None]
            for layer in range(self.layout.num_layers):
                self.write(layer, slots, values[layer, 0], values[layer, 1])
