"""Per-request timelines and the arithmetic on them: TTFT, TPOT, percentiles, SLO attainment.

Every time is in seconds from the start of the run (one monotonic clock on the load generator).
A request that failed counts in every denominator and meets no SLO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PHASES = ("router_s", "prefill_queue_s", "prefill_compute_s", "kv_transfer_s", "decode_queue_s", "decode_s")


@dataclass(slots=True)
class RequestResult:
    index: int  # position in the request list
    prompt_len: int  # prompt tokens sent
    output_len: int  # tokens asked for
    send_s: float  # when the request left the load generator
    token_times: list[float] = field(default_factory=list)  # arrival of every token (a chunk's time for each of its tokens)
    end_s: float = 0.0  # when the response stream ended
    completion_tokens: int = 0  # tokens really generated (the server's count where it gives one)
    finish_reason: str | None = None
    error: str = ""  # empty when the request succeeded
    phases: dict[str, float] | None = None  # distserve's per-phase timings (router_s, prefill_queue_s, ...)
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache (where it says)
    output_ids: list[int] = field(default_factory=list)  # the answer's token ids, for the next turn's history (not saved)
    ignore_eos: bool = True  # asked for exactly output_len tokens (False: the answer may end at the model's end of turn)
    disagg: str = ""  # where distserve prefilled it: "local" (on its decode worker) or "remote"; "" where not said
    disagg_reason: str = ""  # why (services/router/disagg.py's REASONS), with the router's two estimates of the TTFT
    local_estimate_s: float = 0.0
    remote_estimate_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.send_s if self.token_times else math.inf

    @property
    def tpot(self) -> float:
        """(last token - first token) / (n - 1); 0 for a one-token answer."""
        n = self.completion_tokens or len(self.token_times)
        if not self.token_times:
            return math.inf
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else 0.0

    @property
    def e2e(self) -> float:
        return self.end_s - self.send_s if self.ok else math.inf

    def to_dict(self) -> dict:
        return {
            "index": self.index, "prompt_len": self.prompt_len, "output_len": self.output_len,
            "send_s": self.send_s, "end_s": self.end_s, "token_times": self.token_times,
            "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason,
            "error": self.error, "phases": self.phases, "cached_tokens": self.cached_tokens,
            "ignore_eos": self.ignore_eos, "disagg": self.disagg, "disagg_reason": self.disagg_reason,
            "local_estimate_s": self.local_estimate_s, "remote_estimate_s": self.remote_estimate_s,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RequestResult:
        return cls(d["index"], d["prompt_len"], d["output_len"], d["send_s"], list(d["token_times"]), d["end_s"],
                   d["completion_tokens"], d.get("finish_reason"), d.get("error", ""), d.get("phases"), d.get("cached_tokens", 0),
                   ignore_eos=d.get("ignore_eos", True), disagg=d.get("disagg", ""),
                   disagg_reason=d.get("disagg_reason", ""), local_estimate_s=d.get("local_estimate_s", 0.0),
                   remote_estimate_s=d.get("remote_estimate_s", 0.0))


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def meets(r: RequestResult, slo_ttft: float, slo_tpot: float) -> bool:
    return r.ok and r.ttft <= slo_ttft and r.tpot <= slo_tpot


def attainment(results: list[RequestResult], slo_ttft: float, slo_tpot: float) -> float:
    """Share of requests meeting both SLOs (failed requests included, meeting none)."""
    if not results:
        return 0.0
    return sum(meets(r, slo_ttft, slo_tpot) for r in results) / len(results)


def required_scale(r: RequestResult, slo_ttft: float, slo_tpot: float) -> float:
    """The smallest factor on both SLOs under which this request meets them."""
    if not r.ok:
        return math.inf
    return max(r.ttft / slo_ttft, r.tpot / slo_tpot)


def slo_scale(results: list[RequestResult], slo_ttft: float, slo_tpot: float, target: float = 0.9) -> float:
    """Smallest factor f such that attainment at (f * slo_ttft, f * slo_tpot) reaches `target`.

    The schedule does not depend on the SLO, so one run answers this exactly: the request-wise
    factors' ceil(target * n)-th smallest value (inf when too many requests failed).
    """
    if not results:
        return math.inf
    scales = sorted(required_scale(r, slo_ttft, slo_tpot) for r in results)
    k = math.ceil(target * len(scales) - 1e-9)
    return scales[max(k, 1) - 1]


def summarize(results: list[RequestResult], slo_ttft: float, slo_tpot: float, duration_s: float | None = None) -> dict:
    """The figures of one run: latency percentiles, throughput, attainment, mean phase breakdown (None where undefined)."""
    ok = [r for r in results if r.ok]
    if duration_s is None:
        start = min((r.send_s for r in results), default=0.0)
        duration_s = max((r.end_s for r in ok), default=start) - start
    out: dict = {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "throughput_rps": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_tok_s": sum(r.completion_tokens for r in ok) / duration_s if duration_s > 0 else 0.0,
        "attainment": attainment(results, slo_ttft, slo_tpot),
        "ttft_attainment": sum(r.ok and r.ttft <= slo_ttft for r in results) / max(1, len(results)),
        "tpot_attainment": sum(r.ok and r.tpot <= slo_tpot for r in results) / max(1, len(results)),
        "slo_scale": slo_scale(results, slo_ttft, slo_tpot),
        "short_outputs": sum(r.ok and r.ignore_eos and r.completion_tokens < r.output_len for r in results),
        "prompt_tokens": sum(r.prompt_len for r in ok),
        # share of prompt tokens the server took from its prefix cache (0 where it does not say)
        "cache_hit_rate": sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_len for r in ok)),
    }
    for name in ("ttft", "tpot", "e2e"):
        vals = [getattr(r, name) for r in ok]
        out[name] = {"mean": sum(vals) / len(vals) if vals else math.nan,
                     **{f"p{q}": percentile(vals, q) for q in (50, 90, 99)}}
    with_phases = [r.phases for r in ok if r.phases]
    if with_phases:
        out["phases_mean"] = {p: sum(ph.get(p, 0.0) for ph in with_phases) / len(with_phases) for p in PHASES}
        out["phases_p90"] = {p: percentile([ph.get(p, 0.0) for ph in with_phases], 90) for p in PHASES}
    decisions = [r.disagg for r in ok if r.disagg]
    if decisions:  # conditional disaggregation: how many were prefilled where
        out["disagg_decisions"] = {d: decisions.count(d) for d in sorted(set(decisions))}
        why = [f"{r.disagg}:{r.disagg_reason}" for r in ok if r.disagg and r.disagg_reason]
        if why:
            out["disagg_reasons"] = {w: why.count(w) for w in sorted(set(why))}
    errors = sorted({r.error for r in results if r.error})
    if errors:
        out["errors"] = errors[:5]
    return _json_safe(out)


def _json_safe(x):
    """inf/nan (no answer: every request failed) become None, so the JSON is standard."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
