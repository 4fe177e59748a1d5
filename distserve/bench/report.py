"""What the serving benchmarks show a person: a progress bar, terminal tables, PNG plots.

Plots need matplotlib (`pip install 'distserve[bench]'`); everything else is the standard library.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from distserve.bench import cores
from distserve.bench.metrics import PHASES


class Progress:
    """`what [#####.....] 12/30 4.1s` on stderr, redrawn as requests finish on a terminal; a final line on exit."""

    WIDTH = 24

    def __init__(self, total: int, what: str, enabled: bool = True, stream=None):
        self.total, self.what, self.enabled = total, what, enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.suffix = ""
        self.t0 = time.monotonic()
        self._drawn = 0.0

    def update(self, _result=None) -> None:
        self.done += 1
        now = time.monotonic()
        live = getattr(self.stream, "isatty", lambda: False)()  # into a file or pipe: only the final line
        if live and (now - self._drawn >= 0.2 or self.done == self.total):
            self._drawn = now
            self._draw("\r")

    def _draw(self, prefix: str, end: str = "") -> None:
        if not self.enabled:
            return
        filled = self.WIDTH * self.done // max(1, self.total)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        extra = f"  {self.suffix}" if self.suffix else ""
        self.stream.write(f"{prefix}{self.what} [{bar}] {self.done}/{self.total} {time.monotonic() - self.t0:.1f}s{extra}{end}")
        self.stream.flush()

    def __enter__(self):
        if getattr(self.stream, "isatty", lambda: False)():
            self._draw("")
        return self

    def __exit__(self, *exc):
        self._draw("\r", "\n")


def _ms(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x * 1000:.0f}"


def _s(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"


def serve_table(run: dict) -> str:
    s = run["summary"]
    cfg = run["config"]
    arrival = f"closed loop, {cfg['concurrency']} clients" if cfg["arrival"] == "closed" else f"{cfg['arrival']} at {cfg['rate']:g} req/s"
    lines = [
        f"{run['target']}  workload {cfg['workload']}  {s['requests']} requests ({s['failed']} failed), {arrival}  commit {run['commit']}",
        f"throughput {s['throughput_rps']:.3f} req/s, {s['output_tok_s']:.1f} output tok/s over {s['duration_s']:.1f}s",
        f"SLO attainment {s['attainment']:.1%} (TTFT <= {cfg['slo_ttft']:g}s: {s['ttft_attainment']:.1%}, "
        f"TPOT <= {cfg['slo_tpot'] * 1000:g}ms: {s['tpot_attainment']:.1%}); SLO scale for 90%: {_s(s['slo_scale'])}x",
        f"prefix cache: {s.get('cache_hit_rate', 0.0):.1%} of {s.get('prompt_tokens', 0)} prompt tokens cached"
        + ("; prefilled " + ", ".join(f"{k} {v}" for k, v in s["disagg_decisions"].items()) if s.get("disagg_decisions") else ""),
        "",
        f"{'':8}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}",
    ]
    for name, fmt, unit in (("ttft", _s, "s"), ("tpot", _ms, "ms"), ("e2e", _s, "s")):
        d = s[name]
        lines.append(f"{name + ' ' + unit:8}" + "".join(f"{fmt(d[k]):>9}" for k in ("mean", "p50", "p90", "p99")))
    if "phases_mean" in s:
        lines += ["", f"{'phase (s)':18}{'mean':>9}{'p90':>9}"]
        for p, v in s["phases_mean"].items():
            lines.append(f"{p:18}{v:>9.3f}{s['phases_p90'][p]:>9.3f}")
    if s.get("cores"):
        lines += cores.table(s["cores"])
    if s.get("short_outputs"):
        lines.append(f"note: {s['short_outputs']} requests ended before their output length (target ignored ignore_eos?)")
    for e in s.get("errors", []):
        lines.append(f"error: {e}")
    return "\n".join(lines)


def goodput_table(doc: dict) -> str:
    lines = [
        f"workload {doc['workload']}  SLO TTFT <= {doc['slo_ttft']:g}s, TPOT <= {doc['slo_tpot'] * 1000:g}ms  "
        f"target attainment {doc['target_attainment']:.0%}  {doc['num_requests']} requests/point  commit {doc['commit']}",
        "",
        f"{'system':34}{'goodput req/s':>14}{'SLO scale':>11}{'@ req/s':>9}   points (rate: attainment)",
    ]
    for s in doc["systems"]:
        gp = f"{s['goodput_rps']:.3f}" + ("" if s["bounded"] else "+")
        scale = s["scale"]
        factor = "-" if scale["factor"] is None else f"{scale['factor']:.2f}x"
        pts = ", ".join(f"{p['rate']:g}: {p['attainment']:.0%}" for p in sorted(s["points"], key=lambda p: p["rate"]))
        lines.append(f"{s['label'][:33]:34}{gp:>14}{factor:>11}{scale['rate']:>9g}   {pts}")
    if len(doc["systems"]) > 1:
        first = doc["systems"][0]
        for s in doc["systems"][1:]:
            if s["goodput_rps"] > 0:
                lines.append(f"{first['label']} / {s['label']}: {first['goodput_rps'] / s['goodput_rps']:.2f}x goodput")
    for s in doc["systems"]:
        for a in s.get("also_slo", []):
            pts = ", ".join(f"{p['rate']:g}: {p['attainment']:.0%}" for p in sorted(a["points"], key=lambda p: p["rate"]))
            gp = f"{a['goodput_rps']:.3f}" + ("" if a["bounded"] else "+")
            lines.append(f"{s['label'][:33]:34}{gp:>14} at TTFT <= {a['slo_ttft']:g}s, TPOT <= {a['slo_tpot'] * 1000:g}ms   {pts}")
    lines.append("('+': no failing rate found above it, so goodput is at least this)")
    lines += ["", "at the fixed rate: latency and mean server-side phases (s)",
              f"{'system':34}{'req/s':>6}{'TTFT p90':>9}{'TPOT p90':>9}" + "".join(f"{h:>10}" for h in PHASE_HEADS)]
    for s in doc["systems"]:
        m = s["scale"]["summary"]
        ph = m.get("phases_mean") or {}
        lines.append(f"{s['label'][:33]:34}{s['scale']['rate']:>6g}{_s(m['ttft']['p90']):>9}{_ms(m['tpot']['p90']) + 'ms':>9}"
                     + "".join(f"{ph[p]:>10.3f}" if p in ph else f"{'-':>10}" for p in PHASES))
    for s in doc["systems"]:
        if s["scale"]["summary"].get("cores"):
            lines += ["", f"{s['label']} at {s['scale']['rate']:g} req/s:"] + cores.table(s["scale"]["summary"]["cores"])[1:]
    return "\n".join(lines)


PHASE_HEADS = ("router", "pf queue", "prefill", "kv xfer", "dec queue", "decode")


def plot_goodput(doc: dict, folder: Path, prefix: str) -> list[Path]:
    """attainment vs rate (all systems), attainment vs SLO scale, TTFT/TPOT CDFs at the fixed rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install 'distserve[bench]'") from None
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{doc['workload']}: SLO TTFT {doc['slo_ttft']:g}s, TPOT {doc['slo_tpot'] * 1000:g}ms"
    paths = []

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for s in doc["systems"]:
        pts = sorted((p["rate"], p["attainment"]) for p in s["points"])
        a1.plot([r for r, _ in pts], [a * 100 for _, a in pts], marker="o", label=f"{s['label']} ({s['goodput_rps']:.2f} req/s)")
        curve = s["scale"]["curve"]
        a2.plot([f for f, _ in curve], [a * 100 for _, a in curve], label=f"{s['label']} @ {s['scale']['rate']:g} req/s")
    for ax, xl in ((a1, "rate (req/s)"), (a2, "SLO scale")):
        ax.axhline(90, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths.append(folder / f"{prefix}_attainment.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for key, ax, slo, unit in (("ttft", axes[0], doc["slo_ttft"], 1.0), ("tpot", axes[1], doc["slo_tpot"], 1000.0)):
        for s in doc["systems"]:
            xs = sorted(v * unit for v in s["scale"][key])
            if xs:
                ax.step(xs, [(i + 1) / len(xs) * 100 for i in range(len(xs))], where="post", label=f"{s['label']} @ {s['scale']['rate']:g} req/s")
        ax.axvline(slo * unit, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("TTFT (s)" if key == "ttft" else "TPOT (ms)")
        ax.set_ylabel("requests (%)")
        ax.set_ylim(0, 102)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{doc['workload']}: latency CDFs (dashed: SLO)", fontsize=10)
    fig.tight_layout()
    paths.append(folder / f"{prefix}_cdf.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths
