"""The step-time model and the prompt-chunk budget a TPOT target leaves: synthetic steps, and the
engine on tiny-llama with a predictor that makes the budget exact."""

import pytest

from distserve.engine.block_manager import BlockManager
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.sampling import SamplingParams
from distserve.engine.scheduler import Scheduler
from distserve.engine.sequence import Sequence
from distserve.engine.step_times import StepFit, StepTimes, chunk_budget, fit_line
from tests.engine_helpers import prompts, run_to_end


def test_fit_line_recovers_a_line_and_keeps_its_coefficients_non_negative():
    pts = [(t, 0.010 + 0.002 * t, 1) for t in (1, 4, 16, 64, 256)]
    fit = fit_line(pts)
    assert fit.fixed_s == pytest.approx(0.010) and fit.token_s == pytest.approx(0.002)
    # a negative intercept: the line through the origin
    fit = fit_line([(10, 0.005, 1), (100, 0.2, 1)])
    assert fit.fixed_s == 0 and fit.token_s > 0
    # one size only, or a falling line (noise): proportional, so a chunk token costs what a whole step's token did
    assert fit_line([(16, 0.032, 5)]) == StepFit(0.0, 0.002)
    assert fit_line([(8, 0.05, 1), (64, 0.04, 1)]).fixed_s == 0
    assert fit_line([]) is None


def test_buckets_keep_the_slope_while_one_batch_size_dominates():
    st = StepTimes()
    for t in (4, 32, 256):  # calibration at start
        st.observe(t, 0.020 + 0.001 * t)
    for _ in range(5000):  # a worker that then decodes a batch of 16 for a long time
        st.observe(16, 0.020 + 0.001 * 16)
    assert st.fit.fixed_s == pytest.approx(0.020, rel=1e-6) and st.fit.token_s == pytest.approx(0.001, rel=1e-6)
    for _ in range(50):  # the machine slows down: the buckets that see steps follow
        st.observe(16, 2 * (0.020 + 0.001 * 16))
    assert st.fit.seconds(16) > 1.3 * (0.020 + 0.001 * 16)
    st.observe(0, 1.0)  # nothing ran, or a clock that went backwards: ignored
    st.observe(8, -1.0)
    st.observe(8, float("nan"))
    assert st.steps == 3 + 5000 + 50
    assert st.predict(2, 999, 30) == st.fit.seconds(32)  # decodes + chunk tokens; context is not in the line
    assert StepTimes().predict(1, 1, 1) is None


def test_chunk_budget_is_the_largest_chunk_within_the_target():
    ms = 1 / 1024  # a binary "millisecond", so the sums below are exact
    line = lambda d, c, t: (10 + d + t) * ms  # noqa: E731
    # 16 decodes: 26 ms; 60 ms leaves 34 tokens
    assert chunk_budget(line, 60 * ms, 16, 4000, 2048, 16) == 34
    assert chunk_budget(line, 5.0, 16, 4000, 2048, 16) == 2048  # all of the step budget fits
    assert chunk_budget(line, 20 * ms, 16, 4000, 2048, 16) == 16  # the decodes alone pass it: the floor, so prompts advance
    assert chunk_budget(line, 60 * ms, 16, 4000, 10, 16) == 10  # a step budget below the floor
    assert chunk_budget(lambda d, c, t: None, 60 * ms, 16, 4000, 2048, 16) == 2048  # nothing measured: no cap
    # a predictor that grows with context and the square of the chunk (a planner profile's form)
    quad = lambda d, c, t: 0.005 + 1e-5 * c + 1e-4 * t + 1e-6 * t * t  # noqa: E731
    b = chunk_budget(quad, 0.100, 8, 2000, 2048, 16)
    assert quad(8, 2000, b) <= 0.100 < quad(8, 2000, b + 1)


def seq(i, n, max_tokens=8):
    return Sequence(str(i), list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), 0.0)


def test_scheduler_caps_chunks_only_in_steps_with_running_decodes():
    calls = []

    def cap(decodes):
        calls.append(len(decodes))
        return 10

    s = Scheduler(BlockManager(200, 16), max_num_batched_tokens=512, max_num_seqs=64, chunked_prefill=True,
                  hold_after_prefill=False, chunk_cap=cap)
    first = seq(0, 100)
    s.waiting.append(first)
    out = s.schedule()  # nothing running: the prompt takes the whole step budget
    assert [(c.start, c.end) for c in out.chunks] == [(0, 100)] and calls == []
    s.prefilling.remove(first)
    first.num_computed_tokens = 100
    s.running.append(first)
    s.waiting.append(seq(1, 100))
    out = s.schedule()
    assert out.decode == [first] and [(c.start, c.end) for c in out.chunks] == [(0, 10)] and calls == [1]
    s.prefilling.clear()
    assert s.schedule().chunks == [] and calls == [1]  # decodes only: the cap is not even asked


def test_engine_under_a_tpot_target_chunks_prompts_and_keeps_greedy_output(tiny):
    line = lambda d, c, t: (d + t) / 1024  # noqa: E731  a step of n tokens takes n (binary) ms
    cfg = EngineConfig(num_blocks=200, chunked_prefill=True, max_num_batched_tokens=256, tpot_target_s=40 / 1024)
    eng = LLMEngine(tiny, cfg, step_predictor=line)
    plain = LLMEngine(tiny, EngineConfig(num_blocks=200))
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    ps = prompts(6, seed=3, lo=40, hi=100)
    for i, p in enumerate(ps[:2]):
        eng.add_request(str(i), p, greedy)
        plain.add_request(str(i), p, greedy)
    outs = {}
    for o in eng.step():  # nothing runs yet: both prompts whole in one step
        outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert eng.stats().prefill_budget_tokens == 40 - 2  # 2 decoding: 40 ms leaves 38 tokens
    for i, p in enumerate(ps[2:], start=2):
        eng.add_request(str(i), p, greedy)
        plain.add_request(str(i), p, greedy)
    steps = []  # (decodes, prompt tokens) of each step
    while eng.has_work():
        sched = eng.scheduler.schedule
        eng.scheduler.schedule = lambda: (lambda out: steps.append((len(out.decode), sum(c.end - c.start for c in out.chunks))) or out)(sched())
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        eng.scheduler.schedule = sched
    mixed = [(d, t) for d, t in steps if d and t]
    assert mixed and all(t <= 40 - d for d, t in mixed)  # every step with decodes kept within 40 ms
    assert sum(t for _, t in mixed) == sum(map(len, ps[2:]))  # the later prompts rode on the decodes, in chunks
    assert outs == run_to_end(plain)  # token-identical to whole-prompt prefill
    assert eng.step_times.steps > 0 and eng.stats().step_token_s > 0  # measured while it ran
    assert eng.blocks.num_free == eng.blocks.num_blocks
    st = eng.stats()
    assert st.max_step_tokens == 256 and st.prefill_budget_tokens == 256  # idle: the whole step budget
    with pytest.raises(ValueError):
        EngineConfig(tpot_target_s=-1)


def test_chunk_cap_of_the_engine_follows_the_running_batch(tiny):
    eng = LLMEngine(tiny, EngineConfig(num_blocks=200, chunked_prefill=True, max_num_batched_tokens=256, tpot_target_s=50 / 512,
                                       block_size=16), step_predictor=lambda d, c, t: (d + t) / 256)
    fake = [seq(i, 10) for i in range(20)]
    assert eng.chunk_cap([]) == 256
    assert eng.chunk_cap(fake[:5]) == 20  # 25 tokens in 50 ms, 5 of them decodes
    assert eng.chunk_cap(fake) == 16  # 20 decodes take 40 ms: 5 more tokens fit, but a block's worth always does
    off = LLMEngine(tiny, EngineConfig(num_blocks=20))
    assert off.stats().prefill_budget_tokens == 0  # not chunked: it offers no local prefill budget


def test_a_planner_profile_predicts_the_budget(tmp_path):
    from distserve.planner.latency import StepModel
    from distserve.planner.profile import EngineProfile, ModelInfo, Profile, ServingCosts
    from distserve.runtime import profile_predictor

    step = StepModel(prefill=(0.004, 1e-4, 1e-8, 0.0), decode=(0.003, 1e-6, 2e-4))
    info = ModelInfo("m", 2, 64, 4, 2, 16, 128, 259, 1024, 10_000, 4)
    prof = Profile(info, "cpu", {}, [EngineProfile(1, "fp32", 1, step)], {}, "grpc", ServingCosts(), {"block_size": 16})
    prof.save(tmp_path / "p.json")
    predict = profile_predictor(str(tmp_path / "p.json"), 1, "fp32")
    assert predict(8, 800, 64) == pytest.approx(step.step_s([(0, 64)], 8, 800))
    assert predict(8, 800, 0) == pytest.approx(step.decode_s(8, 800))
    assert profile_predictor(str(tmp_path / "p.json"), 2, "int8")(1, 10, 10) == predict(1, 10, 10)  # its only engine serves
    b = chunk_budget(predict, 0.030, 8, 800, 2048, 16)
    assert predict(8, 800, b) <= 0.030 < predict(8, 800, b + 1)
