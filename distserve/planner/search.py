"""Placement search by simulated goodput (DistServe section 4, Algorithms 1 and 2).

Goodput of one placement: the request list is fixed (workload, n, seed); the arrival rate is searched
as `distserve bench goodput` searches it on the real suite (`bench.goodput.GoodputSearch`: a coarse
upward sweep until attainment falls below the target, then bisection), each rate one simulation.
Ranking is by goodput per unit of hardware (a core, or a GPU), then by goodput.

CPU (`cpu_candidates`): every placement `distserve up` can run on N cores with one thread count for
all workers: P prefill + D decode workers, or C colocated workers (prefill priority or chunked), per
thread count and weight format the profile has. Above `FULL_SEARCH_UNITS` cores the disaggregated
counts are pruned as in Algorithm 1: each phase's goodput per instance is simulated alone, and only
P:D splits near the ratio that balances them are simulated whole.

GPU (`gpu_plan`): Algorithm 1 (high node affinity: KV may cross nodes): the best (TP, PP) of a
prefill instance by prefill-only goodput per GPU, the same for decode, then the instance counts that
fit the GPU budget with the phases' goodputs balanced. Algorithm 2 (low node affinity): prefill and
decode segments of one pipeline stage share a node (KV moves over NVLink), so per PP degree the
per-node split (m prefill x TP_p + n decode x TP_d <= GPUs per node) is searched as one unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from distserve.bench.goodput import GoodputSearch
from distserve.bench.metrics import RequestResult, attainment, percentile
from distserve.planner.latency import StepModel
from distserve.planner.placement import EngineLimits, Placement, suite_spec
from distserve.planner.profile import Profile
from distserve.planner.sim_engine import EngineSpec, TraceRequest
from distserve.planner.simulator import SuiteSpec, simulate
from distserve.planner.trace import Trace, with_rate, workload_trace

FULL_SEARCH_UNITS = 8


@dataclass(frozen=True, slots=True)
class Objective:
    """What goodput means: SLOs, the share of requests that must meet both, and the request list."""

    slo_ttft: float
    slo_tpot: float
    target: float = 0.9
    workload: str = "chat"  # a bench workload name (ignored when `trace` is given)
    num_requests: int = 200
    seed: int = 0
    arrival: str = "poisson"
    cv: float = 1.0
    trace: Trace | None = None  # a recorded length mix instead of a workload (num_requests drawn from it, fresh Poisson arrivals)

    def requests_at(self, rate: float) -> list[TraceRequest]:
        if self.trace is not None:
            return with_rate(self.trace, rate, self.seed, self.num_requests).requests
        return workload_trace(self.workload, self.num_requests, rate, self.seed, self.arrival, self.cv).requests


@dataclass(slots=True)
class Goodput:
    placement: Placement
    units: int
    rate: float  # highest rate measured with attainment >= target (0: none)
    bounded: bool  # a failing rate was found above it
    points: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment) in the order simulated
    at_goodput: dict = field(default_factory=dict)  # ttft/tpot p90 and attainments at the goodput rate

    @property
    def per_unit(self) -> float:
        return self.rate / self.units if self.units else 0.0


def _stats(results: list[RequestResult], o: Objective) -> dict:
    ok = [r for r in results if r.ok]
    return {
        "attainment": attainment(results, o.slo_ttft, o.slo_tpot),
        "ttft_attainment": sum(r.ok and r.ttft <= o.slo_ttft for r in results) / max(1, len(results)),
        "tpot_attainment": sum(r.ok and r.tpot <= o.slo_tpot for r in results) / max(1, len(results)),
        "ttft_p90": percentile([r.ttft for r in ok], 90), "tpot_p90": percentile([r.tpot for r in ok], 90),
    }


def first_rate(suite: SuiteSpec, o: Objective) -> float:
    """A rate well below what the suite sustains, to start the sweep from: 1/8 of one request's
    unloaded service time per instance."""
    reqs = o.requests_at(1.0)
    p = sum(r.prompt_len for r in reqs) / len(reqs)
    out = sum(r.output_len for r in reqs) / len(reqs)
    spec = (suite.prefill or suite.colocated)[0]
    dspec = (suite.decode or suite.colocated)[0]
    service = spec.step.prefill_s([(0, int(p))]) * spec.step.pp + out * dspec.step.decode_s(1, int(p + out / 2)) * dspec.step.pp
    instances = max(1, len(suite.prefill or suite.colocated))
    return max(1e-4, instances / max(service, 1e-6) / 8)


def goodput_of_suite(suite: SuiteSpec, o: Objective, stat: Callable[[list[RequestResult]], float] | None = None,
                     bisect_steps: int = 6, rel_tol: float = 0.02) -> tuple[float, bool, list[tuple[float, float]], dict]:
    """(goodput, bounded, points, stats at goodput) of one simulated suite."""
    stat = stat or (lambda res: attainment(res, o.slo_ttft, o.slo_tpot))
    r0 = first_rate(suite, o)
    search = GoodputSearch([r0 * 2**k for k in range(16)], o.target, bisect_steps, rel_tol)
    best: dict = {}
    while (rate := search.next_rate()) is not None:
        res = simulate(suite, o.requests_at(rate), o.seed, keep_token_times=False)
        a = stat(res)
        search.record(rate, a)
        if a >= o.target and rate >= search.goodput:
            best = _stats(res, o)
    return search.goodput, search.bounded, search.points, best


def goodput(profile: Profile, placement: Placement, o: Objective, limits: EngineLimits = EngineLimits()) -> Goodput:
    suite = suite_spec(profile, placement, limits)
    rate, bounded, points, best = goodput_of_suite(suite, o)
    return Goodput(placement, placement.units(profile.device), rate, bounded, points, best)


# -- phases alone (Algorithm 1) ------------------------------------------------------------------

_FREE = StepModel((0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0))


def prefill_only(spec: EngineSpec, o: Objective) -> float:
    """Goodput of one prefill instance by its TTFT alone (requests end at their first token)."""
    suite = SuiteSpec(prefill=(spec,), decode=(EngineSpec(_FREE, 1 << 40),))
    one = replace(o, trace=_one_token(o))
    return goodput_of_suite(suite, one, lambda res: sum(r.ok and r.ttft <= o.slo_ttft for r in res) / len(res))[0]


def decode_only(spec: EngineSpec, o: Objective) -> float:
    """Goodput of one decode instance by its TPOT alone (prompts prefilled at no cost)."""
    suite = SuiteSpec(prefill=(EngineSpec(_FREE, 1 << 40, max_num_batched_tokens=1 << 40, max_num_seqs=1 << 20),), decode=(spec,))
    return goodput_of_suite(suite, o, lambda res: sum(r.ok and r.tpot <= o.slo_tpot for r in res) / len(res))[0]


def _one_token(o: Objective) -> Trace:
    reqs = o.requests_at(1.0)
    return Trace([TraceRequest(r.index, r.prompt_len, 1, r.arrival_s) for r in reqs], name="prefill only")


# -- CPU ------------------------------------------------------------------------------------------


def cpu_candidates(profile: Profile, cores: int, weights: list[str] | None = None, threads: list[int] | None = None,
                   chunked: bool = True) -> list[Placement]:
    out = []
    for t in threads or profile.thread_counts:
        workers = cores // t
        if workers < 1:
            continue
        for w in weights or profile.weight_formats:
            for p in range(1, workers):
                for d in range(1, workers - p + 1):
                    out.append(Placement(prefill=p, decode=d, threads=t, weights=w))
            for c in range(1, workers + 1):
                out.append(Placement(colocated=c, threads=t, weights=w))
                if chunked:
                    out.append(Placement(colocated=c, threads=t, weights=w, chunked=True))
    return out


def prune_algorithm1(profile: Profile, candidates: list[Placement], o: Objective, limits: EngineLimits) -> list[Placement]:
    """Keeps, per (threads, weights), the P:D splits whose phase capacities balance (and the largest
    colocated count); whole simulations then rank them."""
    keep, groups = [], {}
    for c in candidates:
        groups.setdefault((c.threads, c.weights, c.disaggregated), []).append(c)
    for (t, w, disagg), group in groups.items():
        if not disagg:
            most = max(x.colocated for x in group)
            keep += [x for x in group if x.colocated in (1, most)]
            continue
        probe = Placement(prefill=1, decode=1, threads=t, weights=w)
        suite = suite_spec(profile, probe, limits)
        gp, gd = prefill_only(suite.prefill[0], o), decode_only(suite.decode[0], o)
        workers = max(x.prefill + x.decode for x in group)
        scored = sorted(group, key=lambda x: -min(x.prefill * gp, x.decode * gd))
        best = min(scored[0].prefill * gp, scored[0].decode * gd)
        keep += [x for x in scored if min(x.prefill * gp, x.decode * gd) >= 0.8 * best and x.prefill + x.decode >= workers - 1][:4]
    return keep


def plan_cpu(profile: Profile, cores: int, o: Objective, limits: EngineLimits = EngineLimits(),
             weights: list[str] | None = None, threads: list[int] | None = None, progress=None) -> list[Goodput]:
    cands = cpu_candidates(profile, cores, weights, threads)
    if cores > FULL_SEARCH_UNITS:
        cands = prune_algorithm1(profile, cands, o, limits)
    results = []
    for c in cands:
        g = goodput(profile, c, o, limits)
        results.append(g)
        if progress:
            progress(g)
    return rank(results)


def rank(results: list[Goodput]) -> list[Goodput]:
    return sorted(results, key=lambda g: (-g.per_unit, -g.rate, g.units, g.placement.label()))


# -- GPU ------------------------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def instance_options(profile: Profile, max_gpus: int) -> list[tuple[int, int]]:
    """(TP, PP) pairs the profile covers that fit in `max_gpus` and leave memory for KV."""
    out = []
    for tp in profile.tp_degrees:
        for pp in divisors(profile.model.num_layers):
            if tp * pp <= max_gpus and profile.num_blocks(tp, pp) > 0:
                out.append((tp, pp))
    return out


@dataclass(slots=True)
class PhaseChoice:
    tp: int
    pp: int
    goodput: float  # of one instance, this phase alone

    @property
    def per_gpu(self) -> float:
        return self.goodput / (self.tp * self.pp)


def best_phase(profile: Profile, role: str, o: Objective, limits: EngineLimits, max_gpus: int) -> list[PhaseChoice]:
    choices = []
    for tp, pp in instance_options(profile, max_gpus):
        pl = Placement(prefill=1, decode=1, tp_prefill=tp, pp_prefill=pp, tp_decode=tp, pp_decode=pp)
        suite = suite_spec(profile, pl, limits)
        g = prefill_only(suite.prefill[0], o) if role == "prefill" else decode_only(suite.decode[0], o)
        choices.append(PhaseChoice(tp, pp, g))
    return sorted(choices, key=lambda c: (-c.per_gpu, c.tp * c.pp))


def balanced_pairs(pre: list[PhaseChoice], dec: list[PhaseChoice], gpus: int, keep: int = 6) -> list[Placement]:
    """Algorithm 1's replication: for each prefill and decode instance choice, the instance counts within
    the GPU budget whose slower phase sustains the most per GPU (min(P * g_p, D * g_d) / GPUs); the
    `keep` best, to be simulated whole."""
    scored = []
    for p in pre:
        for d in dec:
            gp, gd = p.tp * p.pp, d.tp * d.pp
            for n_p in range(1, gpus // gp + 1):
                n_d = (gpus - n_p * gp) // gd
                if n_d < 1 or p.goodput <= 0 or d.goodput <= 0:
                    continue
                # the fewest decode instances that keep up with n_p prefill instances (or all that fit)
                n_d = min(n_d, max(1, math.ceil(n_p * p.goodput / d.goodput)))
                used = n_p * gp + n_d * gd
                score = min(n_p * p.goodput, n_d * d.goodput) / used
                scored.append((score, used, Placement(prefill=n_p, decode=n_d, tp_prefill=p.tp, pp_prefill=p.pp, tp_decode=d.tp, pp_decode=d.pp)))
    scored.sort(key=lambda x: (-x[0], x[1]))
    out: list[Placement] = []
    for _, _, pl in scored:
        if pl not in out:
            out.append(pl)
        if len(out) == keep:
            break
    return out


def plan_gpu(profile: Profile, gpus: int, o: Objective, limits: EngineLimits = EngineLimits(), node_gpus: int = 8,
             affinity: str = "high", progress=None) -> tuple[list[Goodput], dict]:
    """Ranked whole-placement goodputs and the per-phase choices behind them."""
    notes: dict = {}
    cands: list[Placement] = []
    if affinity == "high":  # Algorithm 1
        pre = best_phase(profile, "prefill", o, limits, node_gpus)
        dec = best_phase(profile, "decode", o, limits, node_gpus)
        notes = {"prefill": pre, "decode": dec}
        cands = balanced_pairs(pre, dec, gpus)
    else:  # Algorithm 2: per PP degree, one node's worth of segments per stage
        for pp in divisors(profile.model.num_layers):
            if pp * 1 > gpus:
                continue
            for tp_p in profile.tp_degrees:
                for tp_d in profile.tp_degrees:
                    for m in range(1, node_gpus // tp_p + 1):
                        n = (node_gpus - m * tp_p) // tp_d
                        if n < 1 or (m * tp_p + n * tp_d) * pp > gpus:
                            continue
                        if profile.num_blocks(tp_p, pp) <= 0 or profile.num_blocks(tp_d, pp) <= 0:
                            continue
                        cands.append(Placement(prefill=m, decode=n, tp_prefill=tp_p, pp_prefill=pp, tp_decode=tp_d, pp_decode=pp))
    for tp, pp in instance_options(profile, node_gpus):  # colocated (vLLM-like) for comparison
        c = gpus // (tp * pp)
        if c >= 1:
            cands.append(Placement(colocated=min(c, 1), tp_prefill=tp, pp_prefill=pp))
    results = []
    seen = set()
    for c in cands:
        if c in seen:
            continue
        seen.add(c)
        g = goodput(profile, c, o, limits)
        results.append(g)
        if progress:
            progress(g)
    return rank(results), notes
