"""Speculative decoding (n-gram drafts verified in the decode step) on the seeded tiny Llama: greedy
output token-identical to no speculation through every path, stop conditions and log-probs right when
several tokens land in one step, seeded sampling unchanged, the rejection rule's distribution exact
(chi-square); the adaptive choice of k is in test_speculative_adaptive.py."""

import random

import pytest
import torch

from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.sampler import Sampler
from distserve.engine.sampling import SamplingParams
from distserve.engine.sequence import Sequence
from distserve.engine.speculative import NgramIndex, SpecConfig, SpecState
from tests.engine_helpers import run_to_end

ALWAYS = SpecConfig("ngram", max_k=4, adaptive=False)  # verify every draft found: every path gets exercised


def repetitive_prompts(n, seed=0):
    """Prompts that repeat a random segment (with noise around it), so n-gram lookups find drafts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        seg = [rng.randrange(3, 259) for _ in range(rng.randrange(4, 24))]
        p = [rng.randrange(3, 259) for _ in range(rng.randrange(0, 10))]
        for _ in range(rng.randrange(2, 5)):
            p += seg + [rng.randrange(3, 259) for _ in range(rng.randrange(0, 3))]
        out.append(p)
    return out


def engine(tiny, spec: SpecConfig | None = None, **kw):
    cfg = dict(num_blocks=600, max_num_seqs=16, max_num_batched_tokens=512)
    cfg.update(kw)
    eng = LLMEngine(tiny, EngineConfig(speculative=spec.method if spec else "none", **cfg))
    if spec is not None:
        eng.speculator.config = spec
    return eng


class OracleIndex:
    """A drafter that knows the answer, behind the n-gram drafter's interface: it proposes the
    continuation an engine without speculation produced, wrong at every `wrong_every`-th output
    position, so runs of accepted drafts end in rejections. (The seeded random tiny Llama's outputs
    seldom repeat themselves or their prompt, so prompt lookup alone would rarely exercise acceptance
    here; the benchmarks measure it on real text with the real model.)"""

    def __init__(self, seq, answer: list[int], wrong_every: int = 5):
        self.seq, self.answer, self.wrong_every = seq, answer, wrong_every

    def sync(self, prompt_len, output):
        pass

    def draft(self, k):
        at = len(self.seq.output_token_ids)
        d = list(self.answer[at : at + k])
        for j in range(len(d)):
            if (at + j) % self.wrong_every == self.wrong_every - 1:
                d[j] = (d[j] + 1) % 259
        return d


def use_oracle(eng, rid, answer, wrong_every=5):
    seq = eng._seqs[rid]
    seq.spec = SpecState(OracleIndex(seq, answer, wrong_every))


def run_all(eng, prompts, params, answers=None):
    """request id -> (tokens, finish reason, logprobs, top logprobs); params: one for all, or one each;
    answers: request id -> tokens for an OracleIndex drafter."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, plist)):
        eng.add_request(str(i), p, sp)
        if answers is not None:
            use_oracle(eng, str(i), answers[str(i)])
    out = {}
    while eng.has_work():
        for o in eng.step():
            toks, _, lps, tops = out.setdefault(o.request_id, ([], None, [], []))
            toks.extend(o.new_token_ids)
            lps.extend(o.new_logprobs)
            tops.extend(o.new_top_logprobs)
            if o.finished:
                out[o.request_id] = (toks, o.finish_reason, lps, tops)
    assert eng.blocks.num_free == eng.blocks.num_blocks, "every block is free once all finished"
    return out


def assert_spec_ran(eng):
    c = eng.speculator.counters
    assert 0 < c.accepted < c.drafted, (c.accepted, c.drafted)  # drafts were both accepted and rejected
    assert c.decode_tokens > c.decode_steps  # some steps made several tokens


# -- n-gram lookup -----------------------------------------------------------------------------

def test_ngram_draft_takes_the_longest_suffix_and_its_latest_place():
    idx = NgramIndex([5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7], n_min=1, n_max=3)
    assert idx.draft(3) == [9, 2, 6]  # (6, 7) last seen before the end at 5..6, followed by 9
    idx = NgramIndex([5, 6, 7, 8, 1, 6, 7, 9, 2, 5, 6, 7], n_min=1, n_max=3)
    assert idx.draft(2) == [8, 1]  # the 3-gram (5, 6, 7) wins over the later (6, 7)
    assert NgramIndex([1, 2, 3, 4], 2, 3).draft(4) == []  # nothing repeats
    idx = NgramIndex([4, 4, 4], 1, 2)
    assert idx.draft(5) == [4]  # the run continues; no token past the end is invented


def test_ngram_index_follows_a_growing_output():
    idx = NgramIndex([1, 2, 3, 9, 9], 2, 2)
    assert idx.draft(2) == []
    idx.sync(5, [1, 2])
    assert idx.draft(2) == [3, 9]
    idx.sync(5, [1, 2, 3, 9])
    assert idx.draft(4) == [9, 1, 2, 3]  # (3, 9) ended at 4 in the prompt: tokens from 4 on


# -- greedy identity ----------------------------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True])
def test_greedy_output_is_identical_with_speculation_over_56_prompts(tiny, chunked):
    ps = repetitive_prompts(56, seed=7)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    plain = run_all(engine(tiny, chunked_prefill=chunked), ps, params)
    eng = engine(tiny, ALWAYS, chunked_prefill=chunked)  # prompt lookup: drafts found, nearly all rejected
    spec = run_all(eng, ps, params)
    assert {k: v[0] for k, v in spec.items()} == {k: v[0] for k, v in plain.items()}
    assert eng.speculator.counters.drafted > 0
    answers = {k: v[0] for k, v in plain.items()}
    eng = engine(tiny, ALWAYS, chunked_prefill=chunked)  # drafts that are mostly right
    spec = run_all(eng, ps, params, answers)
    assert {k: v[0] for k, v in spec.items()} == answers
    assert_spec_ran(eng)


def test_step_times_price_draft_rows_as_prompt_tokens(tiny):
    """A speculative step is observed as its sequences' decodes plus its draft rows as prompt tokens,
    so a decode-only worker (no prompt chunks of its own) learns what a draft row costs."""
    ps = repetitive_prompts(4, seed=5)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    plain = {k: v[0] for k, v in run_all(engine(tiny), ps, params).items()}
    eng = engine(tiny, ALWAYS)
    seen = []
    observe = eng.step_times.observe
    eng.step_times.observe = lambda d, p, s: (seen.append((d, p)), observe(d, p, s))
    drafted_before = []
    step = eng.step

    def counted_step():
        drafted_before.append(eng.speculator.counters.drafted)
        return step()

    eng.step = counted_step
    run_all(eng, ps, params, plain)
    drafted = [b - a for a, b in zip(drafted_before, drafted_before[1:] + [eng.speculator.counters.drafted])]
    decode_steps = [(d, p, n) for (d, p), n in zip(seen, drafted) if n]
    assert decode_steps and all(p == n and 1 <= d <= len(ps) for d, p, n in decode_steps)
    assert eng.step_times.fit.token_s > 0


def test_greedy_identity_matches_transformers(tiny):
    ps = repetitive_prompts(6, seed=8)
    eng = engine(tiny, ALWAYS)
    out = run_all(eng, ps, SamplingParams(max_tokens=30, temperature=0.0))
    for i, p in enumerate(ps):
        ids = torch.tensor([p])
        ref = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)[0, len(p):].tolist()
        assert out[str(i)][0] == ref, f"request {i}"


def test_adaptive_speculation_keeps_greedy_identity(tiny):
    ps = repetitive_prompts(24, seed=9)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    plain = run_all(engine(tiny), ps, params)
    eng = LLMEngine(tiny, EngineConfig(num_blocks=600, max_num_seqs=16, speculative="ngram"))
    spec = run_all(eng, ps, params)
    assert {k: v[0] for k, v in spec.items()} == {k: v[0] for k, v in plain.items()}
    c = eng.speculator.counters
    # the random model seldom continues its prompt: drafts were tried, and then mostly not verified
    assert 0 < c.drafted < 0.2 * c.decode_steps


def test_int8_weights_keep_greedy_identity(tiny):
    ps = repetitive_prompts(16, seed=10)
    params = SamplingParams(max_tokens=32, temperature=0.0)
    plain = run_all(engine(tiny, weights="int8"), ps, params)
    eng = engine(tiny, ALWAYS, weights="int8")
    spec = run_all(eng, ps, params, {k: v[0] for k, v in plain.items()})
    assert {k: v[0] for k, v in spec.items()} == {k: v[0] for k, v in plain.items()}
    assert_spec_ran(eng)


def test_int8_kv_cache_verifies_and_agrees(tiny):
    """int8 KV: drafts' rows requantise a block as any write does (a rejected draft's row may grow its
    scale, and a row's attention sees the block as its later draft rows left it), so outputs agree at
    the int8 cache's own noise level, not bit for bit. The random tiny model is chaotic (one flipped
    token changes the rest), so the bar is most outputs whole; a wrong KV row would leave none."""
    ps = repetitive_prompts(16, seed=11)
    params = SamplingParams(max_tokens=32, temperature=0.0)
    plain = run_all(engine(tiny, kv_dtype="int8"), ps, params)
    eng = engine(tiny, ALWAYS, kv_dtype="int8")
    spec = run_all(eng, ps, params, {k: v[0] for k, v in plain.items()})
    same = sum(spec[k][0] == plain[k][0] for k in plain)
    assert same >= 10, f"{same}/16 identical"
    assert_spec_ran(eng)


def test_disaggregated_decode_speculates_on_the_prompt_it_was_given(tiny):
    """A decode worker gets the prompt ids with the KV: its drafts look them up."""
    ps = repetitive_prompts(12, seed=12)
    params = SamplingParams(max_tokens=32, temperature=0.0)
    pre = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=300, max_num_batched_tokens=1024))
    for i, p in enumerate(ps):
        pre.add_request(str(i), p, params)
    firsts = {o.request_id: o.new_token_ids[0] for o in run_to_end_outputs(pre)}
    results = {}
    for name, spec in (("plain", None), ("ngram", ALWAYS), ("oracle", ALWAYS)):
        dec = engine(tiny, spec, mode="decode")
        outs = {}
        for i, p in enumerate(ps):
            rid = str(i)
            dec.reserve(rid, p, params)
            assert dec.admit_prefilled(rid, firsts[rid], None, pre.export_kv(rid)) is None
            outs[rid] = [firsts[rid]]
            if name == "oracle":
                use_oracle(dec, rid, results["plain"][rid][1:])
        results[name] = run_to_end(dec, outs)
        assert dec.blocks.num_free == dec.blocks.num_blocks
        if name == "oracle":
            assert_spec_ran(dec)
    assert results["ngram"] == results["plain"] == results["oracle"]


def run_to_end_outputs(eng):
    outs = []
    while eng.has_work():
        outs.extend(eng.step())
    return outs


# -- stop conditions, logprobs ---------------------------------------------------------------

def test_stop_strings_tokens_max_tokens_and_logprobs_with_several_tokens_a_step(tiny):
    ps = repetitive_prompts(20, seed=13)
    base = run_all(engine(tiny), ps, SamplingParams(max_tokens=40, temperature=0.0))
    plist = []
    for i in range(len(ps)):
        toks = base[str(i)][0]
        text = tiny.decode(toks)
        kind = i % 5
        if kind == 0 and len(text) > 16:  # a stop string from the middle of the output
            plist.append(SamplingParams(max_tokens=40, temperature=0.0, stop=(text[9:12],)))
        elif kind == 1:  # a stop token that appears early, held back by min_tokens
            plist.append(SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=(toks[2],), min_tokens=9))
        elif kind == 2:
            plist.append(SamplingParams(max_tokens=3 + i, temperature=0.0))
        elif kind == 3:
            plist.append(SamplingParams(max_tokens=40, temperature=0.0, logprobs=True, top_logprobs=3))
        else:
            plist.append(SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=(toks[11],)))
    plain = run_all(engine(tiny), ps, plist)
    eng = engine(tiny, ALWAYS)
    spec = run_all(eng, ps, plist, {k: v[0] for k, v in base.items()})  # drafts: the output without stops
    for k in plain:
        toks, reason, lps, tops = plain[k]
        stoks, sreason, slps, stops = spec[k]
        assert (stoks, sreason) == (toks, reason), f"request {k}"
        assert len(slps) == len(lps) and len(stops) == len(tops)
        assert slps == pytest.approx(lps, abs=1e-4)
        for a, b in zip(stops, tops):
            assert [t for t, _ in a] == [t for t, _ in b]
    assert_spec_ran(eng)


# -- sampling --------------------------------------------------------------------------------

def test_seeded_sampling_gives_the_same_tokens_with_speculation(tiny):
    ps = repetitive_prompts(16, seed=14)
    plist = [SamplingParams(max_tokens=32, temperature=0.7, top_p=0.95, seed=100 + i) for i in range(len(ps))]
    plain = run_all(engine(tiny), ps, plist)
    eng = engine(tiny, ALWAYS)
    spec = run_all(eng, ps, plist, {k: v[0] for k, v in plain.items()})
    assert {k: v[0] for k, v in spec.items()} == {k: v[0] for k, v in plain.items()}
    assert_spec_ran(eng)


def chi_square_p(observed: list[float], expected: list[float]) -> float:
    """p-value of Pearson's chi-square (categories with expected count >= 5, the rest pooled)."""
    obs, exp, po, pe = [], [], 0.0, 0.0
    for o, e in zip(observed, expected):
        if e >= 5:
            obs.append(o)
            exp.append(e)
        else:
            po, pe = po + o, pe + e
    if pe > 0:
        obs.append(po)
        exp.append(pe)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def test_rejection_rule_follows_the_target_distribution_exactly():
    """Two deterministic drafts over known target distributions: the emitted prefixes must follow
    p0(t0) for t0 != d0, p0(d0) p1(t1) for t1 != d1, p0(d0) p1(d1) p2(t2) (chi-square, seeded, at a
    level no correct implementation fails: p < 1e-6)."""
    V, N = 6, 6000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g) * 1.2
    probs = torch.softmax(logits, dim=-1).double()
    d = [int(probs[0].argmax()), int(probs[1].argsort()[-2])]  # a likely and a less likely draft
    seq = Sequence("s", [1, 2, 3], SamplingParams(max_tokens=50, temperature=1.0), 0.0)
    sampler = Sampler(seed=1)
    outcomes: dict[tuple, int] = {}
    for _ in range(N):
        toks = sampler.verify(logits, [seq], [d])[0][0]
        outcomes[tuple(toks)] = outcomes.get(tuple(toks), 0) + 1
    cats, expected = [], []
    for t0 in range(V):
        if t0 != d[0]:
            cats.append((t0,))
            expected.append(N * float(probs[0, t0]))
    for t1 in range(V):
        if t1 != d[1]:
            cats.append((d[0], t1))
            expected.append(N * float(probs[0, d[0]] * probs[1, t1]))
    for t2 in range(V):
        cats.append((d[0], d[1], t2))
        expected.append(N * float(probs[0, d[0]] * probs[1, d[1]] * probs[2, t2]))
    assert set(outcomes) <= set(cats)
    p = chi_square_p([outcomes.get(c, 0) for c in cats], expected)
    assert p > 1e-6, p
    assert sum(v for c, v in outcomes.items() if len(c) == 3) > 100  # both drafts accepted often enough to be tested


def test_sampled_outputs_follow_the_same_distribution_with_speculation(tiny):
    """Unseeded requests batched together (the engine's generator, drawn in another order with
    speculation): the tokens at output positions 2-5 follow the same distribution with and without
    it (two-sample chi-square per position, seeded engines, p < 1e-6 fails)."""
    prompt = repetitive_prompts(1, seed=15)[0]
    params = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    counts = {}
    n = 480
    for name, spec in (("plain", None), ("spec", ALWAYS)):
        # drafts: the model's own argmax (the model as its own draft model), accepted with p(argmax)
        eng = draft_engine(tiny, draft_model="tiny-llama", seed=3, max_num_seqs=48) if spec else engine(tiny, seed=4, max_num_seqs=48)
        out = run_all(eng, [prompt] * n, params)
        counts[name] = [out[str(i)][0] for i in range(n)]
        if spec:
            assert eng.speculator.counters.accepted > 0 and eng.speculator.counters.accepted < eng.speculator.counters.drafted
    for pos in range(1, 6):
        a = [t[pos] for t in counts["plain"]]
        b = [t[pos] for t in counts["spec"]]
        common = {c for c in set(a) | set(b) if a.count(c) + b.count(c) >= 10}  # rarer tokens pooled
        ca = [a.count(c) for c in sorted(common)] + [sum(t not in common for t in a)]
        cb = [b.count(c) for c in sorted(common)] + [sum(t not in common for t in b)]
        stat = sum((x - (x + y) / 2) ** 2 / ((x + y) / 2) * 2 for x, y in zip(ca, cb) if x + y > 0)
        df = max(1, sum(x + y > 0 for x, y in zip(ca, cb)) - 1)
        p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
        assert p > 1e-6, (pos, p)


# -- settings, metrics, workload ---------------------------------------------------------------

def test_worker_settings_carry_speculation_to_the_engine():
    from distserve.runtime import WorkerSettings

    cfg = WorkerSettings(role="decode", speculative="ngram", speculative_k=3).engine_config("decode")
    assert (cfg.speculative, cfg.speculative_k) == ("ngram", 3)
    with pytest.raises(ValueError, match="speculative_k"):
        WorkerSettings(speculative_k=0)
    with pytest.raises(ValueError, match="speculative must be one of"):
        EngineConfig(speculative="medusa")


def test_prefill_engine_never_drafts(tiny):
    eng = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=100, speculative="ngram"))
    run_all_held = repetitive_prompts(4, seed=16)
    for i, p in enumerate(run_all_held):
        eng.add_request(str(i), p, SamplingParams(max_tokens=8, temperature=0.0))
    outs = run_to_end_outputs(eng)
    assert all(o.held and len(o.new_token_ids) == 1 for o in outs)
    assert eng.speculator.counters.drafted == 0


def test_metrics_mirror_the_engine_counters(tiny):
    from distserve.metrics import Metrics

    ps, params = repetitive_prompts(6, seed=17), SamplingParams(max_tokens=24, temperature=0.0)
    plain = run_all(engine(tiny), ps, params)
    eng = engine(tiny, ALWAYS)
    run_all(eng, ps, params, {k: v[0] for k, v in plain.items()})
    m = Metrics("decode")
    m.observe_engine(eng.stats())
    m.observe_engine(eng.stats())  # a second heartbeat with nothing new adds nothing
    c = eng.speculator.counters
    got = lambda name: m.registry.get_sample_value(name, {"role": "decode"})  # noqa: E731
    assert got("distserve_spec_draft_tokens_total") == c.drafted > 0
    assert got("distserve_spec_accepted_tokens_total") == c.accepted > 0
    assert got("distserve_decode_sequence_steps_total") == c.decode_steps
    assert got("distserve_decode_step_tokens_total") == c.decode_tokens
    assert got("distserve_spec_acceptance_rate") == pytest.approx(c.accepted / c.drafted)
    assert got("distserve_spec_tokens_per_step") == pytest.approx(c.decode_tokens / c.decode_steps)
    assert c.decode_tokens > c.decode_steps


def test_rewrite_workload_draws_on_the_standard_library(tiny):
    from distserve.bench.workloads import build_requests

    a = build_requests("rewrite", 6, tiny.tokenizer, seed=0)
    b = build_requests("rewrite", 6, tiny.tokenizer, seed=0)
    assert [r.prompt_ids for r in a] == [r.prompt_ids for r in b]  # same seed, same list
    assert build_requests("rewrite", 6, tiny.tokenizer, seed=1)[0].prompt_ids != a[0].prompt_ids
    texts = [r.prompt_text for r in a]
    assert sum("type hints" in t and "def " in t for t in texts) == 4
    assert sum("bulleted list" in t for t in texts) == 2
    assert all(32 <= r.output_len <= 256 and r.prompt_len == len(r.prompt_ids) for r in a)
    # the answers end at the model's end of turn: past it a model writes a new, made-up conversation
    assert not any(r.ignore_eos for r in a) and all(r.ignore_eos for r in build_requests("chat", 3, tiny.tokenizer))


def test_answers_that_end_at_eos_are_asked_for_so_and_not_counted_short():
    import json

    from distserve.bench.metrics import RequestResult, summarize
    from distserve.bench.openai_target import OpenAITarget
    from distserve.bench.workloads import RequestSpec

    target = OpenAITarget("127.0.0.1", 1, "m")
    forced, free = RequestSpec(0, [1, 2], "a b", 2, 40), RequestSpec(1, [1, 2], "a b", 2, 40, ignore_eos=False)
    body = lambda spec: json.loads(target._request(spec).split(b"\r\n\r\n", 1)[1])  # noqa: E731
    assert body(forced)["ignore_eos"] is True and body(forced)["min_tokens"] == 40
    assert "ignore_eos" not in body(free) and "min_tokens" not in body(free) and body(free)["max_tokens"] == 40
    rs = [RequestResult(i, 2, 40, 0.0, [0.1, 0.2], 0.3, 2, "stop", ignore_eos=i == 0) for i in range(2)]
    assert summarize(rs, 1.0, 1.0)["short_outputs"] == 1  # only the one asked for 40 tokens exactly
    assert RequestResult.from_dict(rs[1].to_dict()).ignore_eos is False


# -- draft-model drafting ------------------------------------------------------------------------

def draft_engine(tiny, **kw):
    cfg = dict(num_blocks=600, max_num_seqs=16, max_num_batched_tokens=512)
    cfg.update(kw)
    eng = LLMEngine(tiny, EngineConfig(speculative="draft", **cfg))
    eng.speculator.config = SpecConfig("draft", max_k=4, adaptive=False)
    return eng


def test_a_draft_model_identical_to_the_target_has_every_draft_accepted(tiny):
    """The target itself as the draft model: every greedy draft is what the target chooses, so all
    are accepted (and the draft cache catches up on prompts, bonus tokens and its own blocks)."""
    ps = repetitive_prompts(12, seed=18)
    params = SamplingParams(max_tokens=30, temperature=0.0)
    plain = run_all(engine(tiny), ps, params)
    eng = draft_engine(tiny, draft_model="tiny-llama")
    spec = run_all(eng, ps, params)
    assert {k: v[0] for k, v in spec.items()} == {k: v[0] for k, v in plain.items()}
    c = eng.speculator.counters
    assert c.drafted > 100 and c.accepted == c.drafted
    draft = eng.speculator.draft
    assert draft.blocks.num_free == draft.blocks.num_blocks


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_self_draft_keeps_greedy_identity_and_seeded_sampling(tiny, weights):
    ps = repetitive_prompts(12, seed=19)
    greedy = SamplingParams(max_tokens=30, temperature=0.0)
    plain = run_all(engine(tiny, weights=weights), ps, greedy)
    eng = draft_engine(tiny, draft_layers=2, weights=weights)
    assert eng.speculator.draft.num_layers == 2
    spec = run_all(eng, ps, greedy)
    assert {k: v[0] for k, v in spec.items()} == {k: v[0] for k, v in plain.items()}
    assert_spec_ran(eng)
    seeded = [SamplingParams(max_tokens=24, temperature=0.8, seed=7 + i) for i in range(len(ps))]
    want = run_all(engine(tiny, weights=weights), ps, seeded)
    got = run_all(eng, ps, seeded)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    assert eng.speculator.draft.blocks.num_free == eng.speculator.draft.blocks.num_blocks


def test_adaptive_draft_model_stops_drafting_when_drafts_fail(tiny):
    """A one-layer self-draft of a random model rarely agrees with it: adaptive k verifies few of its
    drafts, and the output is still the target's."""
    ps = repetitive_prompts(8, seed=20)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    plain = run_all(engine(tiny), ps, params)
    eng = LLMEngine(tiny, EngineConfig(num_blocks=600, max_num_seqs=16, speculative="draft", draft_layers=1))
    spec = run_all(eng, ps, params)
    assert {k: v[0] for k, v in spec.items()} == {k: v[0] for k, v in plain.items()}
    c = eng.speculator.counters
    assert c.drafted < 2 * c.decode_steps  # far fewer than max_k (5) per step
