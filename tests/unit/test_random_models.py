"""`random:<shape>` models: names, building in the asked dtype without an fp32 copy, and the engine
running one through its ordinary paged path (a small shape stands in for llama3-8b's)."""

import pytest
import torch

from distserve import models
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.models import load_model
from distserve.engine.sampling import SamplingParams

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=320, max_position_embeddings=256, rope_theta=500000.0)


@pytest.fixture
def small_shape(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTSERVE_HOME", str(tmp_path))
    monkeypatch.setitem(models.RANDOM_SHAPES, "test-small", SMALL)
    return "random:test-small"


def test_names_resolve_without_a_directory():
    assert models.resolve_model_dir("random:llama3-8b") is None
    assert models.random_shape("random:llama3-8b")["num_key_value_heads"] == 8
    assert models.random_shape("smollm2-135m") is None
    with pytest.raises(ValueError, match="unknown random model"):
        models.random_shape("random:nope")


def test_built_in_the_asked_dtype_from_its_seed(small_shape):
    a = load_model(small_shape, device="cpu", dtype="bfloat16", seed=3)
    assert {p.dtype for p in a.model.parameters()} == {torch.bfloat16}
    assert a.model.config.num_hidden_layers == 2 and a.max_model_len == 256 and a.eos_token_ids == (2,)
    b = load_model(small_shape, device="cpu", dtype="bfloat16", seed=3)
    c = load_model(small_shape, device="cpu", dtype="bfloat16", seed=4)
    wa, wb, wc = (m.model.model.layers[0].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert torch.equal(a.reload_model().model.layers[0].mlp.down_proj.weight, wa)
    state = torch.random.get_rng_state()
    load_model(small_shape, device="cpu", dtype="float32", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone


def serve_one(lm, kv_cache_bytes: int, prompt: list[int], max_tokens: int) -> list[int]:
    """The greedy tokens the engine makes for one request on the model."""
    eng = LLMEngine(lm, EngineConfig(kv_cache_bytes=kv_cache_bytes))
    eng.add_request("a", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    got = []
    while eng.has_work():
        for o in eng.step():
            got.extend(o.new_token_ids)
    return got


def test_the_engine_serves_it(small_shape):
    got = serve_one(load_model(small_shape, device="cpu", dtype="float32"), 8 << 20, list(range(10, 40)), 5)
    assert len(got) == 5 and all(0 <= t < SMALL["vocab_size"] for t in got)


@pytest.mark.gpu
def test_llama3_8b_shape_on_cuda():
    """The real shape, built on the GPU in bf16 (16 GB there, nothing of it on the CPU), serves a request."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; this machine has none")
    lm = load_model("random:llama3-8b", device="cuda", dtype="bfloat16")
    params = list(lm.model.parameters())
    assert {(p.device.type, p.dtype) for p in params} == {("cuda", torch.bfloat16)}
    assert 8.0e9 < sum(p.numel() for p in params) < 8.1e9
    assert len(serve_one(lm, 1 << 30, list(range(10, 74)), 4)) == 4
