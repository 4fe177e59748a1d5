"""Tokenizers for the processes that run no model, and incremental detokenization.

`load_tokenizer(name)` gives the router and the load generator a model's tokenizer through the
`tokenizers` library and jinja2 alone: transformers' tokenizer classes import torch (~2.5 s of CPU
and ~240 MB), which a router never needs. `Tokenizer` answers the part of transformers' tokenizer
interface they use (`len`, calling it on text, `encode`, `decode`, `chat_template`,
`apply_chat_template`) with the same ids and text: it reads the same tokenizer.json, and renders
chat templates in the sandboxed jinja2 environment transformers builds (tests/unit/test_tokenization.py
compares the two). A checkpoint without tokenizer.json (sentencepiece only), or one that asks for
transformers' clean-up of spaces, gets transformers' own tokenizer instead.

`IncrementalDetokenizer`: decoding token by token splits multi-byte UTF-8 characters and merges that
depend on neighbours; like TGI and vLLM, we decode a short window before the new tokens and emit only
the text that is complete (no trailing U+FFFD), so a character split across tokens comes out whole.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tiny-llama's special tokens, ids 0-2 of its byte-level vocabulary
BYTE_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def byte_level():
    """A byte-level BPE `tokenizers.Tokenizer` with no merges: <pad>, <s>, </s>, then 256 byte tokens
    (tiny-llama's; the engine wraps the same object for transformers)."""
    from tokenizers import Tokenizer as Core
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Core(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIAL_TOKENS.values()))
    return tok


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with its content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A model's tokenizer through `tokenizers` and jinja2 (no transformers, no torch)."""

    def __init__(self, core, special_tokens: dict[str, str], chat_template: str | None = None):
        self.core = core  # a tokenizers.Tokenizer
        self.special_tokens = special_tokens  # bos_token, eos_token, ... -> their text (the chat template sees them)
        self.chat_template = chat_template  # jinja2 source, None when the model has none

    @classmethod
    def from_directory(cls, directory: Path) -> "Tokenizer | None":
        """The tokenizer of a Hugging Face directory; None where only transformers reproduces it (no
        tokenizer.json, or clean-up of spaces asked for)."""
        if not (directory / "tokenizer.json").exists():
            return None
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (directory / name).exists():
                config.update(json.loads((directory / name).read_text()))
        if config.get("clean_up_tokenization_spaces"):
            return None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        from tokenizers import Tokenizer as Core

        special = {name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name))) is not None}
        return cls(Core.from_file(str(directory / "tokenizer.json")), special, template)

    def __len__(self) -> int:
        return self.core.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.core.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.core.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True,
                            return_dict: bool = False):
        """The chat rendered by the model's template (text), or its ids (tokenize; in a dict under
        "input_ids" with return_dict), as transformers' `apply_chat_template` gives them."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        text = _compiled(self.chat_template).render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                                    add_generation_prompt=add_generation_prompt, **self.special_tokens)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)  # the template writes the special tokens itself
        return {"input_ids": ids} if return_dict else ids


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """A chat template compiled in the environment transformers uses: sandboxed (immutable), trimmed
    blocks, loop controls, and its globals and tojson filter."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """namespace() that refuses underscore attributes (no way towards CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for key in attrs:
                Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, key, value):
            Namespace._check(key)
            jinja2.utils.Namespace.__setitem__(self, key, value)

        @staticmethod
        def _check(key):
            if isinstance(key, str) and key.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attributes ({key!r})")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # unlike jinja's, no HTML escaping
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    return env.from_string(template)


def load_tokenizer(name: str):
    """The tokenizer of a model name (what a router or a load generator needs), without its weights:
    a `Tokenizer` where the checkpoint allows, else transformers' (which imports torch)."""
    from distserve.models import resolve_model_dir

    directory = resolve_model_dir(name)
    if directory is None:  # tiny-llama
        return Tokenizer(byte_level(), dict(BYTE_SPECIAL_TOKENS))
    light = Tokenizer.from_directory(directory)
    if light is not None:
        return light
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens whose text was already emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_ids: list[int]) -> str:
        """Appends tokens and returns the new, complete text (possibly empty)."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def pending(self) -> str:
        """Text of the tokens `add` holds back (those that end in an incomplete character), as a full
        decode would show it, without taking it: what a stop string may already end in."""
        if self.read_offset == len(self.ids):
            return ""
        full = self._decode(self.ids[self.prefix_offset :])
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return full[len(prefix) :]

    def flush(self) -> str:
        """At the end: whatever is left, even an incomplete character."""
        full = self._decode(self.ids[self.prefix_offset :])
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        delta = full[len(prefix) :]
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
