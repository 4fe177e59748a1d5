import pytest

from distserve.engine.models import byte_tokenizer
from distserve.tokenization import IncrementalDetokenizer


def test_multibyte_characters_split_across_tokens_come_out_whole():
    tok = byte_tokenizer()
    text = "héllo wörld ✓ 日本語 🙂"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text)  # the byte tokenizer splits every non-ASCII character
    d = IncrementalDetokenizer(tok)
    deltas = [d.add([i]) for i in ids]
    deltas.append(d.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas)
    assert deltas[ids.index(tok("🙂")["input_ids"][0]):].count("") >= 3  # 4-byte emoji held back until whole


def test_batches_of_tokens_and_flush_of_a_dangling_byte():
    tok = byte_tokenizer()
    ids = tok("naïve")["input_ids"]
    d = IncrementalDetokenizer(tok)
    assert d.add(ids[:3]) == ""  # the batch ends inside ï: held back until the character is whole
    assert d.add(ids[3:]) == "naïve"
    d2 = IncrementalDetokenizer(tok)
    d2.add(ids[:3])
    assert d2.flush() == "na\ufffd"  # at the end, what is left comes out, a dangling byte as U+FFFD


# -- the light tokenizer (tokenizers + jinja2) against transformers' on the same files ------------

TEXTS = ["Hello, world!", "  leading spaces and\nnew lines\t and tabs  ", "héllo wörld ✓ 日本語 🙂",
         "special tokens typed as text: <|im_start|> <|im_end|> <s> </s> <pad>", "", "1234567890 + 0.5e-3 = ?"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_end|> there"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "again, with {{ braces }} and {% tags %}"}],
]


def same_as_transformers(light, reference) -> None:
    assert len(light) == len(reference)
    for text in TEXTS:
        ids = light(text)["input_ids"]
        assert ids == list(reference(text)["input_ids"]), text
        assert light.encode(text, add_special_tokens=False) == list(reference(text, add_special_tokens=False)["input_ids"])
        for skip in (False, True):
            assert light.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), (text, skip)
    assert bool(light.chat_template) == bool(getattr(reference, "chat_template", None))
    if light.chat_template:
        for chat in CHATS:
            for gen in (True, False):
                want = reference.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
                assert light.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"] == list(want)
                assert light.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == \
                    reference.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)


def test_tiny_llamas_light_tokenizer_is_transformers_own():
    from distserve.tokenization import Tokenizer, load_tokenizer

    light = load_tokenizer("tiny-llama")
    assert isinstance(light, Tokenizer)
    same_as_transformers(light, byte_tokenizer())


def test_a_checkpoint_directory_gives_the_light_tokenizer_unless_transformers_alone_reproduces_it(tmp_path):
    """tokenizer.json + a chat template: the light one, the same as transformers' on that directory;
    clean-up of spaces asked for, or no tokenizer.json: transformers' own."""
    import json

    from transformers import AutoTokenizer

    from distserve.tokenization import Tokenizer

    template = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] | trim }}{{ eos_token }}\n"
                "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}")
    byte_tokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template, "clean_up_tokenization_spaces": False}))
    light = Tokenizer.from_directory(tmp_path)
    assert isinstance(light, Tokenizer) and light.chat_template == template
    same_as_transformers(light, AutoTokenizer.from_pretrained(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    assert Tokenizer.from_directory(tmp_path) is None


@pytest.mark.slow
def test_smollm2s_light_tokenizer_is_transformers_own():
    from transformers import AutoTokenizer

    from distserve.models import resolve_model_dir
    from distserve.tokenization import Tokenizer, load_tokenizer

    light = load_tokenizer("smollm2-135m")
    assert isinstance(light, Tokenizer) and light.chat_template
    same_as_transformers(light, AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m")))
