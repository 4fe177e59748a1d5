"""The step-time model and the prompt-chunk budget a TPOT target leaves: synthetic steps, and the
engine on tiny-llama with a predictor that makes the budget exact."""

import asyncio

import pytest

from distserve.engine.block_manager import BlockManager
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.sampling import SamplingParams
from distserve.engine.scheduler import Scheduler
from distserve.engine.sequence import Sequence
from distserve.engine.step_times import STEP_KINDS, StepAccount, StepTimes, chunk_budget, fit_plane
from tests.engine_helpers import prompts, run_to_end


def plane(d, p):
    return 0.010 + 0.0008 * d + 0.002 * p  # decode tokens cheaper than prompt tokens, as SmolLM2 int8 on the EPYC


def test_fit_plane_recovers_both_token_costs_and_keeps_coefficients_non_negative():
    pts = [(d, p, plane(d, p), 1) for d, p in ((1, 0), (16, 0), (0, 4), (0, 32), (0, 256), (8, 24))]
    fit = fit_plane(pts)
    assert (fit.fixed_s, fit.decode_s, fit.token_s) == pytest.approx((0.010, 0.0008, 0.002))
    assert fit.seconds(16, 20) == pytest.approx(plane(16, 20))
    # a negative intercept is dropped: the best plane through the origin instead
    fit = fit_plane([(0, 10, 0.005, 1), (0, 100, 0.2, 1)])
    assert fit.fixed_s == 0 and fit.token_s > 0
    # a prefill worker never decodes: a decode token costs what a prompt token does
    fit = fit_plane([(0, p, plane(0, p), 1) for p in (4, 32, 256)])
    assert fit.decode_s == fit.token_s == pytest.approx(0.002)
    # relative error: a long step that grows faster than the plane does not bend it where budgets are decided
    pts = [(d, p, plane(d, p), 5) for d, p in ((1, 0), (16, 0), (0, 4), (0, 32))] + [(0, 2048, 3 * plane(0, 2048), 5)]
    assert fit_plane(pts).seconds(16, 16) == pytest.approx(plane(16, 16), rel=0.35)
    assert fit_plane([]) is None


def test_buckets_keep_the_fit_while_one_batch_size_dominates():
    st = StepTimes()
    st.observe(1, 0, plane(1, 0))  # the warm-up's decode step
    for p in (4, 32, 256):  # calibration at start
        st.observe(0, p, plane(0, p))
    for _ in range(5000):  # a worker that then decodes a batch of 16 for a long time
        st.observe(16, 0, plane(16, 0))
    fit = st.fit
    assert (fit.fixed_s, fit.decode_s, fit.token_s) == pytest.approx((0.010, 0.0008, 0.002), rel=1e-6)
    for _ in range(50):  # the machine slows down: the buckets that see steps follow
        st.observe(16, 0, 2 * plane(16, 0))
    assert st.fit.seconds(16, 0) > 1.3 * plane(16, 0)
    st.observe(0, 0, 1.0)  # nothing ran, or a clock that went backwards: ignored
    st.observe(8, 0, -1.0)
    st.observe(8, 0, float("nan"))
    assert st.steps == 4 + 5000 + 50
    assert st.predict(2, 999, 30) == st.fit.seconds(2, 30)  # context is not in the model
    assert StepTimes().predict(1, 1, 1) is None and StepTimes().fit is None
    mean = StepTimes()
    for x in (0.010, 0.030):  # a bucket's first samples are averaged, not dominated by the first
        mean.observe(0, 8, x)
    assert mean._buckets[(0, 4)][2] == pytest.approx(0.020)


def test_chunk_budget_is_the_largest_chunk_within_the_target():
    ms = 1 / 1024  # a binary "millisecond", so the sums below are exact
    line = lambda d, c, t: (10 + d + t) * ms  # noqa: E731
    # 16 decodes: 26 ms; 60 ms leaves 34 tokens
    assert chunk_budget(line, 60 * ms, 16, 4000, 2048) == 34
    assert chunk_budget(line, 5.0, 16, 4000, 2048) == 2048  # all of the step budget fits
    assert chunk_budget(line, 27 * ms, 16, 4000, 2048) == 1
    assert chunk_budget(line, 20 * ms, 16, 4000, 2048) == 0  # the decodes alone pass it: no budget
    assert chunk_budget(line, 60 * ms, 16, 4000, 10) == 10 and chunk_budget(line, 60 * ms, 16, 4000, 0) == 0
    assert chunk_budget(lambda d, c, t: None, 60 * ms, 16, 4000, 2048) == 2048  # nothing measured: no cap
    # a predictor that grows with context and the square of the chunk (a planner profile's form)
    quad = lambda d, c, t: 0.005 + 1e-5 * c + 1e-4 * t + 1e-6 * t * t  # noqa: E731
    b = chunk_budget(quad, 0.100, 8, 2000, 2048)
    assert quad(8, 2000, b) <= 0.100 < quad(8, 2000, b + 1)


def seq(i, n, max_tokens=8):
    return Sequence(str(i), list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), 0.0)


def test_scheduler_caps_every_step_that_carries_prompt_chunks():
    calls = []

    def cap(decodes):
        calls.append(len(decodes))
        return 10

    s = Scheduler(BlockManager(200, 16), max_num_batched_tokens=512, max_num_seqs=64, chunked_prefill=True,
                  hold_after_prefill=False, chunk_cap=cap)
    first = seq(0, 100)
    s.waiting.append(first)
    out = s.schedule()  # nothing running: the cap (asked of no decodes) still holds the chunk
    assert [(c.start, c.end) for c in out.chunks] == [(0, 10)] and calls == [0]
    s.prefilling.remove(first)
    first.num_computed_tokens = 100
    s.running.append(first)
    s.waiting.append(seq(1, 100))
    out = s.schedule()
    assert out.decode == [first] and [(c.start, c.end) for c in out.chunks] == [(0, 10)] and calls == [0, 1]
    s.prefilling.clear()
    assert s.schedule().chunks == [] and calls == [0, 1]  # decodes only: the cap is not even asked


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
    # where its time went: every step counted by what it carried (the first: both prompts, no decodes)
    kinds = ["decode" if not t else "mixed" if d else "prefill" for d, t in [(0, len(ps[0]) + len(ps[1])), *steps] if d + t]
    st = eng.stats()
    assert st.step_counts == tuple(kinds.count(k) for k in STEP_KINDS) and all(st.step_counts)
    assert st.prompt_tokens_computed == sum(map(len, ps))
    assert all(s > 0 for s in st.step_seconds)
    assert sum(t for _, t in mixed) == sum(map(len, ps[2:]))  # the later prompts rode on the decodes, in chunks
    assert outs == run_to_end(plain)  # token-identical to whole-prompt prefill
    st = eng.stats()
    assert eng.step_times.steps > 0 and st.step_fixed_s + st.step_decode_s + st.step_token_s > 0  # measured while it ran
    assert eng.blocks.num_free == eng.blocks.num_blocks
    st = eng.stats()
    assert st.max_step_tokens == 256 and st.prefill_budget_tokens == 256  # idle: the whole step budget
    with pytest.raises(ValueError):
        EngineConfig(tpot_target_s=-1)


def test_step_account_sorts_steps_by_what_they_carried():
    acc = StepAccount()
    for decodes, prompt, seconds in ((4, 0, 0.02), (4, 10, 0.05), (0, 30, 0.1), (2, 0, 0.01), (0, 0, 9.0), (1, 1, float("nan"))):
        acc.add(decodes, prompt, seconds)
    seconds, steps, prompt = acc.snapshot()
    assert STEP_KINDS == ("decode", "mixed", "prefill")
    assert steps == (2, 1, 1) and prompt == 40  # an empty step and a step of no finite length are not counted
    assert seconds == pytest.approx((0.03, 0.05, 0.1))
    acc.add(0, 5, 0.1)
    assert seconds == pytest.approx((0.03, 0.05, 0.1))  # a snapshot does not move with the account


def test_chunk_cap_of_the_engine_follows_the_running_batch(tiny):
    eng = LLMEngine(tiny, EngineConfig(num_blocks=200, chunked_prefill=True, max_num_batched_tokens=256, tpot_target_s=50 / 512,
                                       block_size=16), step_predictor=lambda d, c, t: (d + t) / 256)
    fake = [seq(i, 10) for i in range(20)]
    assert eng.chunk_cap([]) == eng.prefill_budget([]) == 256
    assert eng.chunk_cap(fake[:5]) == eng.prefill_budget(fake[:5]) == 20  # 25 tokens in 50 ms, 5 of them decodes
    assert eng.prefill_budget(fake) == 5  # 20 decodes take 40 ms: 5 more tokens fit, less than a block ...
    # ... so steps carry a block when their budgets add up to one: 5 tokens a step on average
    caps = [eng.chunk_cap(fake) for _ in range(16)]
    assert caps == [0, 0, 0, 16, 0, 0, 16, 0, 0, 16, 0, 0, 16, 0, 0, 16] and sum(caps) == 5 * 16
    assert eng.chunk_cap(fake[:5]) == 20  # a budget of a block or more is the cap again
    assert eng.prefill_budget(fake * 2) == 0  # 40 decodes pass the target: no budget left at all ...
    assert [eng.chunk_cap(fake * 2) for _ in range(8)] == [0, 0, 0, 16] * 2  # ... yet a prompt taken advances
    off = LLMEngine(tiny, EngineConfig(num_blocks=20))
    assert off.stats().prefill_budget_tokens == 0  # not chunked: it offers no local prefill budget


def test_a_decode_worker_keeps_an_idle_step_within_the_target(tiny):
    """A request joins a decode worker with its first token out: a step that worker runs while no decode
    is running is that request's gap to its next token, so it is held to a step of one decode."""
    line = lambda d, c, t: (d + t) / 512  # noqa: E731  a step of n tokens takes n (binary) ms
    cfg = EngineConfig(mode="decode", chunked_prefill=True, num_blocks=200, max_num_batched_tokens=256, tpot_target_s=50 / 512, block_size=16)
    eng = LLMEngine(tiny, cfg, step_predictor=line)
    assert eng.scheduler.chunked and eng.chunk_cap([]) == eng.prefill_budget([]) == 49  # 50 ms less its one decode
    assert eng.stats().prefill_budget_tokens == 49  # and that is what routers are told
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    p = prompts(1, seed=5, lo=120, hi=121)[0]
    eng.add_request("local", p, greedy)
    chunks = []
    sched = eng.scheduler.schedule
    eng.scheduler.schedule = lambda: (lambda out: chunks.append(sum(c.end - c.start for c in out.chunks)) or out)(sched())
    out = []
    while eng.has_work():
        out += [t for o in eng.step() for t in o.new_token_ids]
    assert [c for c in chunks if c] == [49, 49, 22]  # alone, and still in chunks
    plain = LLMEngine(tiny, EngineConfig(num_blocks=200))
    plain.add_request("local", p, greedy)
    assert {"local": out} == run_to_end(plain)


def test_a_planner_profile_predicts_the_budget(tmp_path):
    from distserve.planner.latency import StepModel
    from distserve.planner.profile import EngineProfile, ModelInfo, Profile, ServingCosts
    from services.worker.runtime import profile_predictor

    step = StepModel(prefill=(0.004, 1e-4, 1e-8, 0.0), decode=(0.003, 1e-6, 2e-4))
    info = ModelInfo("m", 2, 64, 4, 2, 16, 128, 259, 1024, 10_000, 4)
    prof = Profile(info, "cpu", {}, [EngineProfile(1, "fp32", 1, step)], {}, "grpc", ServingCosts(), {"block_size": 16})
    prof.save(tmp_path / "p.json")
    predict = profile_predictor(str(tmp_path / "p.json"), 1, "fp32")
    assert predict(8, 800, 64) == pytest.approx(step.step_s([(0, 64)], 8, 800))
    assert predict(8, 800, 0) == pytest.approx(step.decode_s(8, 800))
    assert profile_predictor(str(tmp_path / "p.json"), 2, "int8")(1, 10, 10) == predict(1, 10, 10)  # its only engine serves
    b = chunk_budget(predict, 0.030, 8, 800, 2048)
    assert predict(8, 800, b) <= 0.030 < predict(8, 800, b + 1)


def test_reset_forgets_every_step():
    st = StepTimes()
    for p in (4, 32, 256):
        st.observe(0, p, plane(0, p))
    assert st.fit is not None
    st.reset()
    assert st.fit is None and st.predict(1, 1, 1) is None
    st.observe(1, 0, plane(1, 0))
    assert st.fit.seconds(1, 0) == pytest.approx(plane(1, 0))


@pytest.mark.parametrize("role, decodes_seen", [("colocated", True), ("prefill", False)])
def test_warm_up_runs_decode_batches_of_several_sizes_where_the_worker_decodes(role, decodes_seen):
    """The start-up calibration gives a worker that decodes steps of several decode batch sizes, so the
    fit can tell a step's fixed cost from each decode's (with one decode of one sequence it could not,
    and overcharged decodes ~3x, which shrank a chunked worker's prompt chunks to a block a step)."""
    from distserve.runtime import WorkerSettings
    from services.worker.runtime import CALIBRATION_DECODES, WorkerRuntime

    settings = WorkerSettings(role=role, model="tiny-llama", threads=1, redis_url="redis://127.0.0.1:1/0")
    rt = WorkerRuntime(settings, ())
    rt.load()
    rt.worker.start()
    try:
        asyncio.run(rt.warm_up())
        sizes = {d for d, _ in rt.engine.step_times._buckets}  # bit lengths of the decode counts seen
    finally:
        rt.worker.stop()
    want = {b.bit_length() for b in CALIBRATION_DECODES}
    assert want <= sizes if decodes_seen else not sizes - {0, 1}


def test_the_step_budget_defaults_by_role_and_device():
    """0 (the default) = 256 tokens a step for a prefill engine on CPU, 2048 elsewhere; a set budget wins,
    and an elastic worker's budget follows the role it takes."""
    import dataclasses

    from distserve.runtime import WorkerSettings, step_tokens

    prefill = WorkerSettings(role="prefill", device="cpu")
    assert prefill.engine_config("prefill").max_num_batched_tokens == 256
    assert dataclasses.replace(prefill, role="decode").engine_config("decode").max_num_batched_tokens == 2048
    assert WorkerSettings(role="colocated", device="cpu").engine_config("decode").max_num_batched_tokens == 2048
    assert WorkerSettings(role="prefill", device="cpu", max_num_batched_tokens=1024).engine_config("prefill").max_num_batched_tokens == 1024
    assert step_tokens("prefill", "cuda") == step_tokens("prefill", "gpu") == step_tokens("decode", "cpu") == 2048
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        WorkerSettings(max_num_batched_tokens=-1)


def test_a_native_crash_leaves_the_python_stacks_in_the_worker_log():
    """A worker that dies of a signal (a kernel's bad read, a write to mapped weights) says where it was:
    the chaos suite once lost a decode worker to SIGSEGV with nothing in its log to say why."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    code = ("import os, signal\n"
            "from distserve.runtime import WorkerSettings\n"
            "from services.worker.runtime import WorkerRuntime\n"
            "rt = WorkerRuntime(WorkerSettings(role='decode', model='tiny-llama', threads=1, redis_url='redis://127.0.0.1:1/0'), ())\n"
            "rt.load()\n"
            "os.kill(os.getpid(), signal.SIGSEGV)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}  # the worker's own doing, not the environment's
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == -signal.SIGSEGV, proc.stderr[-2000:]
    assert "Fatal Python error: Segmentation fault" in proc.stderr and "most recent call first" in proc.stderr, proc.stderr[-2000:]
