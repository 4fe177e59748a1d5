"""A latency profile: what the simulator knows about one model on one kind of machine.

A profile names its machine (CPU model, flags and cores, or the GPU), holds the model's shape (for KV
bytes per token and memory), one fitted `StepModel` per engine configuration (CPU: threads per
worker and weight format; GPU: tensor-parallel degree), the KV transfer time per transport
(fixed cost + bytes / bandwidth), the serving costs outside the engine (router, RPC, token
streaming) and the memory each instance gives its KV cache.

Two sources: `distserve profile` measures this machine and writes the JSON form (`Profile.to_dict`,
`kind: distserve-profile`); `load_profile` also reads the DistServe authors' fitted A100 coefficients
(latency-coefficients-*.json, in milliseconds, keyed model -> TP degree) as a GPU profile.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from distserve.planner.latency import StepModel

KIND = "distserve-profile"
VERSION = 1


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The shape of a model, as far as memory and KV transfer need it."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    max_model_len: int
    num_params: int  # parameters (weights' memory)
    dtype_bytes: int  # bytes per value of weights and KV as served (fp32: 4, fp16: 2)

    def kv_bytes_per_token(self, kv_dtype: str = "auto") -> float:
        """KV cache bytes per token (int8: one byte per value plus a 16th of a 4-byte scale per block row)."""
        values = self.num_layers * 2 * self.num_kv_heads * self.head_dim
        if kv_dtype == "int8":
            return values * (1 + 4 / (16 * self.head_dim))
        return values * self.dtype_bytes

    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes


# Public architecture facts of the models the reference coefficients cover (OPT, fp16).
OPT = {
    "facebook/opt-13b": ModelInfo("facebook/opt-13b", 40, 5120, 40, 40, 128, 20480, 50272, 2048, 12_853_000_000, 2),
    "facebook/opt-66b": ModelInfo("facebook/opt-66b", 64, 9216, 72, 72, 128, 36864, 50272, 2048, 65_700_000_000, 2),
    "facebook/opt-175b": ModelInfo("facebook/opt-175b", 96, 12288, 96, 96, 128, 49152, 50272, 2048, 175_000_000_000, 2),
}


@dataclass(frozen=True, slots=True)
class TransferModel:
    """KV transfer time of one request: fixed_s + bytes / bytes_per_s."""

    fixed_s: float
    bytes_per_s: float

    def seconds(self, nbytes: float) -> float:
        return self.fixed_s + nbytes / self.bytes_per_s


@dataclass(frozen=True, slots=True)
class ServingCosts:
    """Per-request costs outside the engines (seconds)."""

    router_s: float = 0.0  # router's own work before the first leg (validate, state write, pick)
    prefill_call_s: float = 0.0  # the Prefill RPC's overhead: request there and answer back
    decode_call_s: float = 0.0  # the Decode RPC's overhead until the decode worker has the request
    token_s: float = 0.0  # a token's trip from an engine step to the client
    step_s: float = 0.0  # engine overhead per step outside the fitted model (0 where the profile timed whole steps)
    seq_s: float = 0.0  # engine overhead per decoding sequence per step (streaming, detokenizing), likewise
    ctx_s: float = 0.0  # overhead per context token of each decoding sequence per step (a server that resends a request's whole text with every token)


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """One engine configuration's fitted step model."""

    threads: int  # CPU threads per worker (GPU profiles: 1)
    weights: str  # fp32 | int8 (CPU), fp16 (GPU)
    tp: int  # tensor-parallel degree (CPU: 1)
    step: StepModel
    fit: dict = field(default_factory=dict)  # phase -> {mean_rel_err, max_rel_err, points}, and notes

    def to_dict(self) -> dict:
        return {"threads": self.threads, "weights": self.weights, "tp": self.tp, "step": self.step.to_dict(), "fit": self.fit}

    @classmethod
    def from_dict(cls, d: dict) -> EngineProfile:
        return cls(int(d["threads"]), d["weights"], int(d.get("tp", 1)), StepModel.from_dict(d["step"]), d.get("fit", {}))


@dataclass(slots=True)
class Profile:
    model: ModelInfo
    device: str  # "cpu" or "gpu": what one unit of hardware is (a core, a GPU)
    machine: dict  # cpu: model, flags, cores; gpu: name, memory
    engines: list[EngineProfile]
    transfer: dict[str, TransferModel]  # transport -> model; "default" names the one the suite uses
    default_transport: str
    costs: ServingCosts
    memory: dict  # cpu: kv_cache_bytes, block_size; gpu: gpu_memory_bytes, utilization, workspace_bytes, block_size
    source: str = ""  # how it was made
    created: str = ""
    points: dict = field(default_factory=dict)  # the raw measurements (profiles made here)

    # -- lookups ---------------------------------------------------------------------------------
    def engine(self, threads: int = 1, weights: str | None = None, tp: int = 1) -> EngineProfile:
        for e in self.engines:
            if e.threads == threads and e.tp == tp and (weights is None or e.weights == weights):
                return e
        have = ", ".join(f"threads={e.threads}/tp={e.tp}/{e.weights}" for e in self.engines)
        raise KeyError(f"the profile has no engine with threads={threads}, tp={tp}, weights={weights} (it has {have})")

    @property
    def weight_formats(self) -> list[str]:
        return sorted({e.weights for e in self.engines})

    @property
    def thread_counts(self) -> list[int]:
        return sorted({e.threads for e in self.engines})

    @property
    def tp_degrees(self) -> list[int]:
        return sorted({e.tp for e in self.engines})

    @property
    def block_size(self) -> int:
        return int(self.memory.get("block_size", 16))

    def num_blocks(self, tp: int = 1, pp: int = 1, kv_dtype: str = "auto") -> int:
        """KV blocks of one instance: a worker's kv_cache_bytes (CPU), or what a TP x PP group's GPU
        memory holds after the weights (GPU)."""
        per_token = self.model.kv_bytes_per_token(kv_dtype)
        bs = self.block_size
        if self.device == "cpu":
            nbytes = float(self.memory.get("kv_cache_bytes", 1 << 30))
        else:
            gpus = tp * pp
            usable = gpus * self.memory["gpu_memory_bytes"] * self.memory.get("utilization", 0.9)
            nbytes = usable - self.model.weight_bytes() - gpus * self.memory.get("workspace_bytes", 0)
        return max(0, int(nbytes // (per_token * bs)))

    def transfer_s(self, prompt_tokens: int, transport: str | None = None, kv_dtype: str = "auto") -> float:
        t = self.transfer[transport or self.default_transport]
        return t.seconds(prompt_tokens * self.model.kv_bytes_per_token(kv_dtype))

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "kind": KIND, "version": VERSION, "created": self.created, "source": self.source,
            "device": self.device, "machine": self.machine, "model": asdict(self.model),
            "engines": [e.to_dict() for e in self.engines],
            "transfer": {k: asdict(v) for k, v in self.transfer.items()}, "default_transport": self.default_transport,
            "costs": asdict(self.costs), "memory": self.memory, "points": self.points,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        if d.get("kind") != KIND:
            raise ValueError(f"not a distserve profile (kind {d.get('kind')!r})")
        return cls(
            model=ModelInfo(**d["model"]), device=d["device"], machine=d["machine"],
            engines=[EngineProfile.from_dict(e) for e in d["engines"]],
            transfer={k: TransferModel(**v) for k, v in d["transfer"].items()}, default_transport=d["default_transport"],
            costs=ServingCosts(**{k: v for k, v in d["costs"].items() if k in ServingCosts.__dataclass_fields__}), memory=d["memory"], source=d.get("source", ""), created=d.get("created", ""),
            points=d.get("points", {}),
        )

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def with_costs(self, costs: ServingCosts) -> Profile:
        return replace(self, costs=costs)


# -- the reference coefficients (GPU) ---------------------------------------------------------

A100_80GB = {"name": "NVIDIA A100-SXM4-80GB", "memory_bytes": 80 * (1 << 30)}
# Assumed for the reference runs (the source does not state them): vLLM-style memory use of 90% of each
# GPU, ~1 GiB of activations per GPU, 16-token blocks; KV moves between GPUs of one node over NVLink.
GPU_MEMORY = {"gpu_memory_bytes": A100_80GB["memory_bytes"], "utilization": 0.9, "workspace_bytes": 1 << 30, "block_size": 16}
GPU_TRANSFER = {"nvlink": TransferModel(fixed_s=0.5e-3, bytes_per_s=100e9), "network": TransferModel(fixed_s=1e-3, bytes_per_s=12.5e9)}


def from_reference(coefficients: dict, model: str, source: str = "") -> Profile:
    """A GPU profile from the DistServe authors' fitted coefficients: {model: {tp: {prefill,
    decoding_smallbs, decoding_largebs, decoding_large_small_bs_threshold}}}, in milliseconds."""
    if model not in coefficients:
        raise KeyError(f"{source or 'the coefficients'} cover {', '.join(coefficients)}, not {model!r}")
    info = OPT.get(model)
    if info is None:
        raise KeyError(f"no architecture known for {model!r} (known: {', '.join(OPT)})")
    engines = []
    for tp, c in sorted(coefficients[model].items(), key=lambda kv: int(kv[0])):
        ms = 1e-3
        step = StepModel(
            prefill=tuple(ms * x for x in c["prefill"]),
            decode=tuple(ms * x for x in c["decoding_smallbs"]),
            decode_large=tuple(ms * x for x in c["decoding_largebs"]),
            large_batch=int(c["decoding_large_small_bs_threshold"]),
        )
        engines.append(EngineProfile(threads=1, weights="fp16", tp=int(tp), step=step, fit={"note": "fitted by the DistServe authors"}))
    return Profile(model=info, device="gpu", machine={"gpu": A100_80GB["name"], "memory_bytes": A100_80GB["memory_bytes"]},
                   engines=engines, transfer=dict(GPU_TRANSFER), default_transport="nvlink", costs=ServingCosts(),
                   memory=dict(GPU_MEMORY), source=source or "DistServe reference coefficients")


def load_profile(path: str | Path, model: str | None = None) -> Profile:
    """A profile JSON written by `distserve profile`, or a reference coefficient file (then `model`
    picks the model; default: the first in the file)."""
    d = json.loads(Path(path).read_text())
    if d.get("kind") == KIND:
        return Profile.from_dict(d)
    if d and all(isinstance(v, dict) and all(str(k).isdigit() for k in v) for v in d.values()):
        return from_reference(d, model or next(iter(d)), source=str(path))
    raise ValueError(f"{path}: neither a distserve profile nor a reference coefficient file")


# -- this machine ------------------------------------------------------------------------------

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def machine_info() -> dict:
    """CPU model, the SIMD flags that matter for the kernels, cores this process may use."""
    cpu, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu in ("unknown", "", platform.processor()):
                cpu = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": cpu, "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "hostname": platform.node(), "python": platform.python_version(),
    }


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
