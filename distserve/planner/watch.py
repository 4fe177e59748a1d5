"""`distserve plan --watch`: read the pool's load from Redis and recommend a change of role counts.

Every `interval` seconds the worker registry (distserve.state.registry: each live worker's role and
its last heartbeat's load) is read into one `PoolSample`. The `Advisor` turns a sample into each
phase's pressure, using the profile for what a worker can do:

- prefill: the queued prompt tokens per prefill worker over its prefill rate (the profile's prefill
  step at a full token budget) is the queueing delay a new prompt faces; against the TTFT SLO.
- decode: KV held on prefill workers waiting for decode room, or requests waiting for admission,
  mean the decode pool is short of memory or seats; the step time the profile predicts for the
  running batch (its used KV as context) is the TPOT it gives; against the TPOT SLO.
- colocated workers: both at once on one engine.

A phase over its SLO (pressure > 1) while the other has room (< 0.5) moves a worker to it (or adds
one when the core budget allows); both over adds a worker of the worse one; both nearly idle hands a
worker back. A recommendation is printed once it held for `window` reads in a row (load flickers),
with the `distserve up` (and compose) command that applies it; `--apply` prints that command as
what it would run (restarting the suite is left to the operator).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from distserve.planner.placement import Placement
from distserve.planner.profile import Profile


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
    serving = dec if pre else col
    return PoolSample(
        prefill=len(pre), decode=len(dec), colocated=len(col),
        queued_tokens=sum(v.load.queued_tokens for v in (pre or col)),
        held=sum(v.load.held_requests for v in pre),
        decode_waiting=sum(v.load.queued_requests for v in dec),
        running=sum(v.load.running_requests for v in serving),
        used_blocks=sum(v.load.total_blocks - v.load.free_blocks for v in serving),
        total_blocks=sum(v.load.total_blocks for v in serving),
        block_size=max((v.info.block_size for v in serving), default=16),
    )


class Advisor:
    def __init__(self, profile: Profile, slo_ttft: float, slo_tpot: float, cores: int, threads: int = 1,
                 weights: str = "int8", window: int = 3, budget_tokens: int = 2048):
        self.profile, self.slo_ttft, self.slo_tpot = profile, slo_ttft, slo_tpot
        self.cores, self.threads, self.window = cores, threads, window
        self.weights = weights if weights in profile.weight_formats else profile.weight_formats[0]
        step = profile.engine(threads if profile.device == "cpu" else 1, self.weights if profile.device == "cpu" else None).step
        self.step = step
        chunk = min(budget_tokens, 512)
        self.prefill_tok_s = budget_tokens / step.prefill_s([(0, chunk)] * max(1, budget_tokens // chunk))
        self._last: tuple | None = None
        self._streak = 0

    def pressures(self, s: PoolSample) -> tuple[float, float, str]:
        """(prefill pressure, decode pressure, why): 1.0 = at its SLO."""
        workers = s.prefill or s.colocated
        if not workers:
            return 0.0, 0.0, "no workers"
        delay = s.queued_tokens / (workers * self.prefill_tok_s)
        p = delay / self.slo_ttft
        per = max(1, s.decode or s.colocated)
        batch = s.running / per
        context = s.used_blocks * s.block_size / per
        tpot = self.step.decode_s(max(1, round(batch)), int(context)) if s.running else 0.0
        d = tpot / self.slo_tpot
        why = f"prefill queue {delay:.2f}s (TTFT SLO {self.slo_ttft:g}s), decode step {tpot * 1e3:.0f}ms (TPOT SLO {self.slo_tpot * 1e3:g}ms)"
        if s.prefill and (s.held or s.decode_waiting):
            d = max(d, 1.0 + 0.1 * (s.held + s.decode_waiting))  # KV waits for decode room: decode is short
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
                if p < 0.5 and s.prefill > 1:
                    return Recommendation(s.prefill - 1, s.decode + 1, 0, f"decode is short and prefill has room ({why}): move a prefill worker to decode")
                return None
            if p < 0.05 and d < 0.2 and s.prefill + s.decode > 2:
                if s.prefill > 1:
                    return Recommendation(s.prefill - 1, s.decode, 0, f"both phases nearly idle ({why}): one prefill worker fewer")
                return Recommendation(s.prefill, s.decode - 1, 0, f"both phases nearly idle ({why}): one decode worker fewer")
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

    def observe(self, s: PoolSample) -> Recommendation | None:
        """The recommendation once it held `window` reads in a row (then once; again only after a change)."""
        rec = self.advise(s)
        key = (rec.prefill, rec.decode, rec.colocated) if rec else None
        if key != self._last:
            self._last, self._streak = key, 0
        self._streak += 1
        if rec is not None and self._streak == self.window:
            return rec
        return None


def commands_for(rec: Recommendation, advisor: Advisor, model: str) -> list[str]:
    pl = rec.placement(advisor.threads, advisor.weights)
    out = [pl.up_command(model)]
    if pl.compose_command():
        out.append(pl.compose_command())
    return out


async def watch(redis_url: str, advisor: Advisor, model: str = "", interval_s: float = 5.0, iterations: int = 0,
                apply: bool = False, out=print) -> list[Recommendation]:
    from distserve.state.connect import connect
    from distserve.state.registry import Registry

    redis = connect(redis_url, role="router", max_connections=2)
    registry = Registry(redis)
    made: list[Recommendation] = []
    n = 0
    try:
        while iterations <= 0 or n < iterations:
            n += 1
            views = await registry.live_workers(model=model or None)
            s = sample_of(views)
            p, d, why = advisor.pressures(s)
            out(f"{time.strftime('%H:%M:%S')} prefill {s.prefill} decode {s.decode} colocated {s.colocated}: "
                f"pressure prefill {p:.2f}, decode {d:.2f} ({why})")
            rec = advisor.observe(s)
            if rec is not None:
                made.append(rec)
                shape = f"{rec.prefill} prefill + {rec.decode} decode" if rec.prefill else f"{rec.colocated} colocated"
                out(f"RECOMMEND {shape}: {rec.reason}")
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
    advisor = Advisor(profile, args.slo_ttft, args.slo_tpot, cores, threads, weights, args.window, args.max_num_batched_tokens)
    try:
        asyncio.run(watch(args.redis_url, advisor, args.watch_model, args.interval, args.iterations, args.apply))
    except KeyboardInterrupt:
        pass
