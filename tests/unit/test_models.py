"""Model resolution: names, local Hugging Face directories, validation of the choice."""

import pytest
import torch

from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.models import load_model, pick_device, pick_dtype, resolve_model_dir
from distserve.engine.sampling import SamplingParams


def test_tiny_llama_is_the_same_in_every_load():
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    assert a.model.config.num_key_value_heads < a.model.config.num_attention_heads  # grouped-query attention


def test_local_hugging_face_directory_serves_the_same_tokens(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    local = load_model(str(tmp_path), device="cpu")
    outs = []
    for lm in (tiny, local):
        eng = LLMEngine(lm, EngineConfig(num_blocks=32))
        eng.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=10, temperature=0.0))
        toks = []
        while eng.has_work():
            for o in eng.step():
                toks += o.new_token_ids
        outs.append(toks)
    assert outs[0] == outs[1] and len(outs[0]) >= 1


def test_bad_choices_name_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model_dir(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        pick_device("tpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        pick_dtype("float8", torch.device("cpu"))
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
