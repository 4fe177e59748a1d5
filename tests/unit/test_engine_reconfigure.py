"""An idle engine changes mode (an elastic worker changing role) and keeps serving correctly."""

import pytest

from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.errors import InvalidRequest, ResourceExhausted
from distserve.engine.sampling import SamplingParams
from tests.engine_helpers import prompts, run_prompts

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


def test_prefill_engine_becomes_a_decode_engine_and_back(tiny):
    eng = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=200, max_num_batched_tokens=256))
    colocated = LLMEngine(tiny, EngineConfig(num_blocks=200))
    ps = prompts(4, seed=5)
    eng.add_request("p", ps[0], GREEDY)
    out = eng.step()
    assert out[0].held  # a prefill engine holds the KV ...
    with pytest.raises(ResourceExhausted):  # ... and cannot change mode while it does
        eng.reconfigure(EngineConfig(mode="decode", num_blocks=200, max_num_batched_tokens=256, chunked_prefill=True))
    eng.free("p")
    eng.reconfigure(EngineConfig(mode="decode", num_blocks=200, max_num_batched_tokens=256, chunked_prefill=True, tpot_target_s=0.05))
    assert eng.scheduler.chunked and not eng.scheduler.hold_after_prefill and eng.scheduler.chunk_cap is not None
    assert run_prompts(eng, ps, GREEDY) == run_prompts(colocated, ps, GREEDY)  # now it decodes to the end
    eng.reconfigure(EngineConfig(mode="prefill", num_blocks=200, max_num_batched_tokens=256))
    eng.add_request("q", ps[1], GREEDY)
    assert eng.step()[0].held
    assert eng.blocks.num_free < eng.blocks.num_blocks
    eng.free("q")
    assert eng.blocks.num_free == eng.blocks.num_blocks
    with pytest.raises(InvalidRequest, match="num_blocks"):
        eng.reconfigure(EngineConfig(mode="decode", num_blocks=100))
