"""`distserve bench engine`: the engine against plain transformers, measured in the same run.

Prefill: 256-token prompts through one forward each (transformers) versus the engine's prefill steps.
Decode: batch 16 at context 256; transformers runs forward passes with a DynamicCache, the engine
runs its continuous-batching steps (tokens/s from the median step time over 48 steps). Step overhead
is the share of an engine decode step spent outside the model's forward pass (scheduling, input
preparation, sampling, bookkeeping).

With `weights="int8"` or `kv_dtype="int8"` the figures above are the quantised engine's; the fp32
engine's decode rate is measured in the same run, its steps interleaved with the quantised engine's
in rounds of 8 (`fp32_decode_tok_s`, `decode_vs_fp32`), and the quality figures against fp32 are
added:

- greedy agreement: PROMPTS (52 chat prompts, the model's chat template) generate 64 tokens each
  (`ignore_eos`) on the fp32 engine and on the quantised one; `greedy_agreement` is the share of the
  64 x 52 positions whose tokens are identical (strict: after a first difference the continuations
  usually part), with `identical_outputs` and `mean_agreeing_prefix`;
- perplexity of TEXT (a fixed passage) under both (`perplexity`, `perplexity_fp32`): the runner
  reads it in 128-token chunks, each attending to the KV the earlier chunks left in the cache, so an
  int8 cache is read back as it is served.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch

from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.model_runner import PrefillChunk
from distserve.engine.models import LoadedModel, load_model
from distserve.engine.sampling import SamplingParams
from distserve.engine.sequence import Sequence


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


def engine_prefill_tok_s(lm: LoadedModel, length: int, reps: int, per_step: int = 1, **engine_kw) -> float:
    """Prompt tokens/s over `reps` steps of `per_step` prompts of `length` tokens, after one such step."""
    eng = LLMEngine(lm, EngineConfig(mode="prefill", max_num_batched_tokens=per_step * length, **engine_kw))
    prompts = _prompts((reps + 1) * per_step, length, lm.model.config.vocab_size, 1)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts[:per_step]):
        eng.add_request(f"warm{i}", p, params)
    eng.step()
    for i, p in enumerate(prompts[per_step:]):
        eng.add_request(str(i), p, params)
    t = time.perf_counter()
    while eng.has_work():
        eng.step()
    return reps * per_step * length / (time.perf_counter() - t)


def decode_engine(lm: LoadedModel, batch: int, context: int, steps: int, **engine_kw) -> LLMEngine:
    """A decode engine holding `batch` sequences at `context` tokens, prefilled and warmed up, with
    room for `steps` more decode steps."""
    eng = LLMEngine(lm, EngineConfig(mode="decode", max_num_seqs=batch, max_num_batched_tokens=context * batch, **engine_kw))
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, context, lm.model.config.vocab_size, 2)):
        eng.add_request(str(i), p, params)
    eng.step()  # prefill
    for _ in range(2):  # warm-up decode steps
        eng.step()
    return eng


def interleaved_decode(engines: dict[str, LLMEngine], batch: int, steps: int, round_steps: int = 8) -> dict[str, tuple[float, float]]:
    """Steps the engines in alternating rounds of `round_steps` until each made `steps`. Per engine:
    (batch / median step time, median share of a step outside the forward pass). Alternating and
    medians keep a noisy host (other tenants, clock changes) from favouring whichever engine happened
    to run in a quiet minute."""
    step_s: dict[str, list[float]] = {name: [] for name in engines}
    outside: dict[str, list[float]] = {name: [] for name in engines}
    while any(len(v) < steps for v in step_s.values()):
        for name, eng in engines.items():
            for _ in range(min(round_steps, steps - len(step_s[name]))):
                t = time.perf_counter()
                outs = eng.step()
                dt = time.perf_counter() - t
                assert len(outs) == batch
                step_s[name].append(dt)
                outside[name].append((dt - eng.last_forward_s) / dt)
    return {name: (batch / statistics.median(step_s[name]), statistics.median(outside[name])) for name in engines}


# ---------------------------------------------------------------------------------------------
# quality against fp32

PROMPTS = (
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Write a haiku about the sea.",
    "How do I reverse a list in Python?", "What causes the seasons on Earth?", "Give me three tips for better sleep.",
    "Who wrote Pride and Prejudice?", "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet.", "How does a refrigerator work?", "What is machine learning?",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?", "Write a short poem about autumn leaves.",
    "What are the benefits of regular exercise?", "How many planets are in the solar system?",
    "Explain what an API is to a beginner.", "What is the boiling point of water at sea level?",
    "Describe a cat in two sentences.", "What is the Pythagorean theorem?", "Suggest a name for a bakery.",
    "How do vaccines work?", "What is the largest ocean on Earth?", "Write a limerick about a programmer.",
    "What does DNA stand for?", "How can I improve my writing skills?",
    "What is the difference between weather and climate?", "Explain recursion with an example.",
    "What is the tallest mountain in the world?", "List three primary colors.", "What is inflation in economics?",
    "How do airplanes stay in the air?", "Tell me a fun fact about octopuses.",
    "What is the meaning of the word 'serendipity'?", "How do I make a cup of tea?", "What is a black hole?",
    "Write a two-line story about a robot.", "Why do leaves change color in the fall?", "What is the speed of light?",
    "Explain the water cycle.", "What are prime numbers?", "Give me a recipe idea for dinner.",
    "What is the main function of the heart?", "How does the internet work?", "Who painted the Mona Lisa?",
    "What is gravity?", "Describe the taste of a lemon.", "What should I pack for a beach trip?",
    "Explain the difference between HTTP and HTTPS.", "What is the role of the moon in ocean tides?",
    "How do bees make honey?", "What is an electric circuit?",
)

TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe tried to "
    "build a machine that a person could ride without a horse. The first of these, the running machine, had "
    "two wheels in a line and no pedals: the rider pushed against the ground with his feet and coasted. It "
    "was light and quick on good roads, but the roads of the time were rarely good, and the fashion soon "
    "faded. Some decades later, craftsmen in France fixed cranks and pedals to the front wheel. Riders could "
    "now keep their feet off the ground, but every turn of the pedals moved the machine only as far as the "
    "circumference of the wheel, so builders made the front wheel larger and larger. The high wheeler that "
    "followed was fast and elegant, and it was also dangerous: a stone in the road could pitch the rider "
    "over the handlebars. The safety bicycle solved the problem with two wheels of equal size and a chain "
    "that drove the rear wheel through gears, so that a small wheel could turn quickly while the rider "
    "pedalled at a comfortable pace. Pneumatic tyres, filled with air, arrived a few years later and made "
    "the ride smooth enough for ordinary people on ordinary streets. Within a decade, millions of bicycles "
    "were in use. They changed the lives of workers, who could now live farther from their factories, and "
    "of women, for whom the bicycle meant a new kind of freedom and, in time, new kinds of clothing. Road "
    "surfaces improved because cyclists demanded them, and many of the mechanics who later built the first "
    "motor cars and aeroplanes learned their trade repairing bicycles. Today the bicycle remains one of the "
    "most efficient machines ever made: a rider converts food into motion with less energy per kilometre "
    "than any animal or vehicle, and the basic design has hardly changed in more than a hundred years."
)

GEN_TOKENS = 64
CHUNK = 128


def chat_ids(tokenizer, prompt: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):  # tiny-llama: the prompt as is
        return tokenizer(prompt, add_special_tokens=False).input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def greedy_outputs(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = GEN_TOKENS) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"q{i}", ids, params)
    outs: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [outs[f"q{i}"] for i in range(len(prompts))]


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    total = sum(len(r) for r in reference)
    same = sum(a == b for r, c in zip(reference, candidate) for a, b in zip(r, c))
    prefixes = [next((i for i, (a, b) in enumerate(zip(r, c)) if a != b), len(r)) for r, c in zip(reference, candidate)]
    return {
        "greedy_agreement": round(same / total, 4),
        "identical_outputs": sum(r == c for r, c in zip(reference, candidate)),
        "mean_agreeing_prefix": round(sum(prefixes) / len(prefixes), 1),
    }


@torch.inference_mode()
def perplexity(engine: LLMEngine, ids: list[int], chunk: int = CHUNK) -> float:
    """exp(mean NLL) of ids[1:] given the prefix, computed in chunks through the engine's cache."""
    runner, bs = engine.runner, engine.config.block_size
    need = (len(ids) + bs - 1) // bs
    seq = Sequence("ppl", list(ids), SamplingParams(max_tokens=1), 0.0)
    seq.block_table = engine.blocks.allocate(need)
    nll, count = 0.0, 0
    try:
        for start in range(0, len(ids), chunk):
            end = min(len(ids), start + chunk)
            batch = runner.prepare([], [PrefillChunk(seq, start, end)], [True])
            batch.logits_index = torch.arange(end - start, device=runner.device)
            logits = runner.forward(batch).float()
            targets = torch.tensor(ids[start + 1 : end + 1], device=logits.device)
            logp = torch.log_softmax(logits[: len(targets)], dim=-1)
            nll -= logp.gather(1, targets[:, None]).sum().item()
            count += len(targets)
    finally:
        engine.blocks.free(seq.block_table)
    return math.exp(nll / count)


def quality(lm: LoadedModel, quantized: dict) -> dict:
    """Agreement and perplexity of an engine with `quantized` settings against the fp32 engine."""
    prompts = [chat_ids(lm.tokenizer, p) for p in PROMPTS]
    text = lm.tokenizer(TEXT, add_special_tokens=False).input_ids[: lm.max_model_len - 1]
    out = {"quality_prompts": len(prompts), "quality_tokens": GEN_TOKENS}
    figures = {}
    for name, kw in (("fp32", {}), ("candidate", quantized)):
        cfg = EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096, kv_cache_bytes=256 << 20, **kw)
        eng = LLMEngine(lm, cfg)
        figures[name] = (greedy_outputs(eng, prompts), perplexity(eng, text))
        del eng
    out.update(agreement(figures["fp32"][0], figures["candidate"][0]))
    out["perplexity"] = round(figures["candidate"][1], 3)
    out["perplexity_fp32"] = round(figures["fp32"][1], 3)
    return out


def run(model: str = "smollm2-135m", batch: int = 16, context: int = 256, steps: int = 48,
        prefill_reps: int = 8, threads: int | None = None, weights: str = "fp32", kv_dtype: str = "auto",
        **load_kw) -> dict:
    if threads:
        torch.set_num_threads(threads)
    lm = load_model(model, **load_kw)
    kw = dict(weights=weights, kv_dtype=kv_dtype, share_weights=weights == "int8")
    quantized = weights != "fp32" or kv_dtype != "auto"
    hf_pre = hf_prefill_tok_s(lm, context, prefill_reps)
    eng_pre = engine_prefill_tok_s(lm, context, prefill_reps, **kw)
    hf_dec = hf_decode_tok_s(lm, batch, context, steps)
    engines = {"engine": decode_engine(lm, batch, context, steps, **kw)}
    if quantized:  # the fp32 engine in the same rounds, for decode_vs_fp32
        engines["fp32"] = decode_engine(lm, batch, context, steps)
    rates = interleaved_decode(engines, batch, steps)
    engines.clear()  # their KV caches go before quality() builds engines of its own
    eng_dec, overhead = rates["engine"]
    extra = {}
    if quantized:
        fp32_dec = rates["fp32"][0]
        extra = {"fp32_decode_tok_s": round(fp32_dec, 1), "decode_vs_fp32": round(eng_dec / fp32_dec, 2), **quality(lm, kw)}
    return {
        "model": model,
        "weights": weights,
        "kv_dtype": kv_dtype,
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
        **extra,
    }


if __name__ == "__main__":
    print(json.dumps(run()))
