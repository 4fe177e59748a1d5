"""Where each worker's cores went during a run, from its Prometheus endpoint (`--scrape URL`). A
router's endpoint can be given too: it has no engine, so only its CPU shows.

Each worker exports the seconds its engine spent in steps by what they carried (decode-only,
prompt-only, mixed: `distserve_engine_busy_seconds_total`), the prompt tokens those steps computed, the
decode tokens it generated and its process' CPU seconds (distserve/metrics.py). `scrape` reads them at
the start and end of a run; `account` turns the two readings into shares of the run's wall time:
`busy` (the engine was stepping), by kind, and `cpu` (every thread of the process, per engine thread,
so what the gRPC and KV threads cost shows as `cpu` above `busy`; None where the endpoint has no
process series). A worker whose counters went back (it restarted) or that answered only once is left out of
the account and named in `errors`.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from distserve.engine.step_times import STEP_KINDS
TIMEOUT_S = 5.0


@dataclass(slots=True)
class Reading:
    """One scrape of one worker."""

    at: float  # monotonic seconds
    role: str = ""
    instance: str = ""
    busy: dict[str, float] = field(default_factory=dict)  # step kind -> seconds
    steps: dict[str, float] = field(default_factory=dict)  # step kind -> steps
    prompt_tokens: float = 0.0
    generated_tokens: float = 0.0
    cpu_s: float | None = None  # None: no process series (not Linux)
    threads: int = 1  # the engine's compute threads


def parse(text: str, at: float) -> Reading:
    r = Reading(at)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "distserve_info":
                r.role, r.instance = labels.get("role", ""), labels.get("instance_id", "")
            elif name == "distserve_engine_busy_seconds_total":
                r.busy[labels["step"]] = value
            elif name == "distserve_engine_steps_total":
                r.steps[labels["step"]] = value
            elif name == "distserve_engine_prompt_tokens_total":
                r.prompt_tokens += value
            elif name == "distserve_generated_tokens_total":
                r.generated_tokens += value
            elif name == "distserve_engine_threads":
                r.threads = max(1, int(value))
            elif name == "process_cpu_seconds_total":
                r.cpu_s = value
    return r


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
        return resp.read().decode()


def normalize(url: str) -> str:
    """host:port or a full URL -> the metrics URL."""
    if "://" not in url:
        url = f"http://{url}"
    return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"


async def scrape(urls: list[str]) -> dict[str, Reading | str]:
    """Each URL's reading, or why it could not be read."""

    async def one(url: str) -> Reading | str:
        try:
            text = await asyncio.to_thread(_fetch, url)
        except (OSError, ValueError) as exc:
            return f"{url}: {exc}"
        return parse(text, time.monotonic())

    results = await asyncio.gather(*(one(u) for u in urls))
    return dict(zip(urls, results))


def account(before: dict[str, Reading | str], after: dict[str, Reading | str], client_cpu: float | None = None) -> dict:
    """Per worker, shares of the wall time between its two readings; `client_cpu`: the load
    generator's own CPU seconds per second of the run, passed through."""
    workers, errors = [], []
    for url, a in before.items():
        b = after.get(url)
        for r in (a, b):
            if isinstance(r, str):
                errors.append(r)
        if not isinstance(a, Reading) or not isinstance(b, Reading):
            continue
        wall = b.at - a.at
        busy = {k: b.busy.get(k, 0.0) - a.busy.get(k, 0.0) for k in STEP_KINDS}
        if a.busy and not b.busy:
            errors.append(f"{url}: its engine series went away (an elastic worker changing role)")
            continue
        if wall <= 0 or any(v < 0 for v in busy.values()) or b.prompt_tokens < a.prompt_tokens:
            errors.append(f"{url}: its counters went back (the worker restarted during the run)")
            continue
        n = b.threads
        cpu = None if a.cpu_s is None or b.cpu_s is None else round((b.cpu_s - a.cpu_s) / wall / n, 4)
        w = {"url": url, "role": b.role, "instance": b.instance, "wall_s": round(wall, 3), "threads": n, "cpu": cpu,
             "generated_tokens": int(b.generated_tokens - a.generated_tokens)}
        if b.busy:  # a worker; a router has no engine, and only its CPU is told
            steps = {k: b.steps.get(k, 0.0) - a.steps.get(k, 0.0) for k in STEP_KINDS}
            w |= {
                "busy": round(sum(busy.values()) / wall, 4),
                "busy_by_step": {k: round(v / wall, 4) for k, v in busy.items()},
                "steps": {k: int(v) for k, v in steps.items()},
                "step_ms": {k: round(1000 * busy[k] / steps[k], 2) if steps[k] else None for k in STEP_KINDS},
                "prompt_tokens": int(b.prompt_tokens - a.prompt_tokens),
            }
        workers.append(w)
    return {"workers": workers, "errors": errors, "client_cpu": None if client_cpu is None else round(client_cpu, 4)}


def table(cores: dict) -> list[str]:
    """Lines for the reports: one per worker."""
    if not cores["workers"] and not cores["errors"]:
        return []
    lines = ["", "where each worker's time went (share of the run's wall time; cpu: all its threads, per engine thread)",
             f"{'worker':30}{'busy':>7}{'decode':>8}{'mixed':>8}{'prefill':>8}{'cpu':>7}   steps (mean ms) d / m / p   prompt tok  gen tok"]
    for w in cores["workers"]:
        cpu = "-" if w["cpu"] is None else f"{w['cpu']:.0%}"
        name = f"{w['role']} {w['instance'] or w['url']}"
        if "busy" not in w:
            lines.append(f"{name[:29]:30}{'-':>7}{'-':>8}{'-':>8}{'-':>8}{cpu:>7}")
            continue
        b = w["busy_by_step"]
        ms = " / ".join(f"{w['steps'][k]} ({w['step_ms'][k]:.0f})" if w["step_ms"][k] is not None else "0" for k in STEP_KINDS)
        lines.append(f"{name[:29]:30}{w['busy']:>7.0%}{b['decode']:>8.0%}{b['mixed']:>8.0%}{b['prefill']:>8.0%}{cpu:>7}   "
                     f"{ms:28}{w['prompt_tokens']:>10}{w['generated_tokens']:>9}")
    if cores.get("client_cpu") is not None:
        lines.append(f"{'load generator (bench)':30}{'':>7}{'':>8}{'':>8}{'':>8}{cores['client_cpu']:>7.0%}")
    lines += [f"scrape error: {e}" for e in cores["errors"]]
    return lines
