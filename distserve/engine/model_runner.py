"""One forward pass over a mixed batch: decode tokens of running sequences plus prefill chunks.

The runner reads fused weights (QKV and gate/up concatenated, `distserve.engine.weights`) and runs a
Llama-family forward with the paged cache: new K/V are written to their slots; decode attention reads
each sequence's slots in place per layer and multiplies grouped queries against them (no repeat of KV
heads); prefill attention runs SDPA per sequence. Logits are computed only where a token is sampled.
Speculative drafts (`prepare(..., drafts)`) ride as further decode rows of their sequence, one position
on each, whose context length ends at their own position: the decode kernel's per-row lengths make
that causal attention over the paged cache, fp32 or int8, with no kernel of its own.

Linear layers, by weights format:
- fp32 in private memory: on CPU through oneDNN with weights packed once at start (MKL's fp32 GEMM is
  several times slower for the skinny matrices of a decode step on this class of machine);
- fp32 mapped from a shared file: `F.linear` on the mapped weight (a packed copy would be private);
- int8 (mapped or not): `quant.Int8Linear`, which reads the int8 codes in place (or, for prefill
  batches, a transient copy through oneDNN's GEMM where that is faster: `prefill_gemm`).
On CPU decode attention runs the native paged kernel (`distserve.engine.kernels`, fp32 or int8 cache)
that reads each sequence's blocks in place; without a compiler it falls back to a gather in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distserve.engine import kernels, quant
from distserve.engine.kv_cache import KVLayout, PagedKVCache
from distserve.engine.sequence import Sequence
from distserve.engine.weights import LINEARS, ModelWeights, from_model


@dataclass(slots=True)
class PrefillChunk:
    seq: Sequence
    start: int  # first position computed in this step
    end: int  # one past the last position


NO_GROUPS = torch.empty(0, dtype=torch.long)  # decode rows one per sequence


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [N] decode tokens first, then each prefill chunk's tokens
    positions: torch.Tensor  # [N]
    write_slots: torch.Tensor  # [N] cache slot of each token's K/V
    num_decode: int  # leading tokens that are decode rows (one per sequence, plus its drafts when speculating)
    decode_tables: torch.Tensor | None  # [B, blocks] block table of each decode row's sequence, padded
    decode_lens: torch.Tensor | None  # [B] context length of each decode row (its own position + 1)
    decode_groups: torch.Tensor  # [S + 1] first row of each sequence's rows when drafts ride along (else empty)
    decode_gather: torch.Tensor | None  # [B * Lmax] padded context slots (torch fallback only)
    decode_mask: torch.Tensor | None  # [1, B, 1, Lmax] additive mask hiding the padding (fallback)
    decode_max_len: int  # Lmax
    chunks: list[tuple[int, int, int, torch.Tensor | None]]  # (flat start, flat end, ctx start, ctx slots)
    logits_index: torch.Tensor  # [S] flat indices whose logits are wanted


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _use_onednn(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class _Linear:
    """y = x W^T + b, on oneDNN with a prepacked weight where that is faster (CPU fp32, `pack`)."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 16) if pack and _use_onednn(self.weight) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _linear(w: torch.Tensor | quant.QuantizedWeight, bias: torch.Tensor | None, pack: bool,
            gemm_dtype: torch.dtype | None = torch.float32, **prologue):
    """An fp32 linear, or an int8 one that also applies `prologue` (see quant.Int8Linear)."""
    if isinstance(w, quant.QuantizedWeight):
        return quant.Int8Linear(w, bias, gemm_dtype=gemm_dtype, **prologue)
    return _Linear(w, bias, pack)


class _Layer:
    """One decoder layer's weights. `fused`: its linears apply the pre-norms and the SiLU gate
    product themselves (int8), so the forward hands them the residual stream / gate-up output."""

    __slots__ = ("ln1", "ln2", "fused", *LINEARS)

    def __init__(self, w: ModelWeights, i: int, pack: bool, eps: float, gemm_dtype: torch.dtype | None = torch.float32):
        p = f"layers.{i}"
        self.ln1 = w.tensors[f"{p}.ln1"]
        self.ln2 = w.tensors[f"{p}.ln2"]
        self.fused = all(isinstance(w.matrix(f"{p}.{n}"), quant.QuantizedWeight) for n in LINEARS)
        pro = {
            "qkv": dict(prologue="rms_norm", norm_weight=self.ln1, eps=eps),
            "gate_up": dict(prologue="rms_norm", norm_weight=self.ln2, eps=eps),
            "down": dict(prologue="silu_mul"),
        }
        for name in LINEARS:
            extra = pro.get(name, {}) if self.fused else {}
            setattr(self, name, _linear(w.matrix(f"{p}.{name}"), w.bias(f"{p}.{name}"), pack, gemm_dtype, **extra))


def _rotary(model: torch.nn.Module, max_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] from a fresh copy of the model's rotary embedding (works whether
    or not the model still holds its weights)."""
    rope = type(model.model.rotary_emb)(config=model.config)
    pos = torch.arange(max_len)[None]
    with torch.no_grad():
        cos, sin = rope(torch.zeros((1, 1), dtype=dtype), position_ids=pos)
    return cos[0].to(device=device, dtype=dtype), sin[0].to(device=device, dtype=dtype)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, max_model_len: int, weights: ModelWeights | None = None,
                 prefill_gemm: str = "auto"):
        cfg = model.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {cfg.hidden_act!r} (Llama-family models use silu)")
        self.cache = cache
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.num_heads // self.num_kv_heads
        self.scale = self.head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        self.device = cache.data.device
        self.weights = weights if weights is not None else from_model(model, "fp32")
        w = self.weights
        pack = not w.mapped  # a packed copy of mapped weights would be private memory
        self.embed = w.matrix("embed")
        self.norm = w.tensors["norm"]
        head = w.matrix(w.head_name())
        self.head_fused = isinstance(head, quant.QuantizedWeight)  # applies the final norm itself
        norm = dict(prologue="rms_norm", norm_weight=self.norm, eps=self.eps) if self.head_fused else {}
        # what the int8 layers run prefill batches on (quant.resolve_prefill_gemm); the head sees few rows
        self.prefill_gemm = quant.resolve_prefill_gemm(prefill_gemm)
        self.lm_head = _linear(head, w.bias("lm_head"), pack, **norm)
        gemm_dtype = quant.GEMM_DTYPES[self.prefill_gemm]
        self.layers = [_Layer(w, i, pack, self.eps, gemm_dtype) for i in range(w.num_layers)]
        self.dtype = self.norm.dtype
        native = self.device.type == "cpu" and self.dtype == torch.float32
        self.kernel = kernels.paged_attention() if native else None
        if self.kernel is not None and not self.kernel.supports_head_dim(self.head_dim):
            self.kernel = None  # a head size the kernel is not built for: the torch path
        self.cos, self.sin = _rotary(model, max_model_len, self.device, self.dtype)  # [max_len, head_dim]

    @staticmethod
    def layout_of(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> KVLayout:
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, block_size, dtype)

    # -----------------------------------------------------------------------------------------
    def prepare(self, decode: list[Sequence], chunks: list[PrefillChunk], sample: list[bool],
                drafts: list[list[int]] | None = None) -> ForwardBatch:
        """Builds the flat inputs. `sample[i]` says whether chunk i ends with a token to sample.
        `drafts[i]` (speculative decoding): tokens fed after decode sequence i's last token, each as
        one more decode row one position further on, whose attention sees the context up to itself;
        every row's logits are returned, a sequence's rows in order."""
        cache, bs = self.cache, self.cache.layout.block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_parts: list[torch.Tensor] = []
        logits_index: list[int] = []
        table = len_t = gather = mask = None
        groups = NO_GROUPS
        lmax = 0
        rows = len(decode)
        if decode:
            lens = []  # per row: context including the token being fed
            for i, s in enumerate(decode):
                n = s.num_tokens
                ids.append(s.last_token_id)
                lens.append(n)
                if drafts is not None and drafts[i]:
                    ids.extend(drafts[i])
                    lens.extend(range(n + 1, n + 1 + len(drafts[i])))
            rows = len(lens)
            pos.extend(x - 1 for x in lens)
            lmax = max(lens)
            nblk = (lmax + bs - 1) // bs
            table = torch.tensor([s.block_table[:nblk] + [0] * (nblk - len(s.block_table[:nblk])) for s in decode])
            if rows != len(decode):
                per_seq = torch.tensor([len(d) + 1 for d in drafts])
                table = table.repeat_interleave(per_seq, dim=0)
                groups = torch.cat((torch.zeros(1, dtype=torch.long), per_seq.cumsum(0)))  # the kernel reads K/V once per sequence
            len_t = torch.tensor(lens)
            last = len_t - 1
            slot_parts.append(table[torch.arange(rows), last // bs] * bs + last % bs)
            logits_index.extend(range(rows))
            if self.kernel is None:
                slots = (table[:, :, None] * bs + torch.arange(bs)).view(rows, -1)[:, :lmax]
                gather = slots.reshape(-1).to(self.device)
                valid = torch.arange(lmax)[None, :] < len_t[:, None]
                mask = torch.zeros((rows, lmax), dtype=self.dtype)
                mask.masked_fill_(~valid, float("-inf"))
                mask = mask.view(1, rows, 1, lmax).to(self.device)
        chunk_specs = []
        for c, want in zip(chunks, sample):
            a = len(ids)
            ids.extend(c.seq.token_id_at(i) for i in range(c.start, c.end))
            pos.extend(range(c.start, c.end))
            slot_parts.append(cache.slots(c.seq.block_table, c.start, c.end).cpu())
            ctx = cache.slots(c.seq.block_table, 0, c.end) if c.start > 0 else None
            chunk_specs.append((a, len(ids), c.start, ctx))
            if want:
                logits_index.append(len(ids) - 1)
        return ForwardBatch(
            input_ids=torch.tensor(ids, device=self.device),
            positions=torch.tensor(pos, device=self.device),
            write_slots=torch.cat(slot_parts).to(self.device),
            num_decode=rows,
            decode_tables=table,
            decode_lens=len_t,
            decode_groups=groups,
            decode_gather=gather,
            decode_mask=mask,
            decode_max_len=lmax,
            chunks=chunk_specs,
            logits_index=torch.tensor(logits_index, dtype=torch.long, device=self.device),
        )

    # -----------------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x.to(dtype)

    @torch.inference_mode()
    def forward(self, b: ForwardBatch) -> torch.Tensor:
        """Runs the batch, writing its K/V into the cache; returns logits [S, vocab] (float32)."""
        n = b.input_ids.shape[0]
        H, KH, D = self.num_heads, self.num_kv_heads, self.head_dim
        native = self.kernel is not None
        if not native:
            cos = self.cos[b.positions][:, None, :]
            sin = self.sin[b.positions][:, None, :]
        h = quant.embedding(b.input_ids, self.embed)
        cache = self.cache
        fp32_cache = cache.scales is None
        glue = native and h.dtype == torch.float32  # fp32 layers: residual add + norm, gate product in one pass each
        pending = None  # (glue) the previous layer's MLP output, which the next norm adds to h first
        for li, L in enumerate(self.layers):
            if L.fused:
                qkv = L.qkv(h)
            elif glue:
                qkv = L.qkv(self.kernel.add_rms_norm(h, pending, L.ln1, self.eps))
            else:
                qkv = L.qkv(self._rms(h, L.ln1))
            if native:  # rotary in place, and the fp32 cache written, in one pass
                kv = (cache.data[li, 0], cache.data[li, 1]) if fp32_cache else (None, None)
                self.kernel.rope_kv_write(qkv, H, KH, self.cos, self.sin, b.positions, *kv, b.write_slots)
            q = qkv[:, : H * D].view(n, H, D)
            k = qkv[:, H * D : (H + KH) * D].view(n, KH, D)
            v = qkv[:, (H + KH) * D :].view(n, KH, D)
            if not native:
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            if not (native and fp32_cache):
                cache.write(li, b.write_slots, k, v)
            out = torch.empty((n, H, D), dtype=h.dtype, device=h.device)
            if b.num_decode:
                out[: b.num_decode] = self._decode_attention(q[: b.num_decode], li, b)
            for a, e, ctx_start, ctx in b.chunks:
                out[a:e] = self._prefill_attention(q[a:e], k[a:e], v[a:e], li, ctx_start, ctx)
            if L.fused:  # norms, gate product and residual adds inside the int8 linears
                h = L.o(out.view(n, H * D), h)
                h = L.down(L.gate_up(h), h)
            elif glue:
                gu = L.gate_up(self.kernel.add_rms_norm(h, L.o(out.view(n, H * D)), L.ln2, self.eps))
                pending = L.down(self.kernel.silu_mul(gu))
            else:
                h = h + L.o(out.view(n, H * D))
                gu = L.gate_up(self._rms(h, L.ln2))
                m = gu.shape[-1] // 2
                h = h + L.down(F.silu(gu[:, :m]) * gu[:, m:])
        h = h[b.logits_index]
        if pending is not None:
            return self.lm_head(self.kernel.add_rms_norm(h, pending[b.logits_index], self.norm, self.eps)).float()
        return self.lm_head(h if self.head_fused else self._rms(h, self.norm)).float()

    def _decode_attention(self, q, li: int, b: ForwardBatch) -> torch.Tensor:
        B, KH, G, D, Lm = b.num_decode, self.num_kv_heads, self.group, self.head_dim, b.decode_max_len
        cache = self.cache
        kc, vc = cache.data[li, 0], cache.data[li, 1]  # [KH, slots, D]
        if self.kernel is not None:
            out = torch.empty((B, KH * G, D), dtype=q.dtype)
            bs = cache.layout.block_size
            if cache.scales is None:
                self.kernel.paged_decode_attention(out, q.contiguous(), kc, vc, b.decode_tables, b.decode_lens, b.decode_groups, bs, self.scale)
            else:
                ks, vs = cache.scales[li, 0], cache.scales[li, 1]
                self.kernel.paged_decode_attention_int8(out, q.contiguous(), kc, vc, ks, vs, b.decode_tables, b.decode_lens,
                                                        b.decode_groups, bs, self.scale)
            return out
        qg = q.view(B, KH, G, D).transpose(0, 1)  # [KH, B, G, D]
        keys, vals = cache.read(li, b.decode_gather, q.dtype)
        keys, vals = keys.view(KH, B, Lm, D), vals.view(KH, B, Lm, D)
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale + b.decode_mask
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, vals).transpose(0, 1).reshape(B, KH * G, D)

    def _prefill_attention(self, q, k, v, li: int, ctx_start: int, ctx) -> torch.Tensor:
        T = q.shape[0]
        qh = q.transpose(0, 1)[None]  # [1, H, T, D]
        if ctx is None:
            kh, vh = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            keys, vals = self.cache.read(li, ctx, q.dtype)
            kh, vh = keys[None], vals[None]
            total = ctx.shape[0]
            allowed = torch.arange(total, device=q.device)[None, :] <= (
                torch.arange(T, device=q.device)[:, None] + ctx_start
            )
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1)
