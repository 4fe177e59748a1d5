"""min_tokens and top_logprobs in the engine, on the seeded tiny Llama (no mocks)."""

import pytest
import torch

from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.errors import InvalidRequest
from distserve.engine.sampling import SamplingParams, validate_request
from distserve.engine.sequence import FinishReason
from tests.engine_helpers import prompts


def reference(lm, prompt, max_tokens):
    ids = torch.tensor([prompt])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def run(eng):
    """request id -> (tokens, logprobs, top logprobs, finish reason)."""
    outs = {}
    while eng.has_work():
        for o in eng.step():
            toks, lps, tops, _ = outs.get(o.request_id, ([], [], [], None))
            outs[o.request_id] = (toks + o.new_token_ids, lps + o.new_logprobs, tops + o.new_top_logprobs, o.finish_reason)
    return outs


def test_min_tokens_holds_back_stop_ids_and_eos_until_reached(tiny):
    p = prompts(1, seed=21)[0]
    ref = reference(tiny, p, 10)
    eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
    stop = (ref[0],)  # the greedy first token: without min_tokens it ends the request at once
    eng.add_request("plain", p, SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=stop))
    eng.add_request("min", p, SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=stop, min_tokens=4))
    eng.add_request("all", p, SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=stop, min_tokens=6))
    outs = run(eng)
    assert outs["plain"][0] == ref[:1] and outs["plain"][3] is FinishReason.STOP
    toks, _, _, reason = outs["min"]
    assert len(toks) >= 4 and stop[0] not in toks[:4]  # masked, as vLLM does: another token is chosen
    assert toks[-1] == stop[0] and reason is FinishReason.STOP or len(toks) == 10
    toks, _, _, reason = outs["all"]
    assert len(toks) == 6 and reason is FinishReason.LENGTH  # max_tokens still ends it

    eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
    eng.eos = eng.sampler.eos = frozenset({ref[0]})  # pretend the greedy first token is the model's EOS
    eng.add_request("eos", p, SamplingParams(max_tokens=10, temperature=0.0))
    eng.add_request("min", p, SamplingParams(max_tokens=10, temperature=0.0, min_tokens=3))
    eng.add_request("seeded", p, SamplingParams(max_tokens=10, temperature=1.0, seed=3, min_tokens=3))
    outs = run(eng)
    assert outs["eos"][0] == ref[:1] and outs["eos"][3] is FinishReason.STOP
    for rid in ("min", "seeded"):
        toks = outs[rid][0]
        assert len(toks) >= 3 and ref[0] not in toks[:3], rid


def test_min_tokens_counts_tokens_made_before_a_replay(tiny):
    p = prompts(1, seed=22)[0]
    ref = reference(tiny, p, 4)
    replay = p + ref[:2]  # a replayed leg: the prompt plus the 2 tokens already sent
    stop = (ref[2],)
    eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
    # min_tokens 3 with 2 made before: the third (this leg's first) may not stop
    eng.add_request("held", replay, SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=stop, min_tokens=3, output_offset=2))
    # min_tokens 2 with 2 made before: reached already, the greedy stop id ends it
    eng.add_request("free", replay, SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=stop, min_tokens=2, output_offset=2))
    outs = run(eng)
    assert outs["held"][0][0] != ref[2] and len(outs["held"][0]) >= 1
    assert outs["free"][0] == [ref[2]] and outs["free"][3] is FinishReason.STOP


def test_min_tokens_holds_back_stop_strings(tiny):
    p = prompts(1, seed=23)[0]
    ref = reference(tiny, p, 12)
    text = tiny.tokenizer.decode(ref[:2])
    eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
    stop = (text[-1],)
    eng.add_request("plain", p, SamplingParams(max_tokens=12, temperature=0.0, stop=stop))
    eng.add_request("min", p, SamplingParams(max_tokens=12, temperature=0.0, stop=stop, min_tokens=8))
    outs = run(eng)
    assert len(outs["plain"][0]) <= 2 and outs["plain"][3] is FinishReason.STOP
    assert len(outs["min"][0]) >= 8 and outs["min"][0][:8] == ref[:8]  # stop strings are not masked, only ignored


def test_validation_names_the_fields(tiny):
    for params, field in [
        (SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
        (SamplingParams(max_tokens=4, min_tokens=-1), "min_tokens"),
        (SamplingParams(logprobs=True, top_logprobs=21), "top_logprobs"),
        (SamplingParams(logprobs=True, top_logprobs=-1), "top_logprobs"),
        (SamplingParams(top_logprobs=2), "top_logprobs"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            validate_request([5, 6], params, 300, 1024)
        assert e.value.field == field
    validate_request([5], SamplingParams(max_tokens=4, min_tokens=4, logprobs=True, top_logprobs=20), 300, 1024)
    # a replayed leg: max_tokens is what is left, min_tokens counts from the start
    validate_request([5], SamplingParams(max_tokens=2, min_tokens=4, output_offset=2), 300, 1024)


def test_top_logprobs_are_the_models_sorted_and_hold_the_sampled_token(tiny):
    p = prompts(1, seed=24)[0]
    eng = LLMEngine(tiny, EngineConfig(num_blocks=100))
    eng.add_request("g", p, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=5))
    eng.add_request("s", p, SamplingParams(max_tokens=6, temperature=1.0, seed=7, logprobs=True, top_logprobs=20))
    eng.add_request("lp", p, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True))
    eng.add_request("none", p, SamplingParams(max_tokens=6, temperature=0.0))
    outs = run(eng)
    toks, lps, tops, _ = outs["g"]
    assert toks == reference(tiny, p, 6) and len(tops) == len(toks) == len(lps)
    with torch.no_grad():
        logits = tiny.model(torch.tensor([p + toks])).logits[0, len(p) - 1 : -1]
    want_v, want_i = torch.topk(torch.log_softmax(logits.float(), -1), 5, dim=-1)
    for pos, (tok, lp, top) in enumerate(zip(toks, lps, tops)):
        ids, vals = [t for t, _ in top], [v for _, v in top]
        assert len(top) == 5 and vals == sorted(vals, reverse=True)
        assert ids[0] == tok and vals[0] == pytest.approx(lp, abs=1e-6)  # greedy: the sampled token is the best
        assert torch.allclose(torch.tensor(vals), want_v[pos], atol=1e-4)
        assert ids == want_i[pos].tolist()
    toks, lps, tops, _ = outs["s"]
    assert len(tops) == len(toks) and all(len(t) == 20 for t in tops)
    for tok, lp, top in zip(toks, lps, tops):
        assert lp <= top[0][1] + 1e-6
        if tok in dict(top):
            assert dict(top)[tok] == pytest.approx(lp, abs=1e-6)
    assert outs["lp"][2] == [] and len(outs["lp"][1]) == 6
    assert outs["none"][1:3] == ([], [])
