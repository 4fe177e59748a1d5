"""`distserve bench engine` on tiny-llama: the figures it prints, and the quality keys int8 adds."""

import json

import pytest

from distserve.bench.engine_bench import run
from distserve.cli import main

pytestmark = pytest.mark.timeout(600)

SMALL = dict(model="tiny-llama", batch=4, context=24, steps=10, prefill_reps=1)


def test_int8_prints_the_fp32_keys_plus_the_quality_figures():
    fp32 = run(**SMALL)
    int8 = run(**SMALL, weights="int8")
    quality = {"fp32_decode_tok_s", "decode_vs_fp32", "quality_prompts", "quality_tokens", "greedy_agreement",
               "identical_outputs", "mean_agreeing_prefix", "perplexity", "perplexity_fp32"}
    assert set(int8) == set(fp32) | quality
    assert fp32["decode_tok_s"] > 0 and fp32["hf_decode_tok_s"] > 0 and 0 <= fp32["step_overhead_frac"] < 1
    assert int8["decode_vs_fp32"] == pytest.approx(int8["decode_tok_s"] / int8["fp32_decode_tok_s"], abs=0.01)
    assert int8["quality_prompts"] >= 50 and int8["quality_tokens"] == 64
    assert 0 <= int8["greedy_agreement"] <= 1 and 0 <= int8["identical_outputs"] <= int8["quality_prompts"]
    assert int8["perplexity"] > 1 and int8["perplexity_fp32"] > 1


def test_the_cli_prints_json(capsys):
    main(["bench", "engine", "--model", "tiny-llama", "--batch", "2", "--context", "16", "--steps", "4", "--json"])
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["model"] == "tiny-llama" and doc["batch"] == 2 and doc["decode_tok_s"] > 0
