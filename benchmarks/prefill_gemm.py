"""Prefill speed of the int8 engine under each `prefill_gemm` setting (docs/quantization.md, "Prefill
batches"): the native int8 kernel at every size, or a transient weight through oneDNN's fp32 or bf16
GEMM from quant.PREFILL_ROWS rows on; and whether bf16 keeps the fp32 path's greedy tokens.

    python benchmarks/prefill_gemm.py [--threads 1] [--model smollm2-135m] [--no-quality]

Prints prompt tokens/s for steps of 8 x 256 and 2 x 256 prompt tokens (a prefill worker batching
chat prompts), one 2048-token prompt and one 176-token prompt, best of two runs of 3 steps each; then
greedy agreement (52 chat prompts x 64 tokens, batched) and perplexity of each setting against fp32.
"""

import argparse

import torch

from distserve.bench import engine_bench as eb
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.models import load_model

SETTINGS = ("fp32", "native", "bf16")
SHAPES = ((8, 256), (2, 256), (1, 2048), (1, 176))  # (prompts a step, tokens each)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-quality", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    print(f"{a.model}, int8 weights, {torch.get_num_threads()} thread(s); prompt tokens/s, best of 2")
    print(f"{'step':>12} " + " ".join(f"{s:>8}" for s in SETTINGS))
    for n, length in SHAPES:
        row = [max(eb.engine_prefill_tok_s(lm, length, 3, n, weights="int8", share_weights=True, prefill_gemm=s)
                   for _ in range(2)) for s in SETTINGS]
        print(f"{f'{n} x {length}':>12} " + " ".join(f"{r:8.0f}" for r in row), flush=True)
    if a.no_quality:
        return
    eb.CHUNK = 512  # perplexity in chunks the GEMMs take
    prompts = [eb.chat_ids(lm.tokenizer, p) for p in eb.PROMPTS]
    text = lm.tokenizer(eb.TEXT, add_special_tokens=False).input_ids[: lm.max_model_len - 1]
    out = {}
    for s in SETTINGS:
        eng = LLMEngine(lm, EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096, kv_cache_bytes=256 << 20,
                                         weights="int8", share_weights=True, prefill_gemm=s))
        out[s] = (eb.greedy_outputs(eng, prompts), eb.perplexity(eng, text))
        del eng
    for s in SETTINGS[1:]:
        print(f"{s} against fp32: {eb.agreement(out['fp32'][0], out[s][0])}, perplexity {out[s][1]:.3f} (fp32 {out['fp32'][1]:.3f})")


if __name__ == "__main__":
    main()
