"""torch's own int8 path on CPU against ours: transformers' forward with `torch.ao` dynamic int8
quantisation of every nn.Linear (int8 weights, activations quantised per call), fp32 transformers,
at batch 16 decode (context 256) and batch 1 decode, plus greedy agreement with fp32 over chat prompts.
Why it exists: the int8 issue asked for "dynamic quantisation or weight-only int8, whichever measures
faster here"; this prints the dynamic-quantisation side of that comparison (the engine side is
`distserve bench engine --weights int8`).

    python benchmarks/torch_dynamic_int8.py [--model smollm2-135m] [--prompts 52] [--tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distserve.bench.engine_bench import PROMPTS, agreement, chat_ids, hf_decode_tok_s  # noqa: E402
from distserve.engine.models import load_model  # noqa: E402
from distserve.tokenization import load_tokenizer  # noqa: E402


@torch.inference_mode()
def greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    lm = load_model(args.model, device="cpu")
    fp32_model = lm.model
    q_model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32_model), {torch.nn.Linear}, dtype=torch.qint8)
    result = {"model": args.model, "threads": torch.get_num_threads()}
    for name, model in (("fp32", fp32_model), ("dynamic_int8", q_model)):
        lm.model = model
        result[f"{name}_decode_tok_s_b16"] = round(hf_decode_tok_s(lm, 16, 256, 16), 1)
        result[f"{name}_decode_tok_s_b1"] = round(hf_decode_tok_s(lm, 1, 256, 32), 1)
    tok = load_tokenizer(args.model)
    prompts = [chat_ids(tok, p) for p in PROMPTS[: args.prompts]]
    reference = [greedy(fp32_model, ids, args.tokens) for ids in prompts]
    candidate = [greedy(q_model, ids, args.tokens) for ids in prompts]
    result.update(agreement(reference, candidate), prompts=len(prompts), tokens=args.tokens)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
