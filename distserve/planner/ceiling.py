"""The most a budget of cores can serve: a bound on goodput that no placement and no router passes.

Whatever core runs it, a request costs core-seconds by the profile's step model (latency.py):

- its prompt: the step's prefill part for a prompt of l tokens, b_p * l + c_p * l^2 + d_p, without the
  step's fixed cost, which the other prompts of a step share;
- its output: every token after the first is one sequence of a decode step. A step of B sequences
  costs a + b_d * (their contexts) + c_d * B, so one token costs a / B + b_d * its context + c_d, and
  B is at most the largest batch whose step still meets the TPOT objective (each sequence of a step
  waits for the whole step). A step's fixed cost a is the smaller of the decode and prefill
  intercepts: a mixed step pays the prefill one and no decode one. The profile's serving costs per
  step, per sequence and per context token are added as the simulator adds them.

With every core busy all the time on this work alone, N cores serve at most N / (mean core-seconds
per request) requests a second. Everything left out only lowers what a real suite reaches: queueing,
the TTFT objective, KV transfers, the batch falling below B while requests come and go. So no
placement sustains a rate above the ceiling, and a target above it is out of reach on these cores
with this engine, whatever the split of roles.

Sustains: a run of a few hundred requests above it can still meet its objectives for 90% of them,
because it ends before its backlog grows (the simulator's chat on two cores: the best placement 97%
of 200 requests at the ceiling's rate, 22% of 800). Goodput measured with 100 requests a point is
such a run, so it can pass the ceiling by a little; what it cannot do is hold there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from distserve.planner.latency import StepModel
from distserve.planner.profile import EngineProfile, Profile, ServingCosts


@dataclass(frozen=True, slots=True)
class Ceiling:
    rate: float  # requests/s the cores could serve at most (0: no batch meets the TPOT objective)
    output_tok_s: float  # the same in output tokens/s
    prefill_s: float  # mean core-seconds of a request's prefill
    decode_s: float  # mean core-seconds of a request's decode
    batch: int  # the decode batch the bound assumes (the largest meeting the TPOT objective)
    engine: str  # the engine configuration it was reached with, e.g. "int8, 1 thread"
    cores: int

    def to_dict(self) -> dict:
        return asdict(self)


def max_decode_batch(step: StepModel, context: float, slo_tpot: float, costs: ServingCosts = ServingCosts(),
                     limit: int = 256) -> int:
    """The largest batch (up to `limit`) whose decode step, every sequence at `context` tokens, takes
    no longer than `slo_tpot`; 0 if even one sequence's step does not."""
    best = 0
    for b in range(1, limit + 1):
        if step.decode_s(b, round(b * context)) + costs.step_s + b * costs.seq_s + b * context * costs.ctx_s > slo_tpot:
            break
        best = b
    return best


def request_core_s(step: StepModel, prompt: int, output: int, batch: int, costs: ServingCosts = ServingCosts()) -> tuple[float, float]:
    """(prefill, decode) core-seconds of one request, its decode tokens in steps of `batch` sequences."""
    _, prefill = step._prefill([(0, prompt)])
    a_d, b_d, c_d = step._decode_coef(batch)
    fixed = min(a_d, step._prefill_coef(prompt)[0]) + costs.step_s
    tokens = max(0, output - 1)  # the first token comes with the prefill
    contexts = tokens * prompt + tokens * (tokens + 1) / 2  # the i-th decode token attends to prompt + i tokens
    decode = tokens * (fixed / batch + c_d + costs.seq_s) + (b_d + costs.ctx_s) * contexts
    return prefill / step.pp, decode / step.pp


def engine_ceiling(engine: EngineProfile, costs: ServingCosts, lengths: Sequence[tuple[int, int]], cores: int,
                   slo_tpot: float, max_num_seqs: int = 256) -> Ceiling:
    """The ceiling of `cores` cores, each `engine.threads` of them running one worker of this engine."""
    label = f"{engine.weights}, {engine.threads} thread{'s' if engine.threads > 1 else ''}"
    n = len(lengths)
    mean_out = sum(o for _, o in lengths) / n
    tokens = sum(max(0, o - 1) for _, o in lengths)
    # the mean context a decode token attends to, over all decode tokens
    context = sum(max(0, o - 1) * p + max(0, o - 1) * o / 2 for p, o in lengths) / max(1, tokens)
    batch = max_decode_batch(engine.step, context, slo_tpot, costs, max_num_seqs)
    if batch == 0:
        return Ceiling(0.0, 0.0, 0.0, 0.0, 0, label, cores)
    parts = [request_core_s(engine.step, p, o, batch, costs) for p, o in lengths]
    prefill = sum(p for p, _ in parts) / n * engine.threads
    decode = sum(d for _, d in parts) / n * engine.threads
    rate = cores / (prefill + decode)
    return Ceiling(rate, rate * mean_out, prefill, decode, batch, label, cores)


def ceiling(profile: Profile, lengths: Sequence[tuple[int, int]], cores: int, slo_tpot: float,
            weights: Sequence[str] | None = None, max_num_seqs: int = 256) -> Ceiling:
    """The highest ceiling over the profile's CPU engines (weight formats, threads per worker)."""
    if profile.device != "cpu":
        raise ValueError("the ceiling counts core-seconds: it needs a CPU profile")
    engines = [e for e in profile.engines if e.threads <= cores and (not weights or e.weights in weights)]
    if not engines:
        raise ValueError(f"the profile has no engine for {cores} cores with weights {', '.join(weights or ())}")
    return max((engine_ceiling(e, profile.costs, lengths, cores, slo_tpot, max_num_seqs) for e in engines), key=lambda c: c.rate)


def ceiling_line(c: Ceiling, workload: str, slo_tpot: float, against: float = 0.0) -> str:
    if c.batch == 0:
        return f"ceiling: no decode step of one sequence meets TPOT <= {slo_tpot * 1e3:g}ms: no placement serves {workload}"
    line = (f"ceiling: no placement of {c.cores} cores sustains more than {c.rate:.2f} req/s ({c.output_tok_s:.0f} output tok/s) of "
            f"{workload} at TPOT <= {slo_tpot * 1e3:g}ms: a request costs {c.prefill_s:.3f} core-s of prefill + {c.decode_s:.3f} "
            f"of decode ({c.engine}, decode batch {c.batch}), every core busy, no queueing, no TTFT objective")
    if against > 0:
        line += f"\n  against {against:g} req/s: at most {c.rate / against:.2f}x"
    return line
