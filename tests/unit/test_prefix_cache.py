"""Automatic prefix caching: the block manager's reference counts and LRU, the hash chain, the Bloom
filter workers publish, and the engine on the seeded tiny Llama (greedy output identical with and
without the cache, through every path)."""

import random

import pytest
import torch

from distserve.engine.block_manager import BlockManager
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.prefix import BlockBloom, _probes, block_hashes, bloom_bits, root_hash
from distserve.engine.sampling import SamplingParams
from tests.engine_helpers import run_to_end

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


# -- block manager ---------------------------------------------------------------------------------
def test_cached_blocks_are_shared_kept_after_free_and_evicted_oldest_first():
    bm = BlockManager(6, 4)
    a = bm.allocate(3)
    for i, b in enumerate(a):
        assert bm.register(b, 100 + i)
    assert bm.match([100, 101, 102, 999]) == a
    bm.acquire(a[:2])  # a second user of the first two
    bm.free(a)
    assert bm.num_free == 4  # the third block is evictable (free), the first two still used
    assert bm.match([100, 101, 102]) == a  # still cached
    bm.free(a[:2])
    assert bm.num_free == 6 and bm.num_cached == 3
    # allocate takes never-cached blocks first, then evicts the least recently used cached one
    fresh = bm.allocate(3)
    assert not set(fresh) & set(a) and bm.evictions == 0
    [evicted] = bm.allocate(1)
    assert evicted == a[2] and bm.evictions == 1  # freed first (a sequence's tail goes first)
    assert bm.match([100, 101, 102]) == a[:2]
    with pytest.raises(RuntimeError):
        bm.free(a[:1])  # not in use: a double free


def test_acquire_takes_cached_blocks_off_the_free_count_and_register_refuses_duplicates():
    bm = BlockManager(4, 4)
    [b] = bm.allocate(1)
    assert bm.register(b, 7) and not bm.register(b, 8)
    [c] = bm.allocate(1)
    assert not bm.register(c, 7)  # another block holds that prefix: c stays private
    v = bm.version
    bm.free([b, c])
    assert bm.num_free == 4 and bm.evictable_among([b]) == 1
    bm.acquire([b])
    assert bm.num_free == 3 and bm.evictable_among([b]) == 0 and bm.version == v


# -- hashes and the Bloom filter --------------------------------------------------------------------
def test_block_hashes_name_prefixes():
    root = root_hash("m", "float32", 4)
    a = block_hashes(list(range(1, 14)), 4, root)
    assert len(a) == 3  # full blocks only
    b = block_hashes(list(range(1, 9)) + [99, 10, 11, 12], 4, root)
    assert a[:2] == b[:2] and a[2] != b[2]
    c = block_hashes([0] + list(range(2, 13)), 4, root)
    assert all(x != y for x, y in zip(a, c))  # one token early changes every later block's name
    assert block_hashes(list(range(1, 13)), 4, root_hash("m", "int8", 4))[0] != a[0]  # another KV dtype
    assert block_hashes(list(range(5, 13)), 4, root, parent=a[0]) == a[1:]  # the chain continues


def test_bloom_holds_every_hash_and_its_two_builds_agree():
    rng = random.Random(0)
    held = [rng.getrandbits(64) for _ in range(1000)]
    bloom = BlockBloom.build(held, capacity=1000)
    assert bloom.m == bloom_bits(1000) and all(h in bloom for h in held)
    others = [rng.getrandbits(64) for _ in range(20000)]
    assert sum(h in bloom for h in others) / len(others) < 0.03  # about 1% false positives
    buf = bytearray(bloom.m // 8)  # the pure-Python way (what a router tests against)
    for h in held:
        for j in _probes(h, bloom.m):
            buf[j >> 3] |= 1 << (j & 7)
    assert bytes(buf) == bloom.bits
    assert bloom.prefix_blocks(held[:5] + others[:1] + held[5:]) == 5


# -- the engine ---------------------------------------------------------------------------------------
def reference(lm, prompt, n):
    ids = torch.tensor([prompt])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def shared_prompts(n, seed=0, system=53):
    """A common 'system prompt', then each request's own tail (one prompt repeated whole, one a multiple of 16)."""
    rng = random.Random(seed)
    sys_ids = [rng.randrange(3, 259) for _ in range(system)]
    out = [sys_ids + [rng.randrange(3, 259) for _ in range(rng.randrange(1, 40))] for _ in range(n)]
    out.append(list(out[0]))  # fully cached but its last block
    out.append(sys_ids[:48])  # exactly three blocks, all cached: the last is computed again
    return out


def run_in_waves(eng, ps, params=GREEDY):
    """The first prompt alone (it fills the cache), then the rest together."""
    eng.add_request("0", ps[0], params)
    outs = run_to_end(eng)
    for i, p in enumerate(ps[1:], start=1):
        eng.add_request(str(i), p, params)
    return run_to_end(eng, outs)


@pytest.mark.parametrize("kv_dtype,chunked", [("auto", False), ("auto", True), ("int8", False), ("int8", True)])
def test_greedy_output_is_identical_with_and_without_the_cache(tiny, kv_dtype, chunked):
    """fp32 KV: identical, and equal to transformers. int8 KV: a prompt's uncached end attends to its
    cached start as read back from int8 (as any chunked prefill does), where an uncached prefill
    attends to its own fresh values; the tiny random model's near-flat logits turn that into other
    tokens for some prompts (as chunked against whole prefill does without any cache), so int8 is
    held to the KV itself (test_int8_cached_prefix_kv_is_what_an_uncached_prefill_writes)."""
    ps = shared_prompts(8)
    outs = {}
    for caching in (True, False):
        eng = LLMEngine(tiny, EngineConfig(num_blocks=120, kv_dtype=kv_dtype, chunked_prefill=chunked,
                                           max_num_batched_tokens=64, prefix_caching=caching))
        outs[caching] = run_in_waves(eng, ps)
        st = eng.stats()
        assert st.free_blocks == st.total_blocks  # everything freed (cached blocks are free blocks)
        if caching:
            assert st.prefix_hit_tokens >= 48 * (len(ps) - 2) + 32 and st.prefix_cached_blocks > 0
        else:
            assert st.prefix_hit_tokens == 0 and st.prefix_cached_blocks == 0
    if kv_dtype == "int8":
        return
    assert outs[True] == outs[False]
    for i, p in enumerate(ps):
        assert outs[True][str(i)] == reference(tiny, p, GREEDY.max_tokens), f"request {i}"


def test_int8_cached_prefix_kv_is_what_an_uncached_prefill_writes(tiny):
    """With int8 KV the exported prompt KV of a prefill that took its start from the cache holds, for
    the cached tokens, exactly the codes and scales an uncached prefill writes (cached blocks are never
    written again), and for the rest values within a fraction of a quantization step on average."""
    ps = shared_prompts(3, seed=5)
    ex, cached = {}, {}
    for caching in (True, False):
        pre = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=100, kv_dtype="int8", prefix_caching=caching))
        for i, p in enumerate(ps):
            pre.add_request(str(i), p, GREEDY)
            while pre.has_work():
                for o in pre.step():
                    cached[(caching, i)] = o.num_cached_tokens
            ex[(caching, i)] = pre.export_kv(str(i))
            pre.free(str(i))
    D = pre.layout.head_dim
    for i in range(1, len(ps)):
        n = cached[(True, i)]
        assert n >= 32 and cached[(False, i)] == 0
        a, b = ex[(True, i)], ex[(False, i)]
        assert torch.equal(a[:, :, :n], b[:, :, :n])  # [layers, 2, tokens, heads, D + scale bytes]
        scale = b[..., D:].contiguous().view(torch.float32)
        diff = (a[..., :D].float() * a[..., D:].contiguous().view(torch.float32) - b[..., :D].float() * scale).abs()
        assert float((diff / scale.clamp_min(1e-12)).mean()) < 0.5


def test_outputs_report_the_cached_prompt_tokens(tiny):
    eng = LLMEngine(tiny, EngineConfig(num_blocks=60, prefix_caching=True))
    ps = shared_prompts(1, system=40)
    cached = {}
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, GREEDY)
        while eng.has_work():
            for o in eng.step():
                if o.new_token_ids and o.num_output_tokens == 1:
                    cached[o.request_id] = o.num_cached_tokens
    assert cached["0"] == 0
    assert cached["1"] == (len(ps[1]) - 1) // 16 * 16  # all its full blocks but one holding its last token
    assert cached["2"] == 32  # 40 tokens: two full blocks of ps[0]'s three


def test_eviction_under_pressure_keeps_outputs_right(tiny):
    """A cache too small for every prefix: blocks are evicted to admit prompts, outputs stay exact."""
    rng = random.Random(3)
    ps = [[rng.randrange(3, 259) for _ in range(rng.randrange(40, 90))] for _ in range(6)]
    ps += [p[:50] + [7, 8, 9] for p in ps]  # each prompt's prefix again, after the others pushed it out or not
    eng = LLMEngine(tiny, EngineConfig(num_blocks=20, max_num_seqs=2, prefix_caching=True))
    outs = {}
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, GREEDY)
        run_to_end(eng, outs)
    st = eng.stats()
    assert st.prefix_evictions > 0 and st.free_blocks == st.total_blocks
    for i, p in enumerate(ps):
        assert outs[str(i)] == reference(tiny, p, GREEDY.max_tokens), f"request {i}"


@pytest.mark.parametrize("kv_dtype", ["auto"])
def test_prefill_from_cache_then_export_import_decode_matches(tiny, kv_dtype):
    """A prefill worker that took most of a prompt from its cache exports the whole prompt's KV; the
    decode worker continues it exactly as when nothing was cached, and caches what it imported and
    decoded, so the conversation's next turn finds its history there."""
    ps = shared_prompts(3, seed=5)
    firsts = {}
    results = {}
    for caching in (True, False):
        cfg = dict(kv_dtype=kv_dtype, prefix_caching=caching)
        pre = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=100, **cfg))
        dec = LLMEngine(tiny, EngineConfig(mode="decode", num_blocks=100, **cfg))
        outs = {}
        for i, p in enumerate(ps):
            rid = str(i)
            pre.add_request(rid, p, GREEDY)
            while pre.has_work():
                for o in pre.step():
                    firsts[rid] = o.new_token_ids[0]
                    if caching and i > 0:
                        assert o.num_cached_tokens >= 32
            kv = pre.export_kv(rid)
            pre.free(rid)
            dec.reserve(rid, p, GREEDY)
            assert dec.admit_prefilled(rid, firsts[rid], None, kv) is None
            outs[rid] = [firsts[rid]] + run_to_end(dec).get(rid, [])
        results[caching] = outs
        if caching:  # the next turn: history (prompt + answer) plus a new message, prefilled on the decode worker
            nxt = ps[0] + outs["0"] + [5, 6, 7]
            dec.add_request("turn2", nxt, GREEDY)
            got = {}
            while dec.has_work():
                for o in dec.step():
                    if o.num_output_tokens == 1:
                        got[o.request_id] = o.num_cached_tokens
            # every full block of the history whose KV it has: the imported prompt and the decoded answer
            # (all but the last answer token, whose KV is never computed)
            assert got["turn2"] == (len(ps[0]) + len(outs["0"]) - 1) // 16 * 16
    assert results[True] == results[False]
    if kv_dtype == "auto":
        for i, p in enumerate(ps):
            assert results[True][str(i)] == reference(tiny, p, GREEDY.max_tokens)


def test_metrics_count_hits_and_evictions_from_the_engines_totals(tiny):
    from distserve.metrics import Metrics

    m = Metrics("prefill")
    eng = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=8, prefix_caching=True))
    rng = random.Random(9)
    ps = shared_prompts(2, seed=9, system=40) + [[rng.randrange(3, 259) for _ in range(64)] for _ in range(3)]
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, GREEDY)
        run_to_end(eng)
        eng.free(str(i))
        m.observe_engine(eng.stats())
    st = eng.stats()
    value = lambda name: m.registry.get_sample_value(name, {"role": "prefill"})  # noqa: E731
    assert value("distserve_prefix_cache_queried_tokens_total") == sum(map(len, ps)) == st.prefix_query_tokens
    assert value("distserve_prefix_cache_hit_tokens_total") == st.prefix_hit_tokens > 0
    assert value("distserve_prefix_cache_evictions_total") == st.prefix_evictions > 0  # 8 blocks hold few prompts
    assert value("distserve_prefix_cache_blocks") == st.prefix_cached_blocks > 0
