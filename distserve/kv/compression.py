"""KV on the wire: as held, float16, or int8 with one scale per KV block.

Every transport moves one request's KV as a flat byte payload. `encode` turns the exported tensor
[layers, 2, tokens, kv_heads, head_dim] into that payload on the holder; `decode` turns the bytes
the puller received back into a tensor of the holder's shape and dtype. Formats:

  ""/"auto"  the tensor's own bytes (bit-exact; no copy when the tensor is contiguous)
  float16    values cast to float16 (clamped to its finite range)
  int8       [scales: float32 x layers*2*blocks*kv_heads][values: int8 x layers*2*tokens*kv_heads*head_dim]
             one scale per (layer, K or V, block of `block_size` tokens, kv head): absmax / 127;
             value = round(x / scale), so |error| <= scale / 2

`wire_nbytes` tells the puller how large a buffer to receive into before any byte moves.
"""

from __future__ import annotations

import math

import torch

from distserve.errors import InvalidRequest
from distserve.engine.kv_cache import KVLayout, torch_dtype

WIRE_DTYPES: tuple[str, ...] = ("auto", "float16", "int8")  # what a puller may ask for
_FP16_MAX = 65504.0
_MIN_SCALE = 1e-30


def normalize(wire_dtype: str, held_dtype: str) -> str:
    """The canonical wire format name: "" for the held bytes, else "float16" or "int8"."""
    if wire_dtype in ("", "auto", held_dtype):
        return ""
    if wire_dtype not in WIRE_DTYPES:
        raise InvalidRequest("wire_dtype", f"unknown KV wire dtype {wire_dtype!r}; allowed: {', '.join(WIRE_DTYPES)}")
    if not torch_dtype(held_dtype).is_floating_point:
        return ""  # already quantized (an int8 cache carries its own scales): sent as held
    return wire_dtype


def _blocks(num_tokens: int, block_size: int) -> int:
    return max(1, math.ceil(num_tokens / block_size)) if num_tokens else 0


def wire_nbytes(layout: KVLayout, num_tokens: int, wire_dtype: str = "") -> int:
    """Bytes of one request's KV in this wire format."""
    wire = normalize(wire_dtype, layout.dtype_name)
    elems = layout.num_layers * 2 * num_tokens * layout.num_kv_heads * layout.head_dim
    if wire == "":
        return layout.export_nbytes(num_tokens)
    if wire == "float16":
        return elems * 2
    scales = layout.num_layers * 2 * _blocks(num_tokens, layout.block_size) * layout.num_kv_heads
    return scales * 4 + elems


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def encode(kv: torch.Tensor, wire_dtype: str, block_size: int) -> torch.Tensor:
    """The wire payload of kv [layers, 2, tokens, heads, head_dim] as a flat uint8 tensor (same device)."""
    wire = normalize(wire_dtype, str(kv.dtype).removeprefix("torch."))
    if wire == "":
        return _bytes_of(kv)
    if wire == "float16":
        return _bytes_of(kv.float().clamp_(-_FP16_MAX, _FP16_MAX).to(torch.float16))
    layers, two, tokens, heads, dim = kv.shape
    nb = _blocks(tokens, block_size)
    x = kv.float()
    pad = nb * block_size - tokens
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
    xb = x.view(layers, two, nb, block_size, heads, dim)
    scale = xb.abs().amax(dim=(3, 5)).div_(127.0).clamp_min_(_MIN_SCALE)  # [L, 2, nb, H]
    q = (xb / scale[:, :, :, None, :, None]).round_().clamp_(-127, 127).to(torch.int8)
    q = q.view(layers, two, nb * block_size, heads, dim)[:, :, :tokens]
    s_bytes = scale.numel() * 4
    out = torch.empty(s_bytes + q.numel(), dtype=torch.uint8, device=kv.device)
    out[:s_bytes].copy_(scale.reshape(-1).view(torch.uint8))
    out[s_bytes:].view(q.shape).copy_(q.view(torch.uint8))
    return out


def decode(payload: torch.Tensor, layout: KVLayout, num_tokens: int, wire_dtype: str = "") -> torch.Tensor:
    """The KV tensor (layout.export_shape(num_tokens), layout.dtype) a payload stands for.

    For the held format this is a view of `payload` (no copy); otherwise a new tensor.
    """
    wire = normalize(wire_dtype, layout.dtype_name)
    need = wire_nbytes(layout, num_tokens, wire)
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != need:
        raise ValueError(f"KV payload of {payload.numel()} {payload.dtype} does not match {need} bytes of {wire or layout.dtype_name}")
    shape = layout.export_shape(num_tokens)
    if wire == "":
        return payload.view(layout.dtype).view(shape)
    if wire == "float16":
        return payload.view(torch.float16).view(shape).to(layout.dtype)
    layers, two, tokens, heads, dim = shape
    nb = _blocks(tokens, layout.block_size)
    s_bytes = layers * two * nb * heads * 4
    scale = payload[:s_bytes].view(torch.float32).view(layers, two, nb, heads)
    q = payload[s_bytes:].view(torch.int8).view(shape)
    per_token = scale.repeat_interleave(layout.block_size, dim=2)[:, :, :tokens]  # [L, 2, T, H]
    out = q.to(torch.float32).mul_(per_token[..., None])
    return out if layout.dtype == torch.float32 else out.to(layout.dtype)
