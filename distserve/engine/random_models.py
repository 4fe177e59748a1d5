"""`random:<shape>` models: a Llama of a known model's shape (distserve.models.RANDOM_SHAPES) with
random weights, for measuring the engine at sizes no download is needed for (`random:llama3-8b`).

The model is built where it runs: parameters are allocated on the target device in the target dtype
(a bf16 8B model takes 16 GB of GPU memory and never exists as fp32 on the CPU) and initialised there
by transformers' own init (normal, std = the config's initializer_range), from `seed` under a forked
RNG (the caller's random state is left alone). Same seed and device type, same weights; a CPU and a
CUDA build of one seed differ. The tokenizer is tiny-llama's byte-level one (ids 0-258 of the
vocabulary are used by text; a benchmark feeds random ids anyway).
"""

from __future__ import annotations

import torch

from distserve.models import home, random_shape


def random_llama(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The `random:<shape>` model, on `device` in `dtype`, eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = random_shape(name)
    if shape is None:
        raise ValueError(f"{name!r} is not a random:<shape> name")
    config = LlamaConfig(**shape, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model.eval()


def load_random(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A `LoadedModel` of a `random:<shape>` name (see `distserve.engine.models.load_model`)."""
    from distserve.engine.models import LoadedModel, byte_tokenizer

    model = random_llama(name, device, dtype, seed)
    slug = name.replace(":", "-")
    return LoadedModel(name, model, byte_tokenizer(), (2,), int(model.config.max_position_embeddings), device, dtype,
                       cache_dir=home() / "models" / f"{slug}-seed{seed}-{device.type}",
                       fingerprint=f"{slug}-seed{seed}-{device.type}-v1", source_dir=None, seed=seed)
