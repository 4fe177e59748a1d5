"""`distserve plan --watch`: read the pool's load from Redis and recommend a change of role counts.

Every `interval` seconds the worker registry (distserve.state.registry: each live worker's role and
its last heartbeat's load) is read into one `PoolSample`. The `Advisor` turns a sample into each
phase's pressure, using the profile for what a worker can do:

- prefill: the queued prompt tokens per prefill worker over its prefill rate (the profile's prefill
  step at a full token budget) is the queueing delay a new prompt faces; against the TTFT SLO.
- decode: KV held on prefill workers while the decode pool has no room for it, or requests waiting
  for admission, mean the decode pool is short of memory or seats; the step time the profile
  predicts for the running batch (its used KV as context), or the step period the workers measure
  when that is longer, is the TPOT it gives; against the TPOT SLO.
- colocated workers: both at once on one engine.
- decode workers alone (no prefill or colocated worker: they prefill their prompts themselves under a
  conditional or local router): their prompt queue against TTFT, their step against TPOT.

A phase over its SLO (pressure > 1) while the other has room (< 0.5) moves a worker to it (or adds
one when the core budget allows); both over adds a worker of the worse one; both nearly idle hands a
worker back. A recommendation is printed once it held for `window` reads in a row (load flickers),
with the `distserve up` (and compose) command that applies it. With `--apply`, a move between prefill
and decode is made: the least loaded elastic worker of that role is asked to change
(`Registry.request_role`), and the watch waits for it before it recommends anything else. Other
changes (adding or removing a worker) are printed as the command it would run; restarting the suite
is left to the operator.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from distserve.planner.placement import Placement
from distserve.planner.profile import Profile
from distserve.runtime import step_tokens


@dataclass(frozen=True, slots=True)
class PoolSample:
    prefill: int  # live prefill workers (not draining)
    decode: int
    colocated: int
    queued_tokens: int  # prompt tokens waiting on prefill (or colocated) workers
    held: int  # prefilled KV waiting for a decode worker to pull it
    decode_waiting: int  # requests waiting for decode admission
    running: int  # requests in decode (or colocated) batches
    used_blocks: int  # KV blocks in use on decode (or colocated) workers
    total_blocks: int
    block_size: int = 16
    step_period_s: float = 0.0  # measured: mean step cadence of the decoding workers with a running batch (0: none)
    # elastic workers of each role, least loaded first: those a role change can move
    elastic_prefill: tuple[str, ...] = ()
    elastic_decode: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Recommendation:
    prefill: int
    decode: int
    colocated: int
    reason: str

    def placement(self, threads: int, weights: str) -> Placement:
        return Placement(prefill=self.prefill, decode=self.decode, colocated=self.colocated if not self.prefill else 0,
                         threads=threads, weights=weights)


def sample_of(views) -> PoolSample:
    live = [v for v in views if not v.load.draining]
    pre = [v for v in live if v.info.role == "prefill"]
    dec = [v for v in live if v.info.role == "decode"]
    col = [v for v in live if v.info.role == "colocated"]
    # where prompts are prefilled and where tokens are decoded: prefill and decode workers; colocated
    # workers alone; or, with neither prefill nor colocated workers, decode workers prefilling their
    # prompts themselves (routers in conditional or local mode)
    prompts, serving = (pre, dec) if pre else (col, col) if col else (dec, dec)
    return PoolSample(
        prefill=len(pre), decode=len(dec), colocated=len(col),
        queued_tokens=sum(v.load.queued_tokens for v in prompts),
        held=sum(v.load.held_requests for v in pre),
        decode_waiting=sum(v.load.queued_requests for v in dec) if pre else 0,
        running=sum(v.load.running_requests for v in serving),
        used_blocks=sum(v.load.total_blocks - v.load.free_blocks for v in serving),
        total_blocks=sum(v.load.total_blocks for v in serving),
        block_size=max((v.info.block_size for v in serving), default=16),
        step_period_s=_mean([v.load.step_period_s for v in serving if v.load.running_requests and v.load.step_period_s > 0]),
        elastic_prefill=_elastic_least_loaded(pre), elastic_decode=_elastic_least_loaded(dec),
    )


def _elastic_least_loaded(views) -> tuple[str, ...]:
    """The elastic workers among `views`, least loaded first."""
    load = lambda v: (v.load.running_requests + v.load.queued_requests, v.load.queued_tokens)  # noqa: E731
    return tuple(v.worker_id for v in sorted(views, key=load) if v.info.elastic)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def role_change(s: PoolSample, rec: Recommendation) -> tuple[str, str] | None:
    """(from role, to role) when `rec` is one worker of `s` moving between prefill and decode."""
    if s.colocated or rec.colocated or rec.prefill + rec.decode != s.prefill + s.decode:
        return None
    if rec.prefill == s.prefill + 1:
        return "decode", "prefill"
    if rec.prefill == s.prefill - 1:
        return "prefill", "decode"
    return None


class Advisor:
    def __init__(self, profile: Profile, slo_ttft: float, slo_tpot: float, cores: int, threads: int = 1,
                 weights: str = "int8", window: int = 3, budget_tokens: int = 2048, min_prefill: int = 1):
        self.profile, self.slo_ttft, self.slo_tpot = profile, slo_ttft, slo_tpot
        self.cores, self.threads, self.window = cores, threads, window
        self.min_prefill = min_prefill  # 0: the last prefill worker may move to decode (routers must prefill locally then)
        self.weights = weights if weights in profile.weight_formats else profile.weight_formats[0]
        step = profile.engine(threads if profile.device == "cpu" else 1, self.weights if profile.device == "cpu" else None).step
        self.step = step
        budget_tokens = budget_tokens or step_tokens("prefill", profile.device)  # 0: the prefill workers' default
        chunk = min(budget_tokens, 512)
        self.prefill_tok_s = budget_tokens / step.prefill_s([(0, chunk)] * max(1, budget_tokens // chunk))
        self._last: tuple | None = None
        self._streak = 0

    def pressures(self, s: PoolSample) -> tuple[float, float, str]:
        """(prefill pressure, decode pressure, why): 1.0 = at its SLO."""
        workers = s.prefill or s.colocated or s.decode  # the last: decode workers prefilling their prompts themselves
        if not workers:
            return 0.0, 0.0, "no workers"
        delay = s.queued_tokens / (workers * self.prefill_tok_s)
        p = delay / self.slo_ttft
        per = max(1, s.decode or s.colocated)
        batch = s.running / per
        context = s.used_blocks * s.block_size / per
        # the step the profile predicts for the running batch, or the one the workers measure (serving
        # work between steps and prompt chunks riding on decodes included), whichever is longer
        predicted = self.step.decode_s(max(1, round(batch)), int(context)) if s.running else 0.0
        tpot = max(predicted, s.step_period_s) if s.running else 0.0
        d = tpot / self.slo_tpot
        measured = f", measured {s.step_period_s * 1e3:.0f}ms" if s.running and s.step_period_s else ""
        why = (f"prefill queue {delay:.2f}s (TTFT SLO {self.slo_ttft:g}s), decode step {predicted * 1e3:.0f}ms predicted{measured} "
               f"(TPOT SLO {self.slo_tpot * 1e3:g}ms)")
        # KV waits for decode room: decode is short. Prefilled KV is held a moment on its way to any
        # decode worker (between the prefill and the pull), so held KV counts only when the decode pool
        # has no room for it: requests waiting for admission there, or its KV nearly full
        no_room = s.decode_waiting > 0 or (s.total_blocks and s.used_blocks >= 0.9 * s.total_blocks)
        if s.prefill and no_room and (s.held or s.decode_waiting):
            d = max(d, 1.0 + 0.1 * (s.held + s.decode_waiting))
            why += f", {s.held} KV held and {s.decode_waiting} waiting for decode room"
        if s.total_blocks and s.used_blocks >= 0.95 * s.total_blocks:
            d = max(d, 1.0)
            why += f", decode KV {s.used_blocks / s.total_blocks:.0%} full"
        return p, d, why

    def advise(self, s: PoolSample) -> Recommendation | None:
        """The change this sample calls for (None: keep), before the persistence window."""
        p, d, why = self.pressures(s)
        room = self.cores // self.threads - (s.prefill + s.decode + (0 if s.prefill else s.colocated))
        if s.prefill:
            if p > 1 and d > 1:
                if room > 0:
                    return Recommendation(s.prefill + (p >= d), s.decode + (d > p), 0, f"both phases over their SLOs ({why}): add a worker")
                return None
            if p > 1:
                if room > 0:
                    return Recommendation(s.prefill + 1, s.decode, 0, f"prefill is short ({why}): add a prefill worker")
                if d < 0.5 and s.decode > 1:
                    return Recommendation(s.prefill + 1, s.decode - 1, 0, f"prefill is short and decode has room ({why}): move a decode worker to prefill")
                return None
            if d > 1:
                if room > 0:
                    return Recommendation(s.prefill, s.decode + 1, 0, f"decode is short ({why}): add a decode worker")
                if p < 0.5 and s.prefill > max(1, self.min_prefill):
                    return Recommendation(s.prefill - 1, s.decode + 1, 0, f"decode is short and prefill has room ({why}): move a prefill worker to decode")
                if p < 0.5 and s.prefill == 1 and self.min_prefill == 0:
                    return Recommendation(0, s.decode + 1, 0, f"decode is short and prefill has room ({why}): move the prefill worker "
                                          "to decode; the decode workers prefill every prompt themselves")
                return None
            if p < 0.05 and d < 0.2 and s.prefill + s.decode > 2:
                if s.prefill > 1:
                    return Recommendation(s.prefill - 1, s.decode, 0, f"both phases nearly idle ({why}): one prefill worker fewer")
                return Recommendation(s.prefill, s.decode - 1, 0, f"both phases nearly idle ({why}): one decode worker fewer")
            return None
        if not s.colocated:  # decode workers alone, prefilling their prompts themselves
            if p > 1 and room > 0:
                return Recommendation(1, s.decode, 0, f"prompts queue on the decode workers ({why}): add a prefill worker")
            if p > 1 and d < 0.5 and s.decode > 1:
                return Recommendation(1, s.decode - 1, 0, f"prompts queue on the decode workers and decode has room ({why}): "
                                      "move a decode worker to prefill")
            if d > 1 and room > 0:
                return Recommendation(0, s.decode + 1, 0, f"decode is short ({why}): add a decode worker")
            return None
        if max(p, d) > 1:
            if room > 0:
                return Recommendation(0, 0, s.colocated + 1, f"colocated workers over the SLOs ({why}): add one")
            if s.colocated >= 2 and d > 1:
                half = s.colocated // 2
                return Recommendation(half, s.colocated - half, 0,
                                      f"colocated decodes stall behind prefills ({why}): split the workers into prefill and decode")
            return None
        if p < 0.05 and d < 0.2 and s.colocated > 1:
            return Recommendation(0, 0, s.colocated - 1, f"colocated workers nearly idle ({why}): one fewer")
        return None

    def observe(self, s: PoolSample | None) -> Recommendation | None:
        """The recommendation once it held `window` reads in a row (then once; again only after a change).
        None: a read that counts for nothing (the pool is changing), which ends any streak."""
        rec = self.advise(s) if s is not None else None
        key = (rec.prefill, rec.decode, rec.colocated) if rec else None
        if key != self._last:
            self._last, self._streak = key, 0
        self._streak += 1
        if rec is not None and self._streak == self.window:
            return rec
        return None


def commands_for(rec: Recommendation, advisor: Advisor, model: str) -> list[str]:
    if not rec.prefill and not rec.colocated:  # decode workers alone: they prefill, so the routers must let them
        return [f"distserve up --model {model} --prefill 0 --decode {rec.decode} --threads {advisor.threads} "
                f"--weights {advisor.weights} --router-arg=--disagg-mode=conditional"]
    pl = rec.placement(advisor.threads, advisor.weights)
    out = [pl.up_command(model)]
    if pl.compose_command():
        out.append(pl.compose_command())
    return out


async def watch(redis_url: str, advisor: Advisor, model: str = "", interval_s: float = 5.0, iterations: int = 0,
                apply: bool = False, out=print, change_timeout_s: float = 120.0) -> list[Recommendation]:
    """Reads the pool every `interval_s` and prints what it recommends. With `apply`, a recommendation
    that moves a worker between prefill and decode asks the least loaded elastic worker of that role
    to change (`Registry.request_role`: it drains, then registers in its new role), and the watch
    recommends nothing more until that worker serves its new role (or `change_timeout_s` passed:
    one whose work would not drain in its `--drain-s` stays where it is). Anything else it prints
    as the command that would apply it."""
    from distserve.state.connect import connect
    from distserve.state.registry import Registry

    redis = connect(redis_url, role="router", max_connections=2)
    registry = Registry(redis)
    made: list[Recommendation] = []
    changing: tuple[str, str, float] | None = None  # (worker, role asked, by when) of a change under way
    n = 0
    try:
        while iterations <= 0 or n < iterations:
            n += 1
            views = await registry.live_workers(model=model or None)
            s = sample_of(views)
            p, d, why = advisor.pressures(s)
            out(f"{time.strftime('%H:%M:%S')} prefill {s.prefill} decode {s.decode} colocated {s.colocated}: "
                f"pressure prefill {p:.2f}, decode {d:.2f} ({why})")
            if changing is not None:
                wid, role, until = changing
                if any(v.worker_id == wid and v.info.role == role and not v.load.draining for v in views):
                    out(f"CHANGED {wid} serves {role}")
                    changing = None
                elif time.monotonic() > until:
                    out(f"GAVE UP waiting for {wid} to serve {role} (its work did not drain, or it is not elastic any more)")
                    changing = None
                advisor.observe(None)  # the pool is moving: no streak counts across it
            rec = advisor.observe(s) if changing is None else None
            if rec is not None:
                made.append(rec)
                shape = (f"{rec.prefill} prefill + {rec.decode} decode" if rec.prefill or not rec.colocated
                         else f"{rec.colocated} colocated")
                out(f"RECOMMEND {shape}: {rec.reason}")
                move = role_change(s, rec)
                elastic = (s.elastic_prefill if move[0] == "prefill" else s.elastic_decode) if move else ()
                if apply and elastic:
                    wid, role = elastic[0], move[1]
                    if await registry.request_role(wid, role):
                        out(f"APPLIED: asked elastic worker {wid} to serve {role}")
                        changing = (wid, role, time.monotonic() + change_timeout_s)
                    else:
                        out(f"could not ask {wid}: it left the registry")
                else:
                    if apply and move:
                        out(f"no elastic {move[0]} worker to move (start workers with --elastic true, or distserve up --elastic)")
                    for cmd in commands_for(rec, advisor, model or advisor.profile.model.name):
                        out(("APPLY (would run): " if apply else "  ") + cmd)
            if iterations <= 0 or n < iterations:
                await asyncio.sleep(interval_s)
    finally:
        await redis.aclose()
    return made


def watch_main(args, profile: Profile) -> None:
    import os

    cores = args.cores or profile.machine.get("cores") or os.cpu_count()
    threads = int((args.threads or "1").split(",")[0])
    weights = (args.weights or "int8").split(",")[0]
    advisor = Advisor(profile, args.slo_ttft, args.slo_tpot, cores, threads, weights, args.window, args.max_num_batched_tokens,
                      args.min_prefill)
    try:
        asyncio.run(watch(args.redis_url, advisor, args.watch_model, args.interval, args.iterations, args.apply))
    except KeyboardInterrupt:
        pass
