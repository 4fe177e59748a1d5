"""A placement: how many workers of each role, with what parallelism, and the suite it simulates as.

Written `1p1d` / `2p3d` (disaggregated: prefill and decode workers), `2c` (colocated workers), or in
the paper's notation `c21d11` (one prefill instance of TP 2 x PP 1, one decode instance of TP 1 x PP 1).
Threads, weight format, chunked prefill and the TP/PP degrees come as separate settings. As in the
router, colocated workers serve only when no prefill worker exists, so a placement is one or the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from distserve.planner.profile import Profile
from distserve.planner.sim_engine import EngineSpec
from distserve.planner.simulator import SuiteSpec
from distserve.runtime import step_tokens


@dataclass(frozen=True, slots=True)
class Placement:
    prefill: int = 0  # prefill workers (instances)
    decode: int = 0  # decode workers
    colocated: int = 0  # colocated workers (used when prefill == 0)
    threads: int = 1  # CPU threads per worker
    weights: str = "int8"  # weight format of every worker (CPU: fp32 | int8)
    chunked: bool = False  # colocated workers: chunked prefill
    tp_prefill: int = 1  # tensor-parallel degree of a prefill (or colocated) instance
    pp_prefill: int = 1  # pipeline stages of a prefill (or colocated) instance
    tp_decode: int = 1
    pp_decode: int = 1

    def __post_init__(self):
        if self.prefill < 0 or self.decode < 0 or self.colocated < 0:
            raise ValueError("worker counts must be >= 0")
        if self.prefill and not self.decode:
            raise ValueError("a placement with prefill workers needs decode workers")
        if not self.prefill and not self.colocated:
            raise ValueError("a placement needs prefill and decode workers, or colocated workers")
        if self.prefill and self.colocated:
            raise ValueError("colocated workers get no requests while prefill workers exist (the router's rule)")
        for name in ("threads", "tp_prefill", "pp_prefill", "tp_decode", "pp_decode"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @property
    def disaggregated(self) -> bool:
        return self.prefill > 0

    @property
    def workers(self) -> int:
        return self.prefill + self.decode if self.disaggregated else self.colocated

    def units(self, device: str = "cpu") -> int:
        """Cores (CPU: workers x threads) or devices (GPU: TP x PP per instance) the placement takes."""
        if device == "cpu":
            return self.workers * self.threads
        if self.disaggregated:
            return self.prefill * self.tp_prefill * self.pp_prefill + self.decode * self.tp_decode * self.pp_decode
        return self.colocated * self.tp_prefill * self.pp_prefill

    def label(self, device: str = "cpu") -> str:
        if device == "cpu":
            shape = f"{self.prefill}P+{self.decode}D" if self.disaggregated else f"{self.colocated}C" + ("-chunked" if self.chunked else "")
            return f"{shape} x{self.threads}t {self.weights}"
        if self.disaggregated:
            return f"{self.prefill}x prefill(tp{self.tp_prefill},pp{self.pp_prefill}) + {self.decode}x decode(tp{self.tp_decode},pp{self.pp_decode})"
        return f"{self.colocated}x colocated(tp{self.tp_prefill},pp{self.pp_prefill})" + (" chunked" if self.chunked else "")

    def up_command(self, model: str) -> str:
        """The `distserve up` command that runs this placement on one machine."""
        if self.disaggregated:
            roles = f"--prefill {self.prefill} --decode {self.decode}"
        else:
            roles = f"--prefill 0 --decode 0 --colocated {self.colocated}"
        extra = " --worker-arg=--chunked-prefill=true" if self.chunked and not self.disaggregated else ""
        return f"distserve up --model {model} {roles} --threads {self.threads} --weights {self.weights}{extra}"

    def compose_command(self) -> str | None:
        """The docker compose scaling of this placement (deploy/docker-compose.yml has prefill and
        decode services; None for colocated placements, which it does not run)."""
        if self.disaggregated:
            return f"docker compose -f deploy/docker-compose.yml up -d --scale prefill={self.prefill} --scale decode={self.decode}"
        return None


_PD = re.compile(r"(\d+)p(\d+)d", re.I)
_C = re.compile(r"(\d+)c", re.I)
_PAPER = re.compile(r"c(\d)(\d)d(\d)(\d)", re.I)


def parse_placement(text: str, **settings) -> Placement:
    """`1p1d`, `2c` or `c21d11`; `settings` (threads, weights, chunked, tp_*/pp_*) fill in the rest
    (the paper form sets the TP/PP degrees itself)."""
    t = text.strip().replace("+", "").replace(" ", "")
    settings = {k: v for k, v in settings.items() if v is not None}
    if m := _PD.fullmatch(t):
        return Placement(prefill=int(m[1]), decode=int(m[2]), **settings)
    if m := _C.fullmatch(t):
        return Placement(colocated=int(m[1]), **settings)
    if m := _PAPER.fullmatch(t):
        settings |= dict(tp_prefill=int(m[1]), pp_prefill=int(m[2]), tp_decode=int(m[3]), pp_decode=int(m[4]))
        return Placement(prefill=1, decode=1, **settings)
    raise ValueError(f"placement {text!r}: use NpMd (e.g. 1p1d), Nc (e.g. 2c) or the paper's c<tp><pp>d<tp><pp> (e.g. c21d11)")


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The engine settings a simulated worker runs with (WorkerSettings' defaults)."""

    max_num_batched_tokens: int = 0  # 0 = the workers' default by role and device (distserve/runtime.py's step_tokens)
    max_num_seqs: int = 64
    kv_dtype: str = "auto"
    tpot_target_s: float = 0.06  # --tpot-slo-ms: chunked steps with running decodes keep within it (0 = no cap)


def engine_spec(profile: Profile, placement: Placement, role: str, limits: EngineLimits = EngineLimits()) -> EngineSpec:
    if role == "decode":
        tp, pp = placement.tp_decode, placement.pp_decode
    else:
        tp, pp = placement.tp_prefill, placement.pp_prefill
    weights = None if profile.device == "gpu" else placement.weights
    eng = profile.engine(threads=placement.threads if profile.device == "cpu" else 1, weights=weights, tp=tp)
    blocks = profile.num_blocks(tp, pp, limits.kv_dtype)
    if blocks <= 0:
        raise ValueError(f"{profile.model.name} does not fit on tp={tp} x pp={pp} (no memory left for KV)")
    budget = limits.max_num_batched_tokens or step_tokens(role, profile.device)
    return EngineSpec(eng.step.with_pp(pp), blocks, profile.block_size, budget, limits.max_num_seqs,
                      chunked_prefill=placement.chunked and role == "colocated", tpot_target_s=limits.tpot_target_s)


def suite_spec(profile: Profile, placement: Placement, limits: EngineLimits = EngineLimits(), transport: str | None = None) -> SuiteSpec:
    """The simulated suite of `placement` with `profile`'s latency, memory, transfer and serving costs."""
    transport = transport or profile.default_transport

    def transfer(tokens: int) -> float:
        return profile.transfer_s(tokens, transport, limits.kv_dtype)

    if placement.disaggregated:
        p = engine_spec(profile, placement, "prefill", limits)
        d = engine_spec(profile, placement, "decode", limits)
        return SuiteSpec(prefill=(p,) * placement.prefill, decode=(d,) * placement.decode, transfer_s=transfer, costs=profile.costs)
    c = engine_spec(profile, placement, "colocated", limits)
    return SuiteSpec(colocated=(c,) * placement.colocated, transfer_s=transfer, costs=profile.costs)


def with_counts(p: Placement, prefill: int, decode: int) -> Placement:
    return replace(p, prefill=prefill, decode=decode, colocated=0)
