"""min_tokens and top_logprobs through `distserve up` (1 prefill + 1 decode, tiny-llama): the first
token's values come from the prefill worker, the rest from the decode worker, through the router."""

from __future__ import annotations

import pytest
import torch

from distserve.client import Client
from distserve.errors import InvalidRequest
from distserve.up import UpProcess

pytestmark = pytest.mark.timeout(600)


def reference(lm, prompt, n):
    ids = torch.tensor([prompt])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_min_tokens_and_top_logprobs_through_prefill_and_decode(tmp_path, tiny, dump_on_failure):
    up = UpProcess(tmp_path, "--model", "tiny-llama", "--prefill", "1", "--decode", "1", "--worker-arg=--num-blocks=64")
    try:
        dump_on_failure(up)
        p = [17, 101, 55, 203, 9, 66, 140, 31, 250, 12]
        ref = reference(tiny, p, 8)
        with Client(up.target, **up.client_tls) as c:
            # the greedy first token is a stop id: without min_tokens the request ends at once
            plain = c.generate(p, max_tokens=8, temperature=0.0, stop_token_ids=[ref[0]])
            assert plain.token_ids == ref[:1] and plain.finish_reason == "stop"
            chunks = list(c.stream(p, max_tokens=8, temperature=0.0, stop_token_ids=[ref[0]], min_tokens=4, top_logprobs=3))
            text = tiny.tokenizer.decode(ref[:2], skip_special_tokens=True)
            held = c.generate(p, max_tokens=8, temperature=0.0, ignore_eos=True, stop=[text[-1]], min_tokens=6) if text else None
            with pytest.raises(InvalidRequest):
                c.generate(p, max_tokens=4, logprobs=True, top_logprobs=21)
            with pytest.raises(InvalidRequest):
                c.generate(p, max_tokens=4, min_tokens=5)
        toks = [t for ch in chunks for t in ch.token_ids]
        lps = [v for ch in chunks for v in ch.logprobs]
        tops = [t for ch in chunks for t in ch.top_logprobs]
        m = chunks[-1].metrics
        assert m.prefill_worker.startswith("prefill-") and m.decode_worker.startswith("decode-")  # disaggregated
        assert len(toks) >= 4 and ref[0] not in toks[:4]
        assert len(tops) == len(lps) == len(toks) and all(len(t) == 3 for t in tops)
        with torch.no_grad():
            logits = tiny.model(torch.tensor([p + toks])).logits[0, len(p) - 1 : -1]
        want_v, want_i = torch.topk(torch.log_softmax(logits.float(), -1), 3, dim=-1)
        for pos, (tok, lp, top) in enumerate(zip(toks, lps, tops)):
            assert [t for t, _ in top] == want_i[pos].tolist(), pos
            assert torch.allclose(torch.tensor([v for _, v in top]), want_v[pos], atol=1e-4), pos
            if tok in dict(top):
                assert dict(top)[tok] == pytest.approx(lp, abs=1e-5)
        assert tops[0][0][0] == ref[0] and toks[0] != ref[0]  # masked for sampling, reported raw (vLLM's default)
        if held is not None:
            assert len(held.token_ids) >= 6  # the router's stop-string check waits for min_tokens too
    finally:
        assert up.stop() == 0
