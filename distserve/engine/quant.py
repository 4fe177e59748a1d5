"""int8 numerics: the weight quantiser, the int8 linear layer on each device, and int8 KV helpers.

Weights ("int8"): every linear weight W [N, K] (and the embedding table) is stored as int8 codes with,
for each group of GROUP consecutive inputs of a row, an fp32 scale and offset:
W[n, k] = code * scale + offset, laid out in blocks of BLOCK output channels (`QuantizedWeight`) so
that the CPU kernel reads 16 channels of one input with one load. For each group the quantiser
takes whichever of two grids reconstructs it with the smaller squared error: the symmetric one
(offset 0, scale absmax / 127) or the min-max one (the 256 codes spread from the group's minimum to
its maximum). The CPU kernel quantises activations to int16, not int8: int8 activations cost far more
agreement with fp32 than they saved time on this CPU (docs/quantization.md has the figures).

Linear layer: on CPU the native kernel (`kernels.int8_linear`) quantises the activations to int16
per (row, group of 32) and multiplies with vpmaddwd against a tile of the codes widened in L1 (the
RMS norm before it, the SiLU gate product before the down projection and the residual add after it
fused into its passes). For large batches (prefill) a transient copy of the weight can go through
oneDNN's fp32 or bf16 GEMM instead (`prefill_gemm`): on an AVX2 CPU the fp32 GEMM wins from 512 rows,
on an AVX-512 VNNI one the kernel wins at every size (docs/quantization.md has the figures). On CUDA
the weight is widened to the activation dtype per call (torch's own int8 matmuls want per-channel
scales or int8 activations; see docs/quantization.md). Without a compiler the CPU path does the same
as CUDA, in torch.

KV ("int8"): see `distserve.engine.kv_cache` for the layout; `kv_write_int8_torch` and
`dequantize_kv` are the torch paths of the native write and attention kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distserve.engine import kernels

GROUP = 32  # inputs per scale/offset group
BLOCK = 16  # output channels per block of the stored layout
PREFILL_ROWS = 512  # from this many rows on, the GEMM of prefill_gemm "fp32" or "bf16" takes over (measured)
GEMM_DTYPES = {"native": None, "fp32": torch.float32, "bf16": torch.bfloat16}  # None: the kernel at every size
PREFILL_GEMMS = ("auto", *GEMM_DTYPES)
PROLOGUES = {"none": 0, "rms_norm": 1, "silu_mul": 2}  # what the native kernel applies to x first


@dataclass(slots=True)
class QuantizedWeight:
    """W [n_out, K] as int8 codes in blocks of BLOCK output channels:
    W[16b + j, k] = codes[b, k, j] * scale[b, k // GROUP, j] + offset[b, k // GROUP, j]
    (rows past n_out are zero padding)."""

    codes: torch.Tensor  # int8 [n_blocks, K, BLOCK]
    scale: torch.Tensor  # fp32 [n_blocks, K // GROUP, BLOCK]
    offset: torch.Tensor  # fp32 [n_blocks, K // GROUP, BLOCK]
    n_out: int  # output channels (N)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_out, self.codes.shape[1])

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), self.offset.to(device), self.n_out)


def can_quantize(w: torch.Tensor, group: int = GROUP) -> bool:
    return w.dim() == 2 and w.shape[1] % group == 0


def _blocked(t: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[N, C] -> [n_blocks, C, BLOCK], rows padded with zeros to n_blocks * BLOCK."""
    N, C = t.shape
    pad = n_blocks * BLOCK - N
    if pad:
        t = torch.cat([t, t.new_zeros((pad, C))])
    return t.view(n_blocks, BLOCK, C).transpose(1, 2).contiguous()


def _unblocked(t: torch.Tensor, n_out: int) -> torch.Tensor:
    """[n_blocks, C, BLOCK] -> [n_out, C]."""
    nb, C, _ = t.shape
    return t.transpose(1, 2).reshape(nb * BLOCK, C)[:n_out]


@torch.no_grad()
def quantize_weight(w: torch.Tensor, group: int = GROUP) -> QuantizedWeight:
    """int8 codes with a per-group scale and offset (the better of a symmetric and a min-max grid)."""
    if not can_quantize(w, group):
        raise ValueError(f"cannot quantise a weight of shape {tuple(w.shape)} in groups of {group}")
    N, K = w.shape
    wg = w.detach().to(torch.float32).reshape(N, K // group, group)
    # symmetric: codes in [-127, 127], offset 0
    s_sym = wg.abs().amax(-1) / 127
    s_sym = torch.where(s_sym > 0, s_sym, torch.ones_like(s_sym))
    c_sym = torch.round(wg / s_sym[..., None]).clamp_(-127, 127)
    e_sym = (c_sym * s_sym[..., None] - wg).pow(2).sum(-1)
    # min-max: codes -128..127 spread from the minimum to the maximum
    lo, hi = wg.amin(-1), wg.amax(-1)
    s_mm = (hi - lo) / 255
    s_mm = torch.where(s_mm > 0, s_mm, torch.ones_like(s_mm))
    z_mm = lo + 128 * s_mm
    c_mm = torch.round((wg - z_mm[..., None]) / s_mm[..., None]).clamp_(-128, 127)
    e_mm = (torch.addcmul(z_mm[..., None], c_mm, s_mm[..., None]) - wg).pow(2).sum(-1)
    use_mm = e_mm < e_sym
    codes = torch.where(use_mm[..., None], c_mm, c_sym).to(torch.int8).reshape(N, K)
    scale = torch.where(use_mm, s_mm, s_sym)
    offset = torch.where(use_mm, z_mm, torch.zeros_like(z_mm))
    nb = -(-N // BLOCK)
    return QuantizedWeight(_blocked(codes, nb), _blocked(scale, nb), _blocked(offset, nb), N)


def dequantize_weight(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [n_out, K] in `dtype`."""
    mod = kernels.int8_linear() if q.codes.device.type == "cpu" and dtype == torch.float32 else None
    if mod is not None:
        return mod.int8_dequantize(q.codes, q.scale, q.offset, q.n_out)
    codes = _unblocked(q.codes, q.n_out)
    K = codes.shape[1]
    G = q.scale.shape[1]
    scale, offset = _unblocked(q.scale, q.n_out), _unblocked(q.offset, q.n_out)
    w = torch.addcmul(offset[..., None], codes.view(q.n_out, G, K // G).to(scale.dtype), scale[..., None])
    return w.view(q.n_out, K).to(dtype)


def resolve_prefill_gemm(name: str, flags: frozenset[str] | None = None) -> str:
    """What the CPU int8 layers run batches of PREFILL_ROWS rows and more on (a GEMM_DTYPES key):
    "native", the kernel; "fp32" or "bf16", a transient weight through oneDNN's GEMM (bf16: bf16
    operands, fp32 accumulation, 1.1x the kernel at 2048 rows on AVX512_BF16 but not the fp32 greedy
    tokens). "auto": the kernel on AVX-512 VNNI CPUs, where it beats the fp32 GEMM 1.5x at 2048 rows
    (2026-12-04, Zen 4), the fp32 GEMM on the others (measured on AVX2)."""
    if name not in PREFILL_GEMMS:
        raise ValueError(f"prefill_gemm must be one of {PREFILL_GEMMS}, got {name!r}")
    if name == "auto":
        return "native" if "avx512_vnni" in (kernels.cpu_flags() if flags is None else flags) else "fp32"
    return name


class Int8Linear:
    """y = prologue(x) W^T + b with W held as int8 codes (read in place: a mapped file stays shared).

    `prologue` ("none", "rms_norm" with `norm_weight`, or "silu_mul" on [gate | up]) is fused into
    the native kernel's pass over x; the other paths apply it in torch first.
    """

    __slots__ = ("q", "bias", "native", "prologue", "norm_weight", "eps", "gemm_dtype")

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None = None, prologue: str = "none",
                 norm_weight: torch.Tensor | None = None, eps: float = 1e-6, gemm_dtype: torch.dtype | None = torch.float32):
        self.q = q
        self.bias = bias
        self.native = kernels.int8_linear() if q.codes.device.type == "cpu" else None
        self.prologue = prologue
        self.norm_weight = norm_weight
        self.eps = eps
        self.gemm_dtype = gemm_dtype  # of the CPU's large-batch GEMM (GEMM_DTYPES; None: the kernel)

    def _prologue(self, x: torch.Tensor) -> torch.Tensor:
        if self.prologue == "rms_norm":
            xf = x.to(torch.float32)
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.norm_weight * xf.to(x.dtype)
        if self.prologue == "silu_mul":
            m = x.shape[-1] // 2
            return F.silu(x[:, :m]) * x[:, m:]
        return x

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """prologue(x) W^T + b, plus `residual` when given (fused into the kernel's output pass)."""
        q = self.q
        if self.native is not None and x.dtype == torch.float32:
            if self.gemm_dtype is None or x.shape[0] < PREFILL_ROWS:
                return self.native.int8_linear(x, q.codes, q.scale, q.offset, q.n_out, self.bias,
                                               PROLOGUES[self.prologue], self.norm_weight, self.eps, residual)
            w = self.native.int8_dequantize(q.codes, q.scale, q.offset, q.n_out)
            if self.gemm_dtype == torch.bfloat16:  # bf16 operands, fp32 accumulation and output
                y = F.linear(self._prologue(x).to(torch.bfloat16), w.to(torch.bfloat16)).to(torch.float32)
                y = y if self.bias is None else y + self.bias
            else:
                y = F.linear(self._prologue(x), w, self.bias)
        else:
            y = F.linear(self._prologue(x), dequantize_weight(q, x.dtype), self.bias)
        return y if residual is None else residual + y


def embedding(ids: torch.Tensor, table: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """Rows of an embedding table, fp32 or int8."""
    if isinstance(table, torch.Tensor):
        return F.embedding(ids, table)
    mod = kernels.int8_linear() if table.codes.device.type == "cpu" else None
    if mod is not None:
        return mod.int8_embedding(ids, table.codes, table.scale, table.offset, table.n_out)
    blk, j = torch.div(ids, BLOCK, rounding_mode="floor"), ids % BLOCK
    codes = table.codes[blk, :, j]  # [T, K]
    scale, offset = table.scale[blk, :, j], table.offset[blk, :, j]  # [T, G]
    T, K = codes.shape
    G = scale.shape[1]
    rows = torch.addcmul(offset[..., None], codes.view(T, G, K // G).to(scale.dtype), scale[..., None])
    return rows.view(T, K)


# ---------------------------------------------------------------------------------------------
# int8 KV: torch paths (the native kernels in kernels/paged_attention.cpp do the same)


def kv_write_int8_torch(cache: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, block_size: int) -> None:
    """Quantises rows x [n, KH, D] into cache [KH, S, D] int8 at `slots`, growing the per-block
    scales [KH, blocks] (requantising a block's rows when its scale grows; a block whose first slot
    is written here starts afresh)."""
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    uniq, inv = torch.unique(blocks, return_inverse=True)
    KH = x.shape[1]
    amax = x.abs().amax(-1).transpose(0, 1)  # [KH, n]
    need = torch.zeros((KH, len(uniq)), dtype=scales.dtype, device=x.device)
    need.scatter_reduce_(1, inv.expand(KH, -1), amax / 127, "amax", include_self=True)
    fresh = torch.zeros(len(uniq), dtype=torch.bool, device=x.device)
    fresh[inv[slots % block_size == 0]] = True
    old = torch.where(fresh, torch.zeros_like(need), scales[:, uniq])
    new = torch.maximum(old, need)
    grow = (old > 0) & (new > old)
    if bool(grow.any()):
        rows = (uniq[:, None] * block_size + torch.arange(block_size, device=x.device)).reshape(-1)
        held = cache[:, rows].view(KH, len(uniq), block_size, -1).to(torch.float32)
        f = torch.where(grow, old / new, torch.ones_like(new))[..., None, None]
        cache[:, rows] = torch.round(held * f).to(torch.int8).view(KH, len(rows), -1)
    scales[:, uniq] = new
    s = new[:, inv].transpose(0, 1)[..., None]  # [n, KH, 1]
    inv_s = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    q = torch.round(x * inv_s).clamp_(-127, 127).to(torch.int8)
    cache.index_copy_(1, slots, q.transpose(0, 1))


def dequantize_kv(cache: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 rows [KH, len(slots), D] of an int8 cache [KH, S, D] with per-block scales [KH, blocks]."""
    s = scales[:, torch.div(slots, block_size, rounding_mode="floor")]
    return cache.index_select(1, slots).to(torch.float32) * s[..., None]
