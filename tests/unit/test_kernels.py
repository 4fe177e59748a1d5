"""The native CPU kernels against float64 definitions, and the builds for CPU classes this machine does not choose.

A CPU runs the best build of its class (kernels/variants.py): AVX-512 with VNNI, AVX2 or generic vector
code, other loops each. Every other class this machine can run is built here too and must compute
what the chosen one computes. (How builds are found, cached, locked and chosen: test_kernel_builds.py.)
"""

import pytest
import torch

from distserve.engine import kernels, quant
from distserve.engine.kernels.variants import cpu_flags, supported

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(kernels.paged_attention() is None or kernels.int8_linear() is None, reason="no C++ compiler here"),
]

LENS = [1, 7, 16, 33, 290]
NONE = torch.empty(0, dtype=torch.long)  # row groups: one row per sequence


def reference_attention(q, kc, vc, tables, lens, bs, scale):
    """softmax(q K^T * scale) V per (sequence, query head) in float64; kc, vc [KH, slots, D] (fp32)."""
    B, H, D = q.shape
    KH = kc.shape[0]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        t = torch.arange(int(lens[b]))
        slots = tables[b][t // bs] * bs + t % bs
        k, v = kc[:, slots].double(), vc[:, slots].double()  # [KH, L, D]
        qg = q[b].double().view(KH, H // KH, D)
        p = torch.softmax(torch.einsum("hgd,hld->hgl", qg, k) * scale, dim=-1)
        out[b] = torch.einsum("hgl,hld->hgd", p, v).reshape(H, D)
    return out


def paged_case(D, KH, G, bs, seed, blocks=64):
    g = torch.Generator().manual_seed(seed)
    kc, vc = torch.randn(KH, blocks * bs, D, generator=g), torch.randn(KH, blocks * bs, D, generator=g)
    need = (max(LENS) + bs - 1) // bs
    tables = torch.stack([torch.randperm(blocks, generator=g)[:need] for _ in LENS])  # scattered blocks
    q = torch.randn(len(LENS), KH * G, D, generator=g)
    return q, kc, vc, tables, torch.tensor(LENS)


def quantized(kc, bs):
    """An int8 cache with per-block scales holding kc, and its dequantised values."""
    KH, S, D = kc.shape
    codes, scales, slots = torch.zeros(KH, S, D, dtype=torch.int8), torch.zeros(KH, S // bs), torch.arange(S)
    quant.kv_write_int8_torch(codes, scales, slots, kc.transpose(0, 1).contiguous(), bs)
    return codes, scales, quant.dequantize_kv(codes, scales, slots, bs)


@pytest.mark.parametrize("D,KH,G,bs", [(64, 3, 3, 16), (16, 2, 2, 16), (128, 2, 4, 8), (80, 1, 5, 16)])
def test_paged_decode_attention_matches_the_definition(D, KH, G, bs):
    mod = kernels.paged_attention()
    if not mod.supports_head_dim(D):
        pytest.skip(f"head_dim {D} is not a multiple of this machine's vector width")
    q, kc, vc, tables, lens = paged_case(D, KH, G, bs, seed=D)
    out = torch.full_like(q, float("nan"))
    mod.paged_decode_attention(out, q, kc, vc, tables, lens, NONE, bs, D**-0.5)
    assert (out.double() - reference_attention(q, kc, vc, tables, lens, bs, D**-0.5)).abs().max() < 1e-5

    kq, ks, kd = quantized(kc, bs)
    vq, vs, vd = quantized(vc, bs)
    out.fill_(float("nan"))
    mod.paged_decode_attention_int8(out, q, kq, vq, ks, vs, tables, lens, NONE, bs, D**-0.5)
    assert (out.double() - reference_attention(q, kd, vd, tables, lens, bs, D**-0.5)).abs().max() < 1e-5


@pytest.mark.parametrize("int8", [False, True])
def test_a_sequences_draft_rows_attend_together_each_up_to_itself(int8):
    """Speculative rows: a sequence's last token and its drafts at consecutive positions share its block
    table and are attended in one pass over its K/V, each row seeing the context up to itself; the
    result is what each row attended alone gives (and the definition)."""
    mod = kernels.paged_attention()
    D, KH, G, bs = 64, 3, 3, 16
    q, kc, vc, tables, _ = paged_case(D, KH, G, bs, seed=5)
    per_seq, first = [4, 1, 6], [30, 7, 281]  # rows of three sequences (lengths cross block edges), first rows' lengths
    lens = torch.tensor([f + j for f, n in zip(first, per_seq) for j in range(n)])
    rows = int(lens.numel())
    tab = tables[:3].repeat_interleave(torch.tensor(per_seq), dim=0).contiguous()
    qr = torch.randn(rows, KH * G, D, generator=torch.Generator().manual_seed(6))
    groups = torch.tensor([0, 4, 5, 11])
    if int8:
        kq, ks, kd = quantized(kc, bs)
        vq, vs, vd = quantized(vc, bs)
        run = lambda out, gr: mod.paged_decode_attention_int8(out, qr, kq, vq, ks, vs, tab, lens, gr, bs, D**-0.5)  # noqa: E731
        ref = reference_attention(qr, kd, vd, tab, lens, bs, D**-0.5)
    else:
        run = lambda out, gr: mod.paged_decode_attention(out, qr, kc, vc, tab, lens, gr, bs, D**-0.5)  # noqa: E731
        ref = reference_attention(qr, kc, vc, tab, lens, bs, D**-0.5)
    together, alone = torch.full_like(qr, float("nan")), torch.full_like(qr, float("nan"))
    run(together, groups)
    run(alone, NONE)
    assert (together - alone).abs().max() < 1e-5
    assert (together.double() - ref).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="consecutive"):
        run(together, torch.tensor([0, 5, 11]))  # rows 4 and 5 are not one sequence's
    with pytest.raises(RuntimeError, match="row count"):
        run(together, torch.tensor([0, 4, 5]))


def test_a_head_size_the_kernel_does_not_take_is_refused_with_a_clear_error():
    mod = kernels.paged_attention()
    assert not mod.supports_head_dim(12)  # no vector width divides it
    q, kc, vc, tables, lens = paged_case(12, 1, 2, 16, seed=1)
    with pytest.raises(RuntimeError, match="head_dim 12"):
        mod.paged_decode_attention(torch.empty_like(q), q, kc, vc, tables, lens, NONE, 16, 0.3)


LANES = {"avx512vnni": 16, "avx2": 8, "generic": 4}  # fp32 lanes of vec.h's code path per build


def other_variants() -> list[str]:
    """The classes this CPU runs besides the one it chose."""
    chosen = kernels.status()["paged_attention"].variant
    return [v.name for v in supported(cpu_flags()) if v.name != chosen]


@pytest.mark.parametrize("variant", ["avx512vnni", "avx2", "generic"])
def test_another_instruction_set_build_computes_what_the_native_one_computes(variant):
    if variant not in other_variants():
        pytest.skip(f"{variant}: this machine chose it, or cannot run it")
    lanes = LANES[variant]
    pa, il = kernels.load("paged_attention", variant=variant), kernels.load("int8_linear", variant=variant)
    assert pa is not None and il is not None
    nat_pa, nat_il = kernels.paged_attention(), kernels.int8_linear()
    assert pa.supports_head_dim(lanes * 3) and not pa.supports_head_dim(lanes * 3 + 2)

    q, kc, vc, tables, lens = paged_case(64, 3, 3, 16, seed=2)
    a, b = torch.empty_like(q), torch.empty_like(q)
    pa.paged_decode_attention(a, q, kc, vc, tables, lens, NONE, 16, 0.125)
    nat_pa.paged_decode_attention(b, q, kc, vc, tables, lens, NONE, 16, 0.125)
    assert (a - b).abs().max() < 1e-5
    kq, ks, _ = quantized(kc, 16)
    vq, vs, _ = quantized(vc, 16)
    pa.paged_decode_attention_int8(a, q, kq, vq, ks, vs, tables, lens, NONE, 16, 0.125)
    nat_pa.paged_decode_attention_int8(b, q, kq, vq, ks, vs, tables, lens, NONE, 16, 0.125)
    assert (a - b).abs().max() < 1e-5

    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(5, 12 * 16, generator=g)
    cos, sin, pos = torch.rand(50, 16, generator=g), torch.rand(50, 16, generator=g), torch.tensor([0, 1, 2, 30, 49])
    other = qkv.clone()
    pa.rope_kv_write(qkv, 6, 3, cos, sin, pos)
    nat_pa.rope_kv_write(other, 6, 3, cos, sin, pos)
    assert (qkv - other).abs().max() < 1e-5

    h, x, nw = torch.randn(5, 37, generator=g), torch.randn(5, 37, generator=g), torch.rand(37, generator=g)
    h2 = h.clone()
    assert (pa.add_rms_norm(h, x, nw, 1e-5) - nat_pa.add_rms_norm(h2, x, nw, 1e-5)).abs().max() < 1e-5 and torch.equal(h, h2)
    gu = torch.randn(5, 2 * 37, generator=g)
    assert (pa.silu_mul(gu) - nat_pa.silu_mul(gu)).abs().max() < 1e-5

    w = quant.quantize_weight(torch.randn(300, 576, generator=g) * 0.02)  # 300: a padded last block
    res, norm = torch.randn(13, 300, generator=g), torch.rand(576, generator=g) + 0.5
    w2 = quant.quantize_weight(torch.randn(64, 288, generator=g) * 0.02)
    cases = [(w, torch.randn(13, 576, generator=g), 0, None, res), (w, torch.randn(13, 576, generator=g), 1, norm, res),
             (w2, torch.randn(9, 576, generator=g), 2, None, None)]  # none, rms_norm, silu_mul
    for wq, x, prologue, nw, r in cases:
        args = (x, wq.codes, wq.scale, wq.offset, wq.n_out, None, prologue, nw, 1e-5, r)
        want = nat_il.int8_linear(*args)
        # fp32 sums in another order can move one int16 code
        assert (il.int8_linear(*args) - want).abs().max() <= 2e-5 * want.abs().max(), prologue


def test_rope_kv_write_rotates_q_and_k_in_place_and_stores_k_and_v_at_their_slots():
    mod = kernels.paged_attention()
    g = torch.Generator().manual_seed(4)
    n, H, KH, D, slots_total = 7, 6, 2, 16, 64
    cos, sin = torch.rand(100, D, generator=g), torch.rand(100, D, generator=g)
    qkv = torch.randn(n, (H + 2 * KH) * D, generator=g)
    pos = torch.tensor([0, 5, 99, 3, 3, 42, 17])
    slots = torch.randperm(slots_total, generator=g)[:n]
    kc, vc = torch.zeros(KH, slots_total, D), torch.zeros(KH, slots_total, D)

    def rotate(x):  # transformers' rotate-half convention
        c, s = cos[pos][:, None], sin[pos][:, None]
        return x * c + torch.cat((-x[..., D // 2:], x[..., : D // 2]), dim=-1) * s

    q, k, v = qkv[:, : H * D].view(n, H, D), qkv[:, H * D : (H + KH) * D].view(n, KH, D), qkv[:, (H + KH) * D :].view(n, KH, D)
    want_q, want_k, want_v = rotate(q), rotate(k), v.clone()
    mod.rope_kv_write(qkv, H, KH, cos, sin, pos, kc, vc, slots)
    assert torch.allclose(qkv[:, : H * D].view(n, H, D), want_q, atol=1e-6)
    assert torch.allclose(qkv[:, H * D : (H + KH) * D].view(n, KH, D), want_k, atol=1e-6)
    assert torch.equal(qkv[:, (H + KH) * D :].view(n, KH, D), want_v)  # values are not rotated
    assert torch.allclose(kc[:, slots].transpose(0, 1), want_k, atol=1e-6) and torch.equal(vc[:, slots].transpose(0, 1), want_v)
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    assert not kc[:, untouched].any() and not vc[:, untouched].any()
    # rotation only (an int8 cache quantises on its own write), and bad positions are refused
    again = torch.randn(n, (H + 2 * KH) * D, generator=g)
    ref = rotate(again[:, : H * D].view(n, H, D))
    mod.rope_kv_write(again, H, KH, cos, sin, pos)
    assert torch.allclose(again[:, : H * D].view(n, H, D), ref, atol=1e-6)
    with pytest.raises(RuntimeError, match="position out of the rotary table"):
        mod.rope_kv_write(again, H, KH, cos, sin, torch.tensor([0, 1, 2, 3, 4, 5, 100]))


@pytest.mark.parametrize("K", [576, 37])  # 37: lanes and a tail
def test_fp32_layer_glue_adds_the_residual_in_place_and_norms_and_gates_as_llama_does(K):
    mod = kernels.paged_attention()
    g = torch.Generator().manual_seed(5)
    h, x, w = torch.randn(9, K, generator=g), torch.randn(9, K, generator=g), torch.rand(K, generator=g) + 0.5
    want_h = h.double() + x.double()
    want = w.double() * want_h * torch.rsqrt(want_h.pow(2).mean(-1, keepdim=True) + 1e-5)
    y = mod.add_rms_norm(h, x, w, 1e-5)
    assert torch.allclose(h.double(), want_h, atol=1e-6) and torch.allclose(y.double(), want, atol=1e-5)
    before = h.clone()
    y = mod.add_rms_norm(h, None, w, 1e-6)  # no residual: h is left as it is
    assert torch.equal(h, before)
    assert torch.allclose(y.double(), w.double() * before.double() * torch.rsqrt(before.double().pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-5)
    gu = torch.randn(9, 2 * K, generator=g) * 4
    gd = gu.double()
    assert torch.allclose(mod.silu_mul(gu).double(), torch.nn.functional.silu(gd[:, :K]) * gd[:, K:], atol=1e-5)
    with pytest.raises(RuntimeError, match="the shape of h"):
        mod.add_rms_norm(h, torch.randn(9, K + 1), w, 1e-5)
    with pytest.raises(RuntimeError, match=r"gu: contiguous fp32 \[n, 2m\]"):
        mod.silu_mul(torch.randn(3, 5))
