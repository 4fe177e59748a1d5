"""The engine on the seeded tiny Llama: greedy output must be token-identical to transformers'
own `generate` on the same weights, through every path."""

import random

import pytest
import torch

from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.errors import InvalidRequest, NotFound, ResourceExhausted
from distserve.engine.sampling import SamplingParams
from distserve.engine.sequence import FinishReason
from tests.engine_helpers import prompts, run_to_end

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def reference(lm, prompt, max_tokens):
    ids = torch.tensor([prompt])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("chunked", [False, True])
def test_colocated_greedy_matches_transformers_with_joins_mid_run(tiny, chunked):
    eng = LLMEngine(tiny, EngineConfig(num_blocks=200, chunked_prefill=chunked, max_num_batched_tokens=64))
    ps = prompts(12, seed=1)
    outs = {}
    for i, p in enumerate(ps[:6]):
        eng.add_request(str(i), p, GREEDY)
    for _ in range(5):  # some requests are decoding when the rest arrive
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    for i, p in enumerate(ps[6:], start=6):
        eng.add_request(str(i), p, SamplingParams(max_tokens=5 + i, temperature=0.0))
    run_to_end(eng, outs)
    for i, p in enumerate(ps):
        want = 24 if i < 6 else 5 + i
        assert outs[str(i)] == reference(tiny, p, want), f"request {i}"
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_disaggregated_prefill_export_import_decode_matches(tiny):
    pre = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=100, max_num_batched_tokens=256))
    dec = LLMEngine(tiny, EngineConfig(mode="decode", num_blocks=100))
    ps = prompts(8, seed=2)
    for i, p in enumerate(ps):
        pre.add_request(str(i), p, GREEDY)
    firsts = {}
    while pre.has_work():
        for o in pre.step():
            assert o.held and not o.finished and len(o.new_token_ids) == 1
            firsts[o.request_id] = o.new_token_ids[0]
    assert pre.stats().held_requests == 8
    outs = {}
    for i, p in enumerate(ps):
        rid = str(i)
        kv = pre.export_kv(rid)
        assert tuple(kv.shape) == pre.layout.export_shape(len(p))
        pre.free(rid)
        dec.reserve(rid, p, GREEDY)
        assert dec.admit_prefilled(rid, firsts[rid], None, kv) is None
        outs[rid] = [firsts[rid]]
        if i % 3 == 0:  # decoding starts while other requests are still being imported
            for o in dec.step():
                outs[o.request_id].extend(o.new_token_ids)
    run_to_end(dec, outs)
    for i, p in enumerate(ps):
        assert outs[str(i)] == reference(tiny, p, 24), f"request {i}"
    assert pre.blocks.num_free == pre.blocks.num_blocks
    assert dec.blocks.num_free == dec.blocks.num_blocks


def test_an_import_whose_first_token_ends_it_frees_its_blocks(tiny):
    """max_tokens=1 (or a first token that is a stop id): the import finishes at once and gives its
    reserved blocks back (the fuzzer found them kept for good)."""
    p = prompts(1, seed=12)[0]
    pre = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=50))
    pre.add_request("a", p, GREEDY)
    first = next(o for o in pre.step()).new_token_ids[0]
    kv = pre.export_kv("a")
    dec = LLMEngine(tiny, EngineConfig(mode="decode", num_blocks=50))
    for rid, params in (("one", SamplingParams(max_tokens=1, temperature=0.0)),
                        ("stop", SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(first,)))):
        dec.reserve(rid, p, params)
        out = dec.admit_prefilled(rid, first, None, kv)
        assert out is not None and out.finished
        assert dec.blocks.num_free == 50 and rid not in dec.request_ids()
    assert not dec.has_work()


def test_export_import_round_trip_is_bit_exact(tiny):
    pre = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=50))
    pre.add_request("a", prompts(1, seed=3)[0], GREEDY)
    run_to_end(pre)
    kv = pre.export_kv("a")
    other = LLMEngine(tiny, EngineConfig(mode="decode", num_blocks=50))
    other.blocks.allocate(7)  # different physical blocks on the receiving side
    other.reserve("a", [1] * kv.shape[2], GREEDY)
    seq = other._seqs["a"]
    other.cache.load(seq.block_table, kv)
    assert torch.equal(other.cache.export(seq.block_table, kv.shape[2]), kv)


def test_thousand_requests_leave_every_block_free(tiny):
    eng = LLMEngine(tiny, EngineConfig(num_blocks=64, max_num_seqs=32, chunked_prefill=True, max_num_batched_tokens=128))
    rng = random.Random(4)
    pending = prompts(1000, seed=5, lo=2, hi=40)
    done = 0
    i = 0
    while done < 1000:
        while i < len(pending) and len(eng.scheduler.waiting) < 16:
            eng.add_request(str(i), pending[i], SamplingParams(max_tokens=rng.randrange(1, 6), temperature=0.8, seed=i))
            i += 1
        if i % 97 == 0 and i < 1000:
            eng.abort(str(i - 1))  # some requests are cancelled mid-way
            done += 1
        for o in eng.step():
            done += o.finished
    assert not eng.has_work()
    assert eng.blocks.num_free == 64
    assert eng.stats().running_requests == 0 and not eng._seqs


def test_seeded_sampling_is_independent_of_the_batch(tiny):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    p = prompts(1, seed=6)[0]

    def sample(extra):
        eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
        eng.add_request("x", p, params)
        for j, q in enumerate(prompts(extra, seed=7)):
            eng.add_request(f"o{j}", q, SamplingParams(max_tokens=12, temperature=1.0))
        return run_to_end(eng)["x"]

    alone = sample(0)
    assert alone == sample(5) == sample(9)
    other = LLMEngine(tiny, EngineConfig(num_blocks=100))
    other.add_request("x", p, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=99))
    assert run_to_end(other)["x"] != alone


def test_a_seeded_replay_continues_the_same_stream(tiny):
    """A request replayed elsewhere after k tokens (prompt + those tokens, output_offset=k) draws
    what the undisturbed run drew next: seeded draws are keyed by (seed, output position)."""
    import dataclasses

    params = SamplingParams(max_tokens=14, temperature=1.0, top_p=0.95, seed=77)
    p = prompts(1, seed=11)[0]
    eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
    eng.add_request("x", p, params)
    whole = run_to_end(eng)["x"]
    for k in (1, 5, 13):
        again = LLMEngine(tiny, EngineConfig(num_blocks=100))
        again.add_request("x", p + whole[:k], dataclasses.replace(params, max_tokens=params.max_tokens - k, output_offset=k))
        assert whole[:k] + run_to_end(again)["x"] == whole
    shifted = LLMEngine(tiny, EngineConfig(num_blocks=100))
    shifted.add_request("x", p, dataclasses.replace(params, output_offset=3))
    assert run_to_end(shifted)["x"] != whole  # the position, not only the seed, picks the draws


def test_top_k_one_is_greedy_and_logprobs_are_the_models(tiny):
    p = prompts(1, seed=8)[0]
    eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
    eng.add_request("k", p, SamplingParams(max_tokens=6, temperature=1.5, top_k=1, logprobs=True))
    toks, lps = [], []
    while eng.has_work():
        for o in eng.step():
            toks += o.new_token_ids
            lps += o.new_logprobs
    assert toks == reference(tiny, p, 6)
    with torch.no_grad():
        logits = tiny.model(torch.tensor([p + toks])).logits[0, len(p) - 1 : -1]
    want = torch.log_softmax(logits, -1)[torch.arange(len(toks)), toks]
    assert torch.allclose(torch.tensor(lps), want, atol=1e-4)


def test_stop_conditions(tiny):
    p = prompts(1, seed=9)[0]
    ref = reference(tiny, p, 20)
    eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
    eng.add_request("tok", p, SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(ref[4],)))
    text = tiny.tokenizer.decode(ref[:12])
    stop = text[-3:]
    eng.add_request("str", p, SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)))
    eng.add_request("len", p, SamplingParams(max_tokens=7, temperature=0.0))
    reasons, outs = {}, {}
    while eng.has_work():
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    first = ref.index(ref[4])
    assert outs["tok"] == ref[: first + 1] and reasons["tok"] is FinishReason.STOP
    assert reasons["str"] is FinishReason.STOP and stop in tiny.tokenizer.decode(outs["str"])
    assert len(outs["str"]) <= 12
    assert outs["len"] == ref[:7] and reasons["len"] is FinishReason.LENGTH


def test_eos_stops_unless_ignored(tiny):
    eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
    p = prompts(1, seed=10)[0]
    ref = reference(tiny, p, 10)
    eos = ref[2]
    eng.eos = frozenset({eos})  # pretend the third greedy token is the model's EOS
    eng.add_request("a", p, SamplingParams(max_tokens=10, temperature=0.0))
    eng.add_request("b", p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    outs = run_to_end(eng)
    assert outs["a"] == ref[: ref.index(eos) + 1]
    assert outs["b"] == ref


def test_invalid_requests_touch_nothing(tiny):
    eng = LLMEngine(tiny, EngineConfig(num_blocks=10))
    for prompt, params in [
        ([], GREEDY),
        ([5] * 10, SamplingParams(max_tokens=0)),
        ([5] * 1020, SamplingParams(max_tokens=10)),
        ([5], SamplingParams(top_p=2.0)),
        ([5, 10_000], GREEDY),
        ([5] * 200, SamplingParams(max_tokens=1)),  # more blocks than the worker has
    ]:
        with pytest.raises(InvalidRequest):
            eng.add_request("bad", prompt, params)
    assert not eng.has_work() and eng.blocks.num_free == 10
    eng.add_request("ok", [5, 6], GREEDY)
    assert run_to_end(eng)["ok"]


def test_reserve_back_pressure_and_unknown_ids(tiny):
    eng = LLMEngine(tiny, EngineConfig(mode="decode", num_blocks=4))
    eng.reserve("a", [5] * 40, SamplingParams(max_tokens=9))  # 48 tokens = 3 blocks
    with pytest.raises(ResourceExhausted):
        eng.reserve("b", [5] * 40, SamplingParams(max_tokens=9))
    with pytest.raises(NotFound):
        eng.export_kv("a")
    with pytest.raises(NotFound):
        eng.admit_prefilled("zzz", 1, None, torch.zeros(1))
    assert eng.abort("a") and eng.blocks.num_free == 4
    assert not eng.abort("a")


def test_stop_strings_are_looked_for_in_text_made_token_by_token(tiny):
    """The engine's stop-string check decodes each new token with a short window of context, not the
    whole output again at every token (which cost time in the square of the output's length): twice
    the tokens, about twice the ids decoded, where decoding everything each time gives four times."""

    class Counting:
        def __init__(self):
            self.decoded = 0

        def decode(self, ids, skip_special_tokens=True):
            self.decoded += len(ids)
            return tiny.decode(ids)

    p = prompts(1, seed=9)[0]

    def decoded(n: int) -> int:
        eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
        eng._text = counting = Counting()
        eng.add_request("r", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, stop=("never in this output \x00",)))
        out = []
        while eng.has_work():
            for o in eng.step():
                out.extend(o.new_token_ids)
        assert out == reference(tiny, p, n)
        return counting.decoded

    short, long = decoded(60), decoded(120)
    assert 0 < short and long < 3 * short, (short, long)
