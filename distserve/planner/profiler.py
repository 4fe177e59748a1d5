"""`distserve profile`: measure the engine on this machine and fit the latency model.

Per engine configuration (threads per worker x weight format), in this process, with distserve's own
engine (as `distserve bench engine` does):

1. prefill: `LLMEngine(mode="prefill")` steps over a grid of prompt lengths x prompts per step (and a
   few batches of mixed lengths), in `reps` rounds over the whole grid; each point is the fastest
   round's wall time of `step()` (schedule, forward, sampling, bookkeeping: what a worker's engine
   thread spends), with the prompts freed after. Rounds and the minimum keep a burst of other work on
   a shared host from spoiling a point.
2. decode: B sequences at context C are placed in a decode engine by importing KV (`reserve` +
   `admit_prefilled`, as a decode worker does; no prefill needed), then the median of a few `step()`s.
3. mixed: the same decode batch in a chunked-prefill engine plus one prompt chunk in the same step;
   these points are not fitted: they check the composed model (latency.StepModel.step_s).
4. KV transfer, per transport: the engine's own export (paged cache -> contiguous) and load (the
   reverse) for a few prompt lengths, plus the wire: one memory copy (shm) or a loopback socket
   (grpc), fitted as fixed + bytes / bandwidth, plus a fixed per-transfer RPC cost.

Then `latency.fit_prefill` / `fit_decode` fit each configuration, the fit errors are kept per phase,
and the whole is written as a `Profile` (JSON) naming this machine.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from distserve.planner.latency import (DecodePoint, MixedPoint, PrefillPoint, fit_decode, fit_prefill, mixed_error,
                                       step_model)
from distserve.planner.profile import EngineProfile, ModelInfo, Profile, ServingCosts, TransferModel, machine_info, now_utc

log = logging.getLogger(__name__)

# Serving costs outside the engines on one host, estimated (not measured by `distserve profile`): the
# router's own work is ~0.3 ms (docs/http-api.md's breakdown), a loopback gRPC unary call ~1 ms, a
# streamed token's hop through the router ~0.3 ms. Phase 2 of issue 14 calibrates them on the suite.
CPU_COSTS = ServingCosts(router_s=0.0005, prefill_call_s=0.0015, decode_call_s=0.0015, token_s=0.0003)
KV_RPC_S = 0.002  # per transfer: Connect/pull/release round trips of the KV protocol (estimate)


@dataclass(frozen=True, slots=True)
class Grid:
    prefill_lengths: tuple[int, ...]
    prefill_counts: tuple[int, ...]
    prefill_max_tokens: int  # prompts per point are limited so a step holds at most this many tokens
    mixed_batches: int  # extra prefill points of random mixed lengths
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_max_tokens: int  # B x C at most (the KV a worker's cache holds)
    mixed: tuple[tuple[int, int, int], ...]  # (decode batch, context, prompt chunk)
    reps: int  # timed repetitions per prefill point
    steps: int  # timed decode steps per point
    kv_lengths: tuple[int, ...]


FULL = Grid(
    prefill_lengths=(16, 64, 256, 512, 1024, 2048), prefill_counts=(1, 2, 4, 8), prefill_max_tokens=2048,
    mixed_batches=4, decode_batches=(1, 2, 4, 8, 16, 32, 64), decode_contexts=(16, 128, 512, 1024, 2048),
    decode_max_tokens=16384, mixed=((4, 256, 128), (8, 256, 512), (16, 128, 256), (16, 512, 64), (32, 256, 256), (2, 1024, 1024)),
    reps=3, steps=4, kv_lengths=(128, 512, 2048),
)
QUICK = Grid(
    prefill_lengths=(32, 128, 512), prefill_counts=(1, 4), prefill_max_tokens=2048, mixed_batches=2,
    decode_batches=(1, 8, 32), decode_contexts=(64, 512), decode_max_tokens=16384,
    mixed=((8, 256, 128), (16, 128, 256)), reps=1, steps=2, kv_lengths=(128, 512),
)


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab - 10) for _ in range(n)]


def _sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA kernels run asynchronously; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(eng) -> float:
    _sync(eng.loaded.device)
    t = time.perf_counter()
    eng.step()
    _sync(eng.loaded.device)
    return time.perf_counter() - t


class EngineProfiler:
    """Measures one engine configuration of a loaded model."""

    def __init__(self, lm, weights: str, grid: Grid, seed: int = 0):
        self.lm, self.weights, self.grid = lm, weights, grid
        self.rng = random.Random(f"profile:{seed}")
        self.vocab = lm.model.config.vocab_size
        self.max_len = lm.max_model_len
        self._n = 0

    def _engine(self, **kw):
        from distserve.engine.engine import EngineConfig, LLMEngine

        return LLMEngine(self.lm, EngineConfig(weights=self.weights, share_weights="auto", **kw))

    def _rid(self) -> str:
        self._n += 1
        return f"p{self._n}"

    # -- prefill ---------------------------------------------------------------------------------
    def prefill_batches(self) -> list[tuple[int, ...]]:
        g = self.grid
        batches = []
        for length in g.prefill_lengths:
            if length >= self.max_len:
                continue
            for n in g.prefill_counts:
                # a full budget of equal prompts only once per count: they cost the most to measure
                if n * length < g.prefill_max_tokens or (n * length == g.prefill_max_tokens and n <= 2):
                    batches.append((length,) * n)
        lo, hi = min(g.prefill_lengths), min(max(g.prefill_lengths), self.max_len - 1)
        for _ in range(g.mixed_batches):
            lens: list[int] = []
            while len(lens) < 2 or (len(lens) < 6 and self.rng.random() < 0.6):
                lens.append(int(round(lo * (hi / lo) ** self.rng.random())))
            while sum(lens) > g.prefill_max_tokens:
                lens.pop()
            if len(lens) >= 2:
                batches.append(tuple(lens))
        return batches

    def prefill(self) -> list[PrefillPoint]:
        from distserve.engine.sampling import SamplingParams

        g = self.grid
        eng = self._engine(mode="prefill", max_num_batched_tokens=max(g.prefill_max_tokens, max(g.prefill_lengths)),
                           max_num_seqs=64, kv_cache_bytes=self._kv_bytes(2 * g.prefill_max_tokens))
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

        def run(lengths: tuple[int, ...]) -> float:
            rids = []
            for n in lengths:
                rid = self._rid()
                eng.add_request(rid, _ids(self.rng, n, self.vocab), params)
                rids.append(rid)
            dt = _timed_step(eng)
            for rid in rids:
                eng.free(rid)
            return dt

        run((min(64, self.max_len - 1),) * 2)  # warm-up
        batches = self.prefill_batches()
        times: list[list[float]] = [[] for _ in batches]
        for _ in range(g.reps):  # rounds over the grid: a burst of other work spoils one round, not a point
            for i, lengths in enumerate(batches):
                times[i].append(run(lengths))
        # the fastest round: the engine's own time, which another process on the host only ever adds to
        return [PrefillPoint(lengths, min(ts)) for lengths, ts in zip(batches, times)]

    # -- decode and mixed --------------------------------------------------------------------------
    def _kv_bytes(self, tokens: int) -> int:
        from distserve.engine.model_runner import ModelRunner

        layout = ModelRunner.layout_of(self.lm.model, 16, torch.float32 if self.lm.dtype == torch.float32 else self.lm.dtype)
        return (tokens + 64 * 16) * layout.bytes_per_token

    def _fill(self, eng, batch: int, context: int, max_tokens: int) -> list[str]:
        """`batch` running sequences whose `context`-token prompts' KV was imported (zeros)."""
        from distserve.engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        shape = eng.layout.export_shape(context)
        kv = torch.zeros(shape, dtype=eng.cache.data.dtype, device=eng.cache.data.device)
        rids = []
        for _ in range(batch):
            rid = self._rid()
            eng.reserve(rid, _ids(self.rng, context, self.vocab), params)
            eng.admit_prefilled(rid, self.rng.randrange(10, self.vocab - 10), None, kv)
            rids.append(rid)
        return rids

    def decode_points(self) -> tuple[list[DecodePoint], list[MixedPoint]]:
        from distserve.engine.sampling import SamplingParams

        g = self.grid
        cells = [(b, c) for b in g.decode_batches for c in g.decode_contexts
                 if b * c <= g.decode_max_tokens and c + g.steps + 8 < self.max_len]
        most = max([b * (c + g.steps + 8) for b, c in cells] + [b * (c + 8) + ln for b, c, ln in g.mixed])
        eng = self._engine(mode="colocated", chunked_prefill=True, max_num_seqs=max(g.decode_batches + tuple(m[0] for m in g.mixed)) + 1,
                           max_num_batched_tokens=4096, kv_cache_bytes=self._kv_bytes(most + 4096))
        rids = self._fill(eng, 2, 32, 8)  # warm-up
        for _ in range(3):
            eng.step()
        for r in rids:
            eng.abort(r)
        points = []
        for b, c in cells:
            rids = self._fill(eng, b, c, g.steps + 4)
            eng.step()  # the first step after an import pays for the new sequences' bookkeeping
            times = [_timed_step(eng) for _ in range(g.steps)]
            # each timed step decoded b tokens; contexts grew by one per step
            points.append(DecodePoint(b, b * (c + 2 + g.steps // 2), statistics.median(times)))
            for r in rids:
                eng.abort(r)
        mixed = []
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for b, c, length in g.mixed:
            if c + 8 >= self.max_len or length >= self.max_len:
                continue
            rids = self._fill(eng, b, c, 8)
            eng.step()
            ctx = b * (c + 2)
            rid = self._rid()
            eng.add_request(rid, _ids(self.rng, length, self.vocab), params)
            dt = _timed_step(eng)
            mixed.append(MixedPoint(((0, length),), b, ctx, dt))
            for r in rids + [rid]:
                eng.abort(r)
        return points, mixed

    # -- KV transfer -------------------------------------------------------------------------------
    def kv_copies(self) -> list[tuple[int, float, float, float]]:
        """(bytes, export_s, load_s, memcpy_s) per prompt length."""
        from distserve.engine.sampling import SamplingParams

        g = self.grid
        lengths = [n for n in g.kv_lengths if n < self.max_len]
        src = self._engine(mode="prefill", max_num_batched_tokens=max(lengths), kv_cache_bytes=self._kv_bytes(max(lengths)))
        dst = self._engine(mode="decode", kv_cache_bytes=self._kv_bytes(max(lengths) + 16))
        out = []
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for n in lengths:
            rid = self._rid()
            src.add_request(rid, _ids(self.rng, n, self.vocab), params)
            src.step()
            exp, load, copy = [], [], []
            dev = self.lm.device
            for _ in range(3):
                _sync(dev)
                t = time.perf_counter()
                kv = src.export_kv(rid)
                _sync(dev)
                exp.append(time.perf_counter() - t)
                t = time.perf_counter()
                kv.clone()
                _sync(dev)
                copy.append(time.perf_counter() - t)
                drid = self._rid()
                dst.reserve(drid, _ids(self.rng, n, self.vocab), params)
                seq = dst._seqs[drid]
                _sync(dev)
                t = time.perf_counter()
                dst.cache.load(seq.block_table, kv)
                _sync(dev)
                load.append(time.perf_counter() - t)
                dst.abort(drid)
            src.free(rid)
            out.append((kv.numel() * kv.element_size(), statistics.median(exp), statistics.median(load), statistics.median(copy)))
        return out


def fit_engine(pre: list[PrefillPoint], dec: list[DecodePoint], mixed: list[MixedPoint]) -> tuple:
    """The step model of one configuration and its fit errors per phase (mixed: not fitted, a check)."""
    pf, df = fit_prefill(pre), fit_decode(dec)
    sm = step_model(pf, df)
    fit = {"prefill": pf.error.to_dict(), "decode": df.error.to_dict(), "mixed": mixed_error(sm, mixed).to_dict()}
    for name, f in (("prefill", pf), ("decode", df)):
        if f.note:
            fit[f"{name}_note"] = f.note
    return sm, fit


def points_of(raw: dict) -> tuple[list[PrefillPoint], list[DecodePoint], list[MixedPoint]]:
    """The measured points of one configuration from a profile's `points` (its JSON form)."""
    pre = [PrefillPoint(tuple(lens), s) for lens, s in raw["prefill"]]
    dec = [DecodePoint(b, c, s) for b, c, s in raw["decode"]]
    mixed = [MixedPoint(tuple(tuple(c) for c in ch), b, c, s) for ch, b, c, s in raw.get("mixed", [])]
    return pre, dec, mixed


def refit(prof: Profile) -> Profile:
    """Every configuration fitted again from the raw points the profile holds (no measuring)."""
    engines = []
    for e in prof.engines:
        raw = prof.points.get(f"threads={e.threads},weights={e.weights}")
        if raw is None:
            engines.append(e)
            continue
        sm, fit = fit_engine(*points_of(raw))
        engines.append(EngineProfile(e.threads, e.weights, e.tp, sm, fit))
    prof.engines = engines
    return prof


def socket_bandwidth(nbytes: int = 16 << 20, reps: int = 3) -> float:
    """Bytes/s through a loopback socket pair, one thread sending, this one receiving (as gRPC's chunks)."""
    a, b = socket.socketpair()
    payload = bytes(nbytes)
    buf = bytearray(nbytes)
    times = []
    try:
        for _ in range(reps + 1):
            sender = threading.Thread(target=a.sendall, args=(payload,))
            t = time.perf_counter()
            sender.start()
            view, got = memoryview(buf), 0
            while got < nbytes:
                got += b.recv_into(view[got:])
            sender.join()
            times.append(time.perf_counter() - t)
    finally:
        a.close()
        b.close()
    return nbytes / statistics.median(times[1:])


def fit_transfer(copies: list[tuple[int, float, float, float]], wire_bytes_per_s: float | None) -> TransferModel:
    """fixed + bytes / bandwidth through the measured (bytes, seconds) of export + wire + load."""
    import numpy as np

    xs = np.array([[1.0, float(n)] for n, *_ in copies])
    ys = np.array([e + ld + (m if wire_bytes_per_s is None else n / wire_bytes_per_s) for n, e, ld, m in copies])
    (fixed, per_byte), *_ = np.linalg.lstsq(xs, ys, rcond=None)
    per_byte = max(per_byte, 1e-12)
    return TransferModel(fixed_s=max(0.0, float(fixed)) + KV_RPC_S, bytes_per_s=1.0 / float(per_byte))


def model_info(lm) -> ModelInfo:
    cfg = lm.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelInfo(
        name=lm.name, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, ffn_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        max_model_len=lm.max_model_len, num_params=sum(p.numel() for p in lm.model.parameters()),
        dtype_bytes=torch.empty((), dtype=lm.dtype).element_size(),
    )


def profile(model: str = "smollm2-135m", threads: list[int] | None = None, weights: list[str] | None = None,
            quick: bool = False, seed: int = 0, progress=print, device: str = "cpu", dtype: str = "auto") -> Profile:
    """Measures and fits every (threads, weights) configuration; returns the profile (not yet saved).
    device="cuda[:N]": a GPU profile of one engine (threads 1, weights in the model's `dtype`)."""
    from distserve.engine.models import load_model

    grid = QUICK if quick else FULL
    machine = machine_info()
    machine["loadavg_before"] = os.getloadavg()[0]  # other work on the machine disturbs the figures
    gpu = device != "cpu"
    threads = [1] if gpu else threads or [machine["cores"]]
    weights = ["fp32"] if gpu else weights or ["fp32", "int8"]  # "fp32": linears in the model's dtype
    started = time.monotonic()
    lm = load_model(model, device=device, dtype=dtype if gpu else "auto")
    if gpu:
        props = torch.cuda.get_device_properties(lm.device)
        machine.update(gpu=props.name, memory_bytes=props.total_memory, dtype=str(lm.dtype).removeprefix("torch."))
    info = model_info(lm)
    engines, raw = [], {}
    copies: list = []
    for t in threads:
        torch.set_num_threads(t)
        for w in weights:
            t0 = time.monotonic()
            prof = EngineProfiler(lm, w, grid, seed)
            pre = prof.prefill()
            dec, mixed = prof.decode_points()
            if not copies:
                copies = prof.kv_copies()
            sm, fit = fit_engine(pre, dec, mixed)
            engines.append(EngineProfile(threads=t, weights=w, tp=1, step=sm, fit=fit))
            raw[f"threads={t},weights={w}"] = {
                "prefill": [[list(p.lengths), p.seconds] for p in pre],
                "decode": [[p.batch, p.context_tokens, p.seconds] for p in dec],
                "mixed": [[[list(c) for c in p.chunks], p.batch, p.context_tokens, p.seconds] for p in mixed],
            }
            progress(f"threads={t} weights={w}: {len(pre)} prefill, {len(dec)} decode, {len(mixed)} mixed points in "
                     f"{time.monotonic() - t0:.0f}s; fit error prefill {fit['prefill']['mean_rel_err']:.1%} mean / "
                     f"{fit['prefill']['max_rel_err']:.1%} max, decode {fit['decode']['mean_rel_err']:.1%} / "
                     f"{fit['decode']['max_rel_err']:.1%}, mixed (not fitted) {fit['mixed']['mean_rel_err']:.1%} / {fit['mixed']['max_rel_err']:.1%}")
    torch.set_num_threads(max(threads))
    sock = socket_bandwidth()
    transfer = {"shm": fit_transfer(copies, None), "grpc": fit_transfer(copies, sock)}
    raw["kv_copies"] = [list(c) for c in copies]
    raw["socket_bytes_per_s"] = sock
    from distserve.runtime import WorkerSettings

    ws = WorkerSettings()
    memory = {"kv_cache_bytes": ws.kv_cache_bytes, "block_size": ws.block_size}
    if gpu:
        memory = {"gpu_memory_bytes": machine["memory_bytes"], "utilization": 0.9, "workspace_bytes": 0, "block_size": ws.block_size}
    machine["torch"] = torch.__version__
    machine["loadavg_after"] = os.getloadavg()[0]
    return Profile(model=info, device="gpu" if gpu else "cpu", machine=machine, engines=engines, transfer=transfer, default_transport="shm",
                   costs=CPU_COSTS, memory=memory, created=now_utc(),
                   source=f"distserve profile --model {model} ({'quick' if quick else 'full'} grid, {time.monotonic() - started:.0f}s)",
                   points=raw)
