"""Model resolution: names, local Hugging Face directories, validation of the choice."""

import pytest
import torch

from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.models import load_model, pick_device, pick_dtype
from distserve.models import resolve_model_dir
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


def test_a_model_loaded_without_weights_serves_the_same_tokens_and_decodes_without_transformers(tiny, tmp_path):
    """What a worker loads: the model on the meta device (its runner reads a weight file or loads the
    weights itself), the stop-string decoder through `tokenizers` alone, the same eos ids."""
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    full = load_model(str(tmp_path), device="cpu")
    bare = load_model(str(tmp_path), device="cpu", weights=False)
    assert full.has_weights() and not bare.has_weights()
    assert bare.eos_token_ids == full.eos_token_ids == (2,)
    ids = full.tokenizer("héllo wörld </s> 🎉", add_special_tokens=False).input_ids + [2, 0]
    assert bare.decode(ids) == full.tokenizer.decode(ids, skip_special_tokens=True)
    assert bare.tokenizer_ is None  # decoding did not load the transformers tokenizer
    outs = []
    for lm, cfg in ((full, {}), (bare, {}), (bare, {"weights": "int8", "share_weights": True})):
        eng = LLMEngine(lm, EngineConfig(num_blocks=32, **cfg))
        eng.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=10, temperature=0.0, stop=("zz",)))
        toks = []
        while eng.has_work():
            for o in eng.step():
                toks += o.new_token_ids
        outs.append(toks)
    assert outs[0] == outs[1] and len(outs[0]) == 10  # fp32 unshared: the weights were loaded for the runner
    assert len(outs[2]) == 10
    assert bare.tokenizer.decode([5, 6]) == full.tokenizer.decode([5, 6])  # still there when asked for


def test_the_tokenizer_eos_is_read_from_either_config_file_without_a_tokenizer(tiny, tmp_path):
    import json

    from distserve.engine.models import _eos_of_tokenizer_config

    tiny.tokenizer.save_pretrained(tmp_path)
    assert _eos_of_tokenizer_config(tmp_path) == tiny.tokenizer.eos_token_id == 2
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert _eos_of_tokenizer_config(tmp_path) is None
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))  # older layout
    assert _eos_of_tokenizer_config(tmp_path) == 2
