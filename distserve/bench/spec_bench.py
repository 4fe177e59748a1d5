"""`distserve bench engine --speculative ngram`: speculative decoding against plain decoding, same run.

Two workloads of `distserve bench serve`: `rewrite` (outputs that draw on the prompt: type hints added
to standard-library functions, docstrings reworded) and `chat` (random real words, which the output
does not copy). For each workload and batch size (1 and 8 by default) the same requests run through an
engine without speculation and one with it, group after group of `batch` requests (greedy, the
request's output length with ignore_eos, as bench serve sends them); the two engines alternate group
by group, so a noisy host does not favour one. A group's prompts are prefilled first, then its decode
steps are timed: a request's TPOT is (its finish - the group's decode start) / (its tokens - 1), and
the figure is the mean over requests. `tpot_speedup` = TPOT without / TPOT with speculation. Requests
end as the workload says: chat's at their output length (ignore_eos), rewrite's at the model's end of
turn (what smollm2-135m writes past it is a made-up new conversation, 38% of the tokens when forced
to the output length); `ignore_eos=True` forces every request to its length.

Also printed: acceptance rate (accepted / verified drafts), tokens per sequence-step, and
`greedy_identical`: requests whose output with speculation is token-identical to the one without
(every batch size and workload counted; the batch-8 run alone covers `prompts` requests per workload).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time

import torch

from distserve.bench.workloads import build_requests
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.models import load_model
from distserve.engine.sampling import SamplingParams


Request = tuple[str, list[int], int, bool]  # id, prompt ids, output length (max_tokens), ignore_eos


def _group(engine: LLMEngine, group: list[Request]) -> tuple[dict[str, list[int]], list[float]]:
    params = {}
    for rid, ids, n, ignore_eos in group:
        params[rid] = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=ignore_eos)
        engine.add_request(rid, ids, params[rid])
    toks: dict[str, list[int]] = {}
    done: dict[str, float] = {}
    start = None
    while engine.has_work():
        if start is None and not engine.scheduler.waiting and not engine.scheduler.prefilling:
            start = time.perf_counter()  # every prompt of the group prefilled: decode from here
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                done[o.request_id] = now
    tpots = [(done[rid] - start) / (len(toks[rid]) - 1) for rid, *_ in group if len(toks[rid]) > 1]
    return toks, tpots


def compare(engines: dict[str, LLMEngine], requests: list[Request], batch: int) -> dict:
    outputs = {name: {} for name in engines}
    tpots = {name: [] for name in engines}
    spec = engines["speculative"].speculator.counters
    before = (spec.drafted, spec.accepted, spec.decode_steps, spec.decode_tokens)
    for g in range(0, len(requests), batch):
        group = requests[g : g + batch]
        for name, eng in engines.items():
            toks, t = _group(eng, group)
            outputs[name].update(toks)
            tpots[name].extend(t)
    drafted, accepted, steps, tokens = (now - b for now, b in zip((spec.drafted, spec.accepted, spec.decode_steps, spec.decode_tokens), before))
    base, fast = statistics.mean(tpots["none"]), statistics.mean(tpots["speculative"])
    same = sum(outputs["none"][rid] == outputs["speculative"][rid] for rid, *_ in requests)
    return {
        "requests": len(requests),
        "output_tokens": sum(len(t) for t in outputs["none"].values()),
        "tpot_ms": round(base * 1e3, 2),
        "tpot_spec_ms": round(fast * 1e3, 2),
        "tpot_speedup": round(base / fast, 3),
        "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
        "tokens_per_step": round(tokens / steps, 3) if steps else None,
        "drafted_per_step": round(drafted / steps, 3) if steps else None,
        "greedy_identical": same,
    }


def run(model: str = "smollm2-135m", speculative: str = "ngram", batches: tuple[int, ...] = (1, 8), prompts: int = 56,
        batch1_prompts: int = 8, threads: int | None = None, weights: str = "fp32", kv_dtype: str = "auto",
        workloads: tuple[str, ...] = ("rewrite", "chat"), seed: int = 0, draft_model: str = "", draft_layers: int = 0,
        adaptive: bool = True, ignore_eos: bool = False, **load_kw) -> dict:
    if threads:
        torch.set_num_threads(threads)
    lm = load_model(model, **load_kw)
    tok = lm.tokenizer
    kw = dict(weights=weights, kv_dtype=kv_dtype, share_weights=weights == "int8", kv_cache_bytes=512 << 20,
              max_num_batched_tokens=4096, max_num_seqs=max(batches))
    engines = {"none": LLMEngine(lm, EngineConfig(mode="decode", **kw)),
               "speculative": LLMEngine(lm, EngineConfig(mode="decode", speculative=speculative, draft_model=draft_model,
                                                         draft_layers=draft_layers, **kw))}
    spec = engines["speculative"].speculator
    if not adaptive:
        spec.config = dataclasses.replace(spec.config, adaptive=False)
    warm = [("warm0", tok("def f(x):\n    return x + 1\n", add_special_tokens=False).input_ids * 4, 32, True)]
    for eng in engines.values():  # first-use costs, and points for the step-time fit
        _group(eng, warm)
    result: dict = {"model": model, "weights": weights, "kv_dtype": kv_dtype, "speculative": speculative,
                    "drafter": spec.draft.name if spec.draft is not None else "prompt lookup", "adaptive": adaptive,
                    "max_k": spec.config.max_k, "threads": torch.get_num_threads(), "ignore_eos_forced": ignore_eos}
    identical = total = 0
    for workload in workloads:
        specs = build_requests(workload, prompts, tok, seed)
        reqs = [(f"{workload}-{s.index}", s.prompt_ids, s.output_len, s.ignore_eos or ignore_eos) for s in specs]
        for b in batches:
            chosen = reqs if b > 1 else reqs[:batch1_prompts]
            r = compare(engines, [(f"{rid}-b{b}", *rest) for rid, *rest in chosen], b)
            result[f"{workload}_batch{b}"] = r
            print(json.dumps({f"{workload}_batch{b}": r}), file=sys.stderr, flush=True)  # progress: figures as they come
            identical += r["greedy_identical"]
            total += r["requests"]
    result["greedy_identical"] = f"{identical}/{total}"
    return result


if __name__ == "__main__":
    print(json.dumps(run()))
