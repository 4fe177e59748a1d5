"""Loading a model for the engine: weights, config, end-of-sequence ids and a light decoder.

Which directory a name stands for (and fetching or converting it first) is `distserve.models`'; this
module turns that directory into a `LoadedModel`: `tiny-llama` (a seeded random Llama built
in-process with a byte-level tokenizer: same seed, same weights, in every process), or a Hugging
Face directory read through transformers.

Every loaded model has a cache directory (`LoadedModel.cache_dir`: the converted model's own folder
under `$DISTSERVE_HOME/models/`, a folder named after a local directory's path, or one per tiny-llama
seed) where the runner's fused and quantised weight files live (`distserve.engine.weights`), and a
fingerprint of its checkpoint that tells whether those files are current.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from distserve.models import DEFAULT_MODEL, RANDOM_PREFIX, checkpoint_fingerprint, model_cache_dir, resolve_model_dir
from distserve.tokenization import BYTE_SPECIAL_TOKENS

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    name: str  # what the caller asked for
    model: torch.nn.Module  # a transformers causal LM (Llama family), eval mode; on "meta" without weights
    tokenizer_: object | None  # the transformers tokenizer, None until `tokenizer` is first read
    eos_token_ids: tuple[int, ...]  # every id that ends generation
    max_model_len: int  # context length in tokens
    device: torch.device
    dtype: torch.dtype = torch.float32  # of the weights and activations
    cache_dir: Path | None = None  # where derived weight files live (see distserve.engine.weights)
    fingerprint: str = ""  # identity of the checkpoint, stamped into derived files
    source_dir: Path | None = None  # the Hugging Face directory the weights came from (None: built in-process)
    seed: int = 0  # tiny-llama's seed
    decoder_: object | None = None  # the light decoder (`decode`), built on first use

    @property
    def tokenizer(self):
        """The transformers tokenizer (chat template, encoding), loaded on first use: a worker, which
        only decodes (for stop strings, `decode`), never pays its ~85 MiB of Python-side tables."""
        if self.tokenizer_ is None:
            from transformers import AutoTokenizer

            self.tokenizer_ = AutoTokenizer.from_pretrained(self.source_dir)
        return self.tokenizer_

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids without special tokens, as `tokenizer.decode(ids, skip_special_tokens=True)`
        gives it, through the `tokenizers` library alone where the checkpoint allows it (the keyword is
        the form tokenization.IncrementalDetokenizer calls; special tokens are always left out)."""
        if self.decoder_ is None:
            self.decoder_ = light_decoder(self.source_dir) if self.tokenizer_ is None else None
            if self.decoder_ is None:
                tok = self.tokenizer
                self.decoder_ = lambda ids: tok.decode(ids, skip_special_tokens=True)
        return self.decoder_(ids)

    def has_weights(self) -> bool:
        """False when loaded without them or once `drop_weights` gave them up."""
        return next(self.model.parameters()).device.type != "meta"

    def ensure_weights(self) -> torch.nn.Module:
        """The transformers model with its weights (reloaded from the checkpoint if they were not kept)."""
        if not self.has_weights():
            self.model = self.reload_model().to(device=self.device, dtype=self.dtype)
        return self.model

    def drop_weights(self) -> None:
        """Frees the transformers model's own copy of the weights (config, tokenizer stay). Tensors
        that something else still references (the runner's) stay alive."""
        self.model.to("meta")

    def reload_model(self) -> torch.nn.Module:
        """A fresh transformers model with weights, on the CPU (to derive weight files from)."""
        if self.name.startswith(RANDOM_PREFIX):  # rebuilt where it was built: same seed, same weights
            from distserve.engine.random_models import random_llama

            return random_llama(self.name, self.device, self.dtype, self.seed)
        if self.source_dir is None:
            return tiny_llama(self.seed)[0]
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.source_dir, dtype=torch.float32).eval()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    allowed = {"auto", "float32", "bfloat16", "float16"}
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {sorted(allowed)}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


# ---------------------------------------------------------------------------------------------
# tiny-llama: a seeded random model with a tokenizer that needs no download


def byte_tokenizer():
    """tiny-llama's byte-level tokenizer (`distserve.tokenization.byte_level`) as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    from distserve.tokenization import byte_level

    return PreTrainedTokenizerFast(tokenizer_object=byte_level(), **BYTE_SPECIAL_TOKENS)


def tiny_llama(seed: int = 0, num_layers: int = 4, max_len: int = 1024):
    """A small Llama with grouped-query attention whose weights depend only on `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                # A wide init spreads the logits, so greedy choices are far from ties.
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model, tokenizer


def light_decoder(directory: Path | None):
    """ids -> text through `tokenizers` alone from the checkpoint's tokenizer.json, when that is what
    the transformers tokenizer would do too (no clean-up of spaces asked for); else None."""
    import json

    if directory is None or not (directory / "tokenizer.json").exists():
        return None
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if config.get("clean_up_tokenization_spaces"):
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def _eos_of_tokenizer_config(directory: Path) -> int | None:
    """The id of tokenizer_config.json's eos_token, looked up in tokenizer.json's added tokens (where
    special tokens live) without building a tokenizer: a worker keeps nothing of it."""
    import json

    vocab_file = directory / "tokenizer.json"
    eos = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # older checkpoints use the latter
        if eos is None and (directory / name).exists():
            eos = json.loads((directory / name).read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str) or not vocab_file.exists():
        return None
    text = vocab_file.read_text()
    at = text.find('"added_tokens"')
    if at >= 0:
        try:
            added, _ = json.JSONDecoder().raw_decode(text, text.index("[", at))
        except ValueError:
            added = []
        for token in added if isinstance(added, list) else []:
            if isinstance(token, dict) and token.get("content") == eos:
                return token.get("id")
    vocab = json.loads(text).get("model", {}).get("vocab")  # an ordinary vocabulary entry
    return vocab.get(eos) if isinstance(vocab, dict) else None


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", seed: int = 0,
               weights: bool = True) -> LoadedModel:
    """`weights=False` builds the model on the meta device from its config alone (a worker whose
    runner reads a weight file, see distserve.engine.weights); `LoadedModel.ensure_weights` loads
    them later if something needs them. The transformers tokenizer loads on first use."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if name.startswith(RANDOM_PREFIX):  # built on the device, in its dtype (distserve.engine.random_models)
        from distserve.engine.random_models import load_random

        return load_random(name, dev, dt, seed)
    directory = resolve_model_dir(name)
    tokenizer = None
    if directory is None:
        model, tokenizer = tiny_llama(seed)
        model = model.to(device=dev, dtype=dt)
        eos_sources = [tokenizer.eos_token_id]
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        if weights:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dt).to(device=dev, dtype=dt)
        else:
            from transformers import GenerationConfig

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory), dtype=dt)
            if (directory / "generation_config.json").exists():
                model.generation_config = GenerationConfig.from_pretrained(directory)
        eos_sources = [_eos_of_tokenizer_config(directory)]
        if not (directory / "tokenizer.json").exists():  # e.g. a sentencepiece-only checkpoint: ask transformers
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
            eos_sources = [tokenizer.eos_token_id]
    model = model.eval()
    eos: set[int] = set()
    for src in (model.generation_config.eos_token_id, model.config.eos_token_id, *eos_sources):
        if isinstance(src, int):
            eos.add(src)
        elif src:
            eos.update(src)
    max_len = int(getattr(model.config, "max_position_embeddings", 2048))
    return LoadedModel(name, model, tokenizer, tuple(sorted(eos)), max_len, dev, dt,
                       cache_dir=model_cache_dir(directory, seed), fingerprint=checkpoint_fingerprint(directory, seed),
                       source_dir=directory, seed=seed)
