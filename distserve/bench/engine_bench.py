"""`distserve bench engine`: the engine against plain transformers, measured in the same run.

Prefill: 256-token prompts through one forward each (transformers) versus the engine's prefill steps.
Decode: batch 16 at context 256; transformers runs forward passes with a DynamicCache, the engine
runs its continuous-batching steps. Step overhead is the share of an engine decode step spent
outside the model's forward pass (scheduling, input preparation, sampling, bookkeeping).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.models import LoadedModel, load_model
from distserve.engine.sampling import SamplingParams


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, length), generator=g).tolist()


@torch.inference_mode()
def hf_prefill_tok_s(lm: LoadedModel, length: int, reps: int) -> float:
    ids = torch.tensor(_prompts(1, length, lm.model.config.vocab_size, 1), device=lm.device)
    lm.model(ids)  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        lm.model(ids)
    return reps * length / (time.perf_counter() - t)


@torch.inference_mode()
def hf_decode_tok_s(lm: LoadedModel, batch: int, context: int, steps: int) -> float:
    from transformers import DynamicCache

    ids = torch.tensor(_prompts(batch, context, lm.model.config.vocab_size, 2), device=lm.device)
    cache = DynamicCache()
    out = lm.model(ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(steps):
        out = lm.model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * steps / (time.perf_counter() - t)


def engine_prefill_tok_s(lm: LoadedModel, length: int, reps: int, **engine_kw) -> float:
    eng = LLMEngine(lm, EngineConfig(mode="prefill", max_num_batched_tokens=length, **engine_kw))
    prompts = _prompts(reps + 1, length, lm.model.config.vocab_size, 1)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    eng.add_request("warm", prompts[0], params)
    eng.step()
    for i, p in enumerate(prompts[1:]):
        eng.add_request(str(i), p, params)
    t = time.perf_counter()
    while eng.has_work():
        eng.step()
    return reps * length / (time.perf_counter() - t)


def engine_decode(lm: LoadedModel, batch: int, context: int, steps: int, **engine_kw) -> tuple[float, float]:
    """Returns (decode tokens/s, share of step time outside the forward pass)."""
    eng = LLMEngine(lm, EngineConfig(mode="decode", max_num_seqs=batch, max_num_batched_tokens=context * batch, **engine_kw))
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, context, lm.model.config.vocab_size, 2)):
        eng.add_request(str(i), p, params)
    eng.step()  # prefill
    for _ in range(2):  # warm-up decode steps
        eng.step()
    step_s, fwd_s = [], []
    for _ in range(steps):
        t = time.perf_counter()
        outs = eng.step()
        step_s.append(time.perf_counter() - t)
        fwd_s.append(eng.last_forward_s)
        assert len(outs) == batch
    total = sum(step_s)
    overhead = statistics.median((s - f) / s for s, f in zip(step_s, fwd_s))
    return batch * steps / total, overhead


def run(model: str = "smollm2-135m", batch: int = 16, context: int = 256, steps: int = 32,
        prefill_reps: int = 8, threads: int | None = None, **load_kw) -> dict:
    if threads:
        torch.set_num_threads(threads)
    lm = load_model(model, **load_kw)
    hf_pre = hf_prefill_tok_s(lm, context, prefill_reps)
    eng_pre = engine_prefill_tok_s(lm, context, prefill_reps)
    hf_dec = hf_decode_tok_s(lm, batch, context, steps)
    eng_dec, overhead = engine_decode(lm, batch, context, steps)
    return {
        "model": model,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "context": context,
        "decode_tok_s": round(eng_dec, 1),
        "hf_decode_tok_s": round(hf_dec, 1),
        "decode_speedup": round(eng_dec / hf_dec, 2),
        "prefill_tok_s": round(eng_pre, 1),
        "hf_prefill_tok_s": round(hf_pre, 1),
        "prefill_ratio": round(eng_pre / hf_pre, 3),
        "step_overhead_frac": round(overhead, 4),
    }


if __name__ == "__main__":
    print(json.dumps(run()))
