"""Conditional disaggregation: per request and per moment, the router prefills a prompt either on the
decode worker that will decode it ("local": a Decode call without a KV handle, which that worker
prefills in chunks within its TPOT target) or on the prefill pool ("remote": Prefill, then the KV
pulled by the decode worker).

Modes (`--disagg-mode`): `remote` always remote, `local` always local (both for benchmarking, and
remote is the default); `conditional` decides by the rule below. In every mode a request whose KV got
lost twice on its way to decode prefills locally (services/router/generation.py's replay).

The rule, for a prompt of P tokens, the decode worker D the picker would choose for it and the
prefill worker R it would choose (the least queued tokens):

    remote_s = prefill_s(R, Q_R + P) - e_R + transfer_s(R -> D, P)
        prefill_s(R, n) = ceil(n / M_R) * a_R + b_R * n   R's published step fit (a, and b per prompt token),
                          its step budget M_R, and n: the tokens queued there (its last published queue,
                          which counts the prompts of its step in flight, plus what this router sent
                          since) and this prompt's; without R's fit, n over the prefill rate this router
                          measured on its prefill legs
        e_R               how long R's step in flight has run (published, plus the sample's age); at
                          least prefill_s(R, P) remains
        transfer_s(P)   = P * bytes_per_token / bytes_per_s  of the pair R -> D, from the pulls this router's
                          requests reported; before any, D's published pull estimate; before that, 0
    local_s  = ceil(n_D / T_D) * (a_D + d_D * B_D) + b_D * n_D
                          T_D: the prompt tokens one of D's steps may carry within its TPOT target with
                          its running batch of B_D requests (published; plus what this router sent since);
                          n_D: prompt tokens queued on D plus P; (a_D, d_D, b_D): D's step fit (fixed, per
                          decode, per prompt token). Each step runs the B_D decodes and a chunk; the
                          first token comes with the last chunk.

    local  iff  P <= local_max_prompt_tokens (when set)  and  T_D > 0 (D has budget now)  and  D's fit is known
                and  local_s + margin_s < remote_s
    otherwise remote; with no prefill worker at all, local (the decode pool serves alone).

With prefix caching, P in prefill_s(R, ...) and in local_s is the part of the prompt the worker has
not cached (as the router knows it, services/router/prefix_index.py), and so is the P compared with
local_max_prompt_tokens; the transfer moves the whole prompt's KV. So a decode worker that still
holds a conversation's previous turn (its prompt's KV came in by transfer, its output it computed)
can take the next turn's prefill itself.

Why the margin: with an idle prefill pool remote_s is local_s plus a transfer, and going local is not
free: it takes decode time (D's running requests slow down towards its TPOT target) for a gain of a
few milliseconds. The margin (default 0.2 s) keeps prompts remote until the prefill pool's queue makes
waiting for it cost more than that, i.e. when the prefill pool is the bottleneck and D has slack. It is
also the router's guard against estimates that are a heartbeat old. Each decision is counted
(`distserve_disagg_decision_total{decision}`) and reported in the request's metrics with its reason
and both estimates, so the rule can be audited against the TTFT each request got.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from distserve.errors import ResourceExhausted, Unavailable
from distserve.kv.estimate import PullEstimate
from distserve.state.registry import WorkerLoad, WorkerView

MODES = ("conditional", "remote", "local")
# why a choice was made: forced by the mode; conditional's estimates; a prompt over local_max_prompt_tokens;
# a decode worker that does not prefill in chunks (or publishes no step fit); no estimate of the prefill
# side; no prefill worker; no decode worker to weigh; the KV of this request got lost twice
REASONS = ("mode", "estimate", "long_prompt", "no_budget", "unmeasured", "no_prefill_worker", "no_decode_worker", "kv_lost")
MAX_PAIRS = 4096  # transfer estimates kept (least recently used dropped)
MAX_SAMPLE_AGE_S = 1.0  # a load sample's age counted into its step in flight (heartbeats come every 0.5 s)


@dataclass(frozen=True, slots=True)
class DisaggPolicy:
    mode: str = "remote"  # one of MODES
    local_max_prompt_tokens: int = 0  # conditional: longer prompts always prefill remotely (0 = no cap)
    margin_s: float = 0.2  # conditional: local must be expected this much sooner than remote

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"disagg mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass(frozen=True, slots=True)
class Choice:
    local: bool  # prefill on the decode worker
    reason: str  # one of REASONS
    local_s: float = 0.0  # expected seconds to the first token, local (0 = not estimated)
    remote_s: float = 0.0  # ... and remote, KV transfer included
    decode: WorkerView | None = None  # local: the decode worker weighed (the request goes there)

    @property
    def decision(self) -> str:
        return "local" if self.local else "remote"


def fitted(load: WorkerLoad) -> bool:
    """Whether a worker publishes a step-time fit (all zeros: not measured yet, or an older worker)."""
    return load.step_fixed_s > 0 or load.step_token_s > 0 or load.step_decode_s > 0


def local_seconds(prompt_tokens: int, decode: WorkerLoad) -> float | None:
    """Expected seconds until a decode worker prefilled this prompt in chunks (the load's queue and
    running batch as the router counts them); None when it does not prefill in chunks or has no fit."""
    budget, a, b = decode.prefill_budget_tokens, decode.step_fixed_s, decode.step_token_s
    if budget <= 0 or not fitted(decode):
        return None
    n = decode.queued_tokens + prompt_tokens
    return math.ceil(n / budget) * (a + decode.step_decode_s * decode.running_requests) + b * n


def in_flight_s(load: WorkerLoad, now: float | None = None) -> float:
    """Seconds the worker's step in flight has run by `now` (unix time): its published figure plus the
    sample's age (at most MAX_SAMPLE_AGE_S, against clocks that disagree between hosts); 0 between steps."""
    if load.step_elapsed_s <= 0:
        return 0.0
    age = (time.time() if now is None else now) - load.updated_at if load.updated_at else 0.0
    return load.step_elapsed_s + min(max(0.0, age), MAX_SAMPLE_AGE_S)


def prefill_seconds(prompt_tokens: int, prefill: WorkerLoad, observed_rate: float | None = None,
                    now: float | None = None) -> float | None:
    """Expected seconds until a prefill worker prefilled this prompt behind its queue (the step in
    flight counted, less what of it has run); None when neither its fit nor an observed rate is known."""
    n = prefill.queued_tokens + prompt_tokens
    a, b = prefill.step_fixed_s, prefill.step_token_s
    if fitted(prefill):
        budget = max(1, prefill.max_step_tokens or n)
        total, alone = math.ceil(n / budget) * a + b * n, math.ceil(prompt_tokens / budget) * a + b * prompt_tokens
    elif observed_rate and observed_rate > 0 and math.isfinite(observed_rate):
        total, alone = n / observed_rate, prompt_tokens / observed_rate
    else:
        return None
    return max(total - in_flight_s(prefill, now), alone)


def decide(prompt_tokens: int, decode: WorkerLoad, prefill: WorkerLoad | None, policy: DisaggPolicy,
           transfer_s: float = 0.0, observed_rate: float | None = None, decode_cached: int = 0, prefill_cached: int = 0) -> Choice:
    """The conditional rule (module docstring) on loads as the router counts them: `decode` and
    `prefill` with what this router sent since their last publish added to their queues and batch;
    `decode_cached` and `prefill_cached`: prompt tokens each side holds in its prefix cache."""
    local_tokens = prompt_tokens - decode_cached
    if prefill is None:
        return Choice(True, "no_prefill_worker", local_seconds(local_tokens, decode) or 0.0)
    if 0 < policy.local_max_prompt_tokens < local_tokens:
        return Choice(False, "long_prompt")
    local = local_seconds(local_tokens, decode)
    if local is None:
        return Choice(False, "no_budget")
    remote = prefill_seconds(prompt_tokens - prefill_cached, prefill, observed_rate)
    if remote is None:
        return Choice(False, "unmeasured", local)
    remote += transfer_s
    return Choice(local + policy.margin_s < remote, "estimate", local, remote)


class PairTransfers:
    """KV pull estimates per (prefill worker, decode worker), from what decode legs report."""

    def __init__(self, max_pairs: int = MAX_PAIRS):
        self.max_pairs = max_pairs
        self._pairs: OrderedDict[tuple[str, str], PullEstimate] = OrderedDict()

    def observe(self, prefill_id: str, decode_id: str, nbytes: int, seconds: float, tokens: int) -> None:
        key = (prefill_id, decode_id)
        est = self._pairs.pop(key, None) or PullEstimate()
        est.observe(nbytes, seconds, tokens)
        self._pairs[key] = est
        while len(self._pairs) > self.max_pairs:
            self._pairs.popitem(last=False)

    def seconds(self, prefill_id: str, decode: WorkerView, tokens: int) -> float:
        """The pair's estimate, else the decode worker's published one, else 0."""
        est = self._pairs.get((prefill_id, decode.worker_id))
        if est is not None and est.known:
            return est.seconds(tokens)
        ld = decode.load
        if ld.kv_bytes_per_s > 0 and ld.kv_bytes_per_token > 0:
            return tokens * ld.kv_bytes_per_token / ld.kv_bytes_per_s
        return 0.0


class Disaggregation:
    """The router's choices: the policy, the picker's view of the pools, the pair transfer estimates."""

    def __init__(self, policy: DisaggPolicy, picker, metrics):
        self.policy = policy
        self.picker = picker
        self.metrics = metrics
        self.transfers = PairTransfers()

    async def choose(self, prompt_tokens: int, blocks_needed_by, avoid: set[str], *, kv_lost: bool = False,
                     observed_rate: float | None = None, prompt: list[int] | None = None,
                     pick: Callable[[Callable[[], Awaitable[WorkerView]]], Awaitable[WorkerView]] | None = None) -> Choice:
        """Where this prompt is prefilled. `pick(fn)` runs a picker call the way the caller retries them
        (waiting a little for a worker on replays); only a local choice needs its decode worker now."""
        pick = pick or (lambda fn: fn())
        peek = lambda: self.picker.peek_decode(blocks_needed_by, exclude=avoid)  # noqa: E731
        mode = self.policy.mode
        if kv_lost or mode == "local":
            choice = Choice(True, "kv_lost" if kv_lost else "mode", decode=await pick(peek))
        elif mode == "remote":
            choice = Choice(False, "mode")
        else:
            choice = await self._conditional(prompt_tokens, peek, avoid, observed_rate, prompt)
        self.metrics.disagg_decisions.labels(choice.decision).inc()
        return choice

    async def _conditional(self, prompt_tokens: int, peek, avoid: set[str], observed_rate: float | None,
                           prompt: list[int] | None = None) -> Choice:
        try:
            decode = await peek()
        except (Unavailable, ResourceExhausted):  # the decode leg says why, after the usual waits
            return Choice(False, "no_decode_worker")
        picker = self.picker
        dload = dataclasses.replace(decode.load, running_requests=picker.running(decode), queued_tokens=picker.queued_tokens(decode))
        cached = getattr(picker, "cached_tokens", None) if prompt else None  # the prefix each side holds
        d_cached = cached(decode, prompt) if cached else 0
        try:
            prefill = await picker.peek_prefill(avoid, prompt) if prompt else await picker.peek_prefill(avoid)
        except Unavailable:
            prefill = None
        if prefill is None:
            choice = decide(prompt_tokens, dload, None, self.policy, decode_cached=d_cached)
        else:
            pload = dataclasses.replace(prefill.load, queued_tokens=picker.queued_tokens(prefill))
            transfer = self.transfers.seconds(prefill.worker_id, decode, prompt_tokens)
            choice = decide(prompt_tokens, dload, pload, self.policy, transfer, observed_rate,
                            decode_cached=d_cached, prefill_cached=cached(prefill, prompt) if cached else 0)
        return dataclasses.replace(choice, decode=decode) if choice.local else choice
