"""int8 numerics: the weight quantiser, the native int8 linear against its definition, the int8 KV
cache (native write/attention against the torch paths, export/import round trip), and the int8
engine on tiny-llama against transformers running the dequantised weights."""


import pytest
import torch
import torch.nn.functional as F

from distserve.engine import kernels, quant
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.kv_cache import KVLayout, PagedKVCache
from distserve.engine.models import load_model
from distserve.engine.sampling import SamplingParams
from tests.engine_helpers import prompts, run_prompts, run_to_end

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def test_quantiser_picks_the_better_grid_and_reproduces_4_and_8_bit_grids_exactly():
    g = torch.Generator().manual_seed(0)
    # a Q4_1-like row (16 levels from a per-32 minimum) and a Q8_0-like row (symmetric, +-127 codes)
    d, m = torch.rand(8, 1, generator=g) * 0.01, -torch.rand(8, 1, generator=g) * 0.05
    q4 = (torch.randint(0, 16, (8, 32), generator=g).float() * d + m)
    q4[:, 0], q4[:, 1] = m[:, 0], m[:, 0] + 15 * d[:, 0]
    q8 = torch.randint(-127, 128, (8, 32), generator=g).float() * d
    q8[:, 0] = 127 * d[:, 0]
    w = torch.cat([q4, q8], dim=1).repeat(3, 1)  # [24, 64]: groups of both kinds, rows not a multiple of 16
    q = quant.quantize_weight(w)
    assert q.codes.shape == (2, 64, 16) and q.n_out == 24
    back = quant.dequantize_weight(q)
    assert torch.allclose(back, w, rtol=0, atol=1e-6)
    # random weights: error bounded by half a step of the better grid
    r = torch.randn(40, 96, generator=g)
    err = (quant.dequantize_weight(quant.quantize_weight(r)) - r).abs().max()
    assert 0 < err <= r.abs().max() / 127


@pytest.mark.skipif(kernels.int8_linear() is None, reason="no C++ compiler here")
@pytest.mark.parametrize("rows", [1, 3, 16, 37])
def test_native_int8_linear_matches_its_definition_with_each_prologue(rows):
    g = torch.Generator().manual_seed(rows)
    N, K = 50, 96
    q = quant.quantize_weight(torch.randn(N, K, generator=g) * 0.1)
    w = quant.dequantize_weight(q)
    bias, res, norm = torch.randn(N, generator=g), torch.randn(rows, N, generator=g), torch.rand(K, generator=g) + 0.5
    x = torch.randn(rows, K, generator=g)
    cases = [
        (quant.Int8Linear(q, bias), x, None, x @ w.T + bias),
        (quant.Int8Linear(q, None, "rms_norm", norm, 1e-5), x, res,
         res + (norm * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))) @ w.T),
    ]
    gu = torch.randn(rows, 2 * K, generator=g)
    cases.append((quant.Int8Linear(q, None, "silu_mul"), gu, None, (F.silu(gu[:, :K]) * gu[:, K:]) @ w.T))
    for lin, inp, r, want in cases:
        got = lin(inp, r)
        assert got.shape == (rows, N)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), lin.prologue
    table = quant.embedding(torch.tensor([0, 7, 49, 16]), q)
    assert torch.equal(table, w[[0, 7, 49, 16]])


def test_prefill_gemm_auto_is_the_native_kernel_on_vnni_cpus_and_the_fp32_gemm_elsewhere():
    assert quant.resolve_prefill_gemm("auto", frozenset({"avx512f", "avx512_vnni", "avx512_bf16"})) == "native"
    assert quant.resolve_prefill_gemm("auto", frozenset({"avx512f", "avx2", "fma"})) == "fp32"
    assert quant.resolve_prefill_gemm("native", frozenset()) == "native"
    assert quant.resolve_prefill_gemm("fp32", frozenset({"avx512_vnni"})) == "fp32"
    assert quant.resolve_prefill_gemm("bf16", frozenset()) == "bf16"  # asked for: emulated if need be
    assert quant.GEMM_DTYPES == {"native": None, "fp32": torch.float32, "bf16": torch.bfloat16}
    with pytest.raises(ValueError, match="prefill_gemm must be one of"):
        quant.resolve_prefill_gemm("fp16")
    with pytest.raises(ValueError, match="prefill_gemm must be one of"):
        EngineConfig(prefill_gemm="int8")


@pytest.mark.skipif(kernels.int8_linear() is None, reason="no C++ compiler here")
def test_each_prefill_gemm_takes_over_at_its_row_threshold_within_its_error():
    g = torch.Generator().manual_seed(5)
    N, K = 72, 128
    q = quant.quantize_weight(torch.randn(N, K, generator=g) * 0.1)
    w = quant.dequantize_weight(q)
    bias, norm = torch.randn(N, generator=g), torch.rand(K, generator=g) + 0.5
    lin = {d: quant.Int8Linear(q, bias, "rms_norm", norm, 1e-5, gemm_dtype=d) for d in (None, torch.float32, torch.bfloat16)}
    for rows in (quant.PREFILL_ROWS - 1, quant.PREFILL_ROWS):
        x, res = torch.randn(rows, K, generator=g), torch.randn(rows, N, generator=g)
        want = res + (norm * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))) @ w.T + bias
        native, fp32, bf16 = (lin[d](x, res) for d in (None, torch.float32, torch.bfloat16))
        for got in (native, fp32, bf16):
            assert got.dtype == torch.float32 and got.shape == (rows, N)
        assert (native - want).abs().max() <= 1e-4 * want.abs().max()
        assert (fp32 - want).abs().max() <= 1e-4 * want.abs().max()
        if rows < quant.PREFILL_ROWS:  # below the threshold every setting runs the kernel
            assert torch.equal(fp32, native) and torch.equal(bf16, native)
        else:  # from it, the GEMMs: fp32 off the kernel in the last bits, bf16 by bf16 rounding
            assert not torch.equal(fp32, native) and not torch.equal(bf16, fp32)
            assert (bf16 - want).abs().max() <= 2e-2 * want.abs().max()


def test_prefill_gemm_settings_keep_the_first_tokens_and_bf16_names_its_cache_apart(tiny):
    ps = prompts(8, seed=3, lo=70, hi=120)  # one prefill step of >= 560 rows: the GEMMs take it
    seen = {}
    for gemm in ("native", "fp32", "bf16"):
        eng = LLMEngine(tiny, EngineConfig(num_blocks=100, weights="int8", prefill_gemm=gemm))
        seen[gemm] = (eng.prefix_root, run_prompts(eng, ps, SamplingParams(max_tokens=1, temperature=0.0)))
    assert seen["native"][0] == seen["fp32"][0] != seen["bf16"][0]  # bf16's cached blocks answer only bf16
    assert seen["native"][1] == seen["fp32"][1]
    assert sum(seen["fp32"][1][k] == seen["bf16"][1][k] for k in seen["fp32"][1]) >= 7, seen


def test_int8_engine_matches_transformers_on_the_dequantised_weights(tiny):
    fake = load_model("tiny-llama", device="cpu")
    with torch.no_grad():
        for m in fake.model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.copy_(quant.dequantize_weight(quant.quantize_weight(m.weight)))
    ps = prompts(6, seed=11, hi=90)
    eng = LLMEngine(tiny, EngineConfig(num_blocks=100, weights="int8", prefill_gemm="fp32"))  # the exact path
    assert eng.runner.weights.fmt == "int8"
    outs = run_prompts(eng, ps, GREEDY)
    for i, p in enumerate(ps):
        ids = torch.tensor([p])
        ref = fake.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        assert outs[str(i)] == ref[0, len(p):].tolist(), f"request {i}"


def _int8_cache(num_blocks=12, block_size=4, device="cpu"):
    return PagedKVCache(KVLayout(2, 2, 16, block_size, torch.int8), num_blocks, torch.device(device))


def test_int8_cache_write_grows_block_scales_and_requantises_like_the_torch_path():
    g = torch.Generator().manual_seed(3)
    native, ref = _int8_cache(), _int8_cache()
    ref._writer = None  # the torch path
    table = [5, 2, 9]
    # a prompt of 6 tokens, then 5 decode steps one token at a time, growing in magnitude
    steps = [torch.arange(0, 6)] + [torch.tensor([t]) for t in range(6, 11)]
    for pos in steps:
        slots = native.slots(table, int(pos[0]), int(pos[-1]) + 1)
        scale = 1.0 + pos[:, None, None].float()  # later tokens are larger: scales must grow
        k = torch.randn(len(pos), 2, 16, generator=g) * scale
        v = torch.randn(len(pos), 2, 16, generator=g) * scale
        for cache in (native, ref):
            cache.write(1, slots, k, v)
    slots = native.slots(table, 0, 11)
    for a, b in zip(native.read(1, slots, torch.float32), ref.read(1, slots, torch.float32)):
        assert torch.allclose(a, b, atol=1e-5 * a.abs().max())
    assert torch.equal(native.scales[1, :, :, table], ref.scales[1, :, :, table])
    assert (native.scales[0] == 0).all()  # layer 0 was never written


def test_int8_cache_round_trips_bit_exact_and_holds_about_4x_the_tokens():
    g = torch.Generator().manual_seed(4)
    src = _int8_cache()
    table = [3, 7, 1]
    slots = src.slots(table, 0, 10)
    for layer in range(2):
        src.write(layer, slots, torch.randn(10, 2, 16, generator=g), torch.randn(10, 2, 16, generator=g))
    kv = src.export(table, 10)
    assert kv.dtype == torch.int8 and tuple(kv.shape) == src.layout.export_shape(10) == (2, 2, 10, 2, 20)
    dst = _int8_cache()
    other = [11, 0, 4]
    dst.load(other, kv)
    assert torch.equal(dst.export(other, 10), kv)
    for layer in range(2):
        a, b = src.read(layer, slots, torch.float32), dst.read(layer, dst.slots(other, 0, 10), torch.float32)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # another block size: requantised on import, values still close
    regrid = PagedKVCache(KVLayout(2, 2, 16, 8, torch.int8), 6, torch.device("cpu"))
    regrid.load([2, 5], kv)
    got = regrid.read(0, regrid.slots([2, 5], 0, 10), torch.float32)[0]
    want = src.read(0, slots, torch.float32)[0]
    assert (got - want).abs().max() <= 2 * regrid.scales[0, 0].max() + 1e-6
    fp32 = KVLayout(30, 3, 64, 16, torch.float32)
    int8 = KVLayout(30, 3, 64, 16, torch.int8)
    assert 3.9 < fp32.bytes_per_block / int8.bytes_per_block < 4.0


def test_int8_kv_engine_is_the_same_colocated_and_through_export_import(tiny):
    ps = prompts(5, seed=12, hi=90)
    want = run_prompts(LLMEngine(tiny, EngineConfig(num_blocks=100, kv_dtype="int8")), ps, GREEDY)
    pre = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=100, kv_dtype="int8"))
    dec = LLMEngine(tiny, EngineConfig(mode="decode", num_blocks=100, kv_dtype="int8"))
    dec.blocks.allocate(5)  # other physical blocks on the receiving side
    for i, p in enumerate(ps):
        pre.add_request(str(i), p, GREEDY)
    firsts = {o.request_id: o.new_token_ids[0] for o in run_to_end_outputs(pre)}
    got = {}
    for i, p in enumerate(ps):
        rid = str(i)
        kv = pre.export_kv(rid)
        pre.free(rid)
        dec.reserve(rid, p, GREEDY)
        dec.admit_prefilled(rid, firsts[rid], None, kv)
        got[rid] = [firsts[rid]]
    for rid, toks in run_to_end(dec).items():
        got[rid] += toks
    assert got == want
    assert all(len(t) == 16 for t in got.values())
    # the torch attention path (no native kernel) gives the same tokens
    torch_path = LLMEngine(tiny, EngineConfig(num_blocks=100, kv_dtype="int8"))
    torch_path.runner.kernel = None
    torch_path.cache._writer = None
    assert run_prompts(torch_path, ps, GREEDY) == want


def run_to_end_outputs(engine):
    outs = []
    while engine.has_work():
        outs.extend(engine.step())
    return outs
