"""Speculative decoding through the whole suite: `distserve up --speculative ngram` (tiny-llama as
processes, 1 prefill + 1 decode) serves the greedy tokens an in-process engine without speculation
gives, streams several tokens per step correctly (stop strings, max_tokens, logprobs), and its decode
worker's metrics show drafts verified and accepted."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from distserve.client import Client
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.sampling import SamplingParams
from distserve.up import UpProcess
from tests.unit.test_speculative import repetitive_prompts, run_all

pytestmark = pytest.mark.timeout(400)


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_suite_with_speculation_serves_the_plain_tokens(tmp_path, tiny, method):
    """ngram: prompt lookup, which the random tiny model's outputs seldom reward (drafts are rare and
    mostly rejected); draft: the model as its own draft model with a fixed k (adaptive k would find it
    costs as much as it saves), whose greedy drafts are all accepted, so every decode step streams
    several tokens through the router."""
    ps = repetitive_prompts(8, seed=31)
    plist = [SamplingParams(max_tokens=40, temperature=0.0, logprobs=i % 2 == 1) for i in range(len(ps))]
    want = run_all(LLMEngine(tiny, EngineConfig(num_blocks=400)), ps, plist)
    texts = [tiny.decode(want[str(i)][0]) for i in range(len(ps))]
    stops = [t[12:15] if len(t) > 20 and "\ufffd" not in t[12:15] else "" for t in texts]
    sp = [SamplingParams(max_tokens=40, temperature=0.0, stop=(s,) if s else ()) for s in stops]
    want_stop = run_all(LLMEngine(tiny, EngineConfig(num_blocks=400)), ps, sp)
    assert any(stops)
    up = UpProcess(tmp_path, "--model", "tiny-llama", "--prefill", "1", "--decode", "1", "--tls", "off",
                   "--speculative", method, "--worker-arg=--num-blocks=256",
                   *(["--worker-arg=--draft-model=tiny-llama", "--worker-arg=--speculative-adaptive=false"] if method == "draft" else []))
    try:
        with Client(up.target, timeout_s=120) as c:
            for i, p in enumerate(ps):
                toks, reason, lps, _ = want[str(i)]
                out = c.generate(p, max_tokens=40, temperature=0.0, logprobs=i % 2 == 1)
                if out.token_ids != toks:
                    up.dump()
                assert out.token_ids == toks, f"request {i}"
                if i % 2:
                    assert out.logprobs == pytest.approx(lps, abs=1e-4)
                chunks = list(c.stream(p, max_tokens=11, temperature=0.0))  # several tokens per chunk allowed
                assert [t for ch in chunks for t in ch.token_ids] == toks[:11]
                assert chunks[-1].finish_reason == "length"
                stop = stops[i]
                if stop:  # a stop string met in the middle of an accepted run
                    got = c.generate(p, max_tokens=40, temperature=0.0, stop=[stop])
                    assert (got.token_ids, got.finish_reason) == (want_stop[str(i)][0], "stop"), f"request {i}"
                    assert stop not in got.text
        decode_log = (up.logs / "decode-1.log").read_text(errors="replace")
        port = re.search(r"READY decode \S+ metrics=(\d+)", decode_log).group(1)
        deadline = time.monotonic() + 10
        while True:  # the heartbeat (every 0.5 s) copies the engine's counters into the metrics
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            if metric(text, "distserve_spec_draft_tokens_total") > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        drafted = metric(text, "distserve_spec_draft_tokens_total")
        accepted = metric(text, "distserve_spec_accepted_tokens_total")
        steps = metric(text, "distserve_decode_sequence_steps_total")
        assert steps > 0 and "distserve_spec_draft_tokens_total" in text
        if method == "draft":
            assert 0 < accepted == drafted, (accepted, drafted)
            assert metric(text, "distserve_decode_step_tokens_total") > 1.5 * steps
            assert metric(text, "distserve_spec_tokens_per_step") > 1.5
    finally:
        assert up.stop() == 0
