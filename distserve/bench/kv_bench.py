"""`distserve bench kv`: bandwidth and latency of each KV transport next to baselines from the same run.

A holder process (`distserve.bench.kv_peer`) holds payloads of 1..256 MiB and the real KV of
smollm2-135m prompts (128/512/2048 tokens, exported from its paged cache at every pull, as in
serving); this process pulls each one `reps` times per transport (after one warm-up pull) and
reports the median. Baselines, same sizes, same run: memcpy (libc memcpy into a warm buffer here, one thread), a raw
loopback TCP socket (the peer sends preallocated bytes; we recv_into a warm buffer) and a raw gloo
send/recv pair between the same two processes. Targets: shm >= 50% of memcpy, torch/gloo >= 50% of
raw gloo, gRPC >= 1 GB/s (judged on the largest payload).
Then, in-process, greedy agreement of fp16 and int8 KV on the wire against fp32 on the real model.
"""

from __future__ import annotations

import ctypes
import datetime
import socket
import statistics
import struct
import tempfile
import time
from pathlib import Path

import torch

from distserve.bench.kv_peer import Peer
from distserve.rpc.certs import make_certs

MiB = 1 << 20


def _stat(times: list[float], nbytes: int) -> dict:
    med = statistics.median(times)
    return {"latency_ms": round(med * 1e3, 3), "gbps": round(nbytes / med / 1e9, 3), "min_ms": round(min(times) * 1e3, 3)}


def _timed(fn, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


async def _timed_async(fn, reps: int) -> list[float]:
    await fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


class _Baselines:
    def __init__(self, peer: Peer):
        import torch.distributed as dist

        from distserve.kv.rendezvous import PairStore

        self.sock = socket.create_connection(("127.0.0.1", peer.call("raw_socket")["port"]))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        invite = peer.call("raw_gloo")
        store = PairStore.join(invite["store"], bytes.fromhex(invite["secret"]), 60)
        self.pg = dist.ProcessGroupGloo(store, 1, 2, datetime.timedelta(seconds=60))
        store.close()
        self.buf = torch.empty(0, dtype=torch.uint8)

    def _buffer(self, n: int) -> torch.Tensor:
        if self.buf.numel() < n:
            self.buf = torch.empty(n, dtype=torch.uint8)
            self.buf.fill_(0)
        return self.buf[:n]

    def memcpy(self, n: int, reps: int) -> list[float]:
        src = torch.ones(n, dtype=torch.uint8)
        dst = self._buffer(n)
        return _timed(lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), n), reps)  # one thread, libc memcpy

    def socket(self, n: int, reps: int) -> list[float]:
        view = memoryview(self._buffer(n).numpy())

        def once():
            self.sock.sendall(struct.pack("<Q", n))
            got = 0
            while got < n:
                r = self.sock.recv_into(view[got:], n - got)
                if r == 0:
                    raise ConnectionError("raw socket peer closed")
                got += r

        return _timed(once, reps)

    def gloo(self, n: int, reps: int) -> list[float]:
        dst = self._buffer(n)
        size = torch.tensor([n], dtype=torch.int64)

        def once():
            w = self.pg.recv([dst], 0, 1)
            self.pg.send([size], 0, 0).wait()
            w.wait()

        return _timed(once, reps)

    def close(self) -> None:
        try:
            self.pg.send([torch.zeros(1, dtype=torch.int64)], 0, 0).wait()
        finally:
            self.pg.abort()
            self.sock.close()


async def _transports(peer: Peer, names: tuple[str, ...], rows: list[dict], reps: int, tls_dir: Path | None = None) -> None:
    from distserve.kv.factory import build_pullers
    from distserve.rpc.certs import role_files
    from distserve.rpc.channels import ChannelPool
    from distserve.rpc.tls import Tls

    f = role_files(tls_dir, "decode") if tls_dir else None
    pool = ChannelPool(tls=Tls.load(str(f.ca), str(f.cert), str(f.key)) if f else None)  # a decode worker's channels
    transports = build_pullers(tuple(n for n in names if n != "grpc"), pool, worker_id="bench", device=torch.device("cpu"))
    try:
        for row in rows:
            handle = row.pop("_handle")
            for name in names:
                t = transports.get(name)

                async def once():
                    pulled = await t.borrow(handle)
                    pulled.release()

                row[name] = _stat(await _timed_async(once, reps), row["bytes"])
    finally:
        await transports.close()
        await pool.close_all()


def _agreement(model: str, n_prompts: int, max_tokens: int) -> dict:
    from distserve.engine.engine import EngineConfig, LLMEngine
    from distserve.engine.models import load_model
    from distserve.engine.sampling import SamplingParams
    from distserve.kv import compression

    lm = load_model(model, device="cpu")
    topics = ["the sea", "a city at night", "mountains", "friendship", "coffee", "the moon", "rain", "a library",
              "trains", "autumn", "a robot", "bread", "music", "winter", "a garden", "the desert", "bicycles", "time"]
    asks = ["Write two sentences about {}.", "Give three facts about {}.", "Describe {} to a child.", "Write a haiku about {}."]
    questions = [asks[i % len(asks)].format(topics[i % len(topics)]) for i in range(n_prompts)]
    prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"] for q in questions]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    pre = LLMEngine(lm, EngineConfig(mode="prefill", num_blocks=64 * n_prompts))
    lay = layout = pre.layout
    firsts, kvs = {}, {}
    for i, p in enumerate(prompts):
        pre.add_request(str(i), p, params)
    while pre.has_work():
        for o in pre.step():
            firsts[o.request_id] = o.new_token_ids[0]
            kvs[o.request_id] = pre.export_kv(o.request_id)
            pre.free(o.request_id)
    outs: dict[str, list[list[int]]] = {}
    for wire in ("", "float16", "int8"):
        dec = LLMEngine(lm, EngineConfig(mode="decode", num_blocks=64 * n_prompts))
        toks = {}
        for i, p in enumerate(prompts):
            rid = str(i)
            kv = compression.decode(compression.encode(kvs[rid], wire, lay.block_size), layout, len(p), wire)
            dec.reserve(rid, p, params)
            dec.admit_prefilled(rid, firsts[rid], None, kv)
            toks[rid] = [firsts[rid]]
        while dec.has_work():
            for o in dec.step():
                toks[o.request_id].extend(o.new_token_ids)
        outs[wire or "float32"] = [toks[str(i)] for i in range(len(prompts))]
    ref = outs["float32"]
    result = {"model": model, "prompts": len(prompts), "max_tokens": max_tokens}
    for wire in ("float16", "int8"):
        same = sum(a == b for a, b in zip(outs[wire], ref))
        prefix = []
        for a, b in zip(outs[wire], ref):
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            prefix.append(k / len(b))
        result[wire] = {"identical_outputs": f"{same}/{len(ref)}", "identical_fraction": round(same / len(ref), 3),
                        "mean_agreeing_prefix": round(sum(prefix) / len(prefix), 3),
                        "wire_bytes_vs_fp32": round(compression.wire_nbytes(layout, 256, wire) / layout.export_nbytes(256), 3)}
    return result


def run(sizes_mb=(1, 4, 16, 64, 256), prompts=(128, 512, 2048), reps: int = 5, model: str = "smollm2-135m",
        transports=("grpc", "gloo", "shm"), agreement: bool = True, agreement_prompts: int = 16, agreement_tokens: int = 32,
        tls: bool = False) -> dict:
    """With `tls`, the control plane (and so the grpc transport's bytes) runs mutual TLS, as a suite with
    TLS does; the side channels (gloo, shm, mooncake) carry the KV outside it either way."""
    import uvloop

    from distserve.kv import mooncake_transport

    mooncake_ok, mooncake_why = mooncake_transport.status()
    names = tuple(transports) + (("mooncake",) if mooncake_ok and "mooncake" not in transports else ())
    names = tuple(n for n in names if n != "mooncake" or mooncake_ok)
    tls_dir = make_certs(Path(tempfile.mkdtemp(prefix="distserve-kv-tls-"))) if tls else None
    out: dict = {"reps": reps, "unit": "GB/s = 1e9 bytes/s; latency = median of reps after one warm-up", "tls": tls,
                 "threads": torch.get_num_threads(), "mooncake": "used (tcp)" if "mooncake" in names else f"skipped: {mooncake_why}"}
    held = ["gloo", *(n for n in names if n not in ("grpc", "gloo"))]  # gloo always: the raw gloo baseline uses its store
    with Peer(transports=",".join(held), tls_dir=tls_dir) as peer:
        base = _Baselines(peer)
        try:
            payload_rows = []
            for mb in sizes_mb:
                n = mb * MiB
                tokens = n // (2 * 256 * 4)
                handle = peer.hold(f"payload-{mb}", (1, 2, tokens, 1, 256), "float32", seed=mb)
                payload_rows.append({"payload": f"{mb} MiB", "bytes": n, "_handle": handle})
            real_rows = []
            for t in prompts:
                handle = peer.hold_real(t, model)
                real_rows.append({"payload": f"{model} KV, {t}-token prompt", "tokens": t, "bytes": handle.nbytes, "_handle": handle})
            for row in payload_rows + real_rows:
                n = row["bytes"]
                row["memcpy"] = _stat(base.memcpy(n, reps), n)
                row["socket"] = _stat(base.socket(n, reps), n)
                row["gloo_raw"] = _stat(base.gloo(n, reps), n)
            uvloop.run(_transports(peer, names, payload_rows + real_rows, reps, tls_dir))
        finally:
            base.close()
    out["payloads"], out["real_kv"] = payload_rows, real_rows
    big = payload_rows[-1]
    out["targets"] = {
        "on": big["payload"],
        "shm_vs_memcpy": round(big["shm"]["gbps"] / big["memcpy"]["gbps"], 3) if "shm" in big else None,
        "gloo_vs_raw_gloo": round(big["gloo"]["gbps"] / big["gloo_raw"]["gbps"], 3) if "gloo" in big else None,
        "grpc_gbps": big["grpc"]["gbps"] if "grpc" in big else None,
    }
    t = out["targets"]
    t["met"] = {"shm >= 0.5 memcpy": (t["shm_vs_memcpy"] or 0) >= 0.5, "gloo >= 0.5 raw gloo": (t["gloo_vs_raw_gloo"] or 0) >= 0.5,
                "grpc >= 1 GB/s": (t["grpc_gbps"] or 0) >= 1.0}
    if agreement:
        out["agreement"] = _agreement(model, agreement_prompts, agreement_tokens)
    return out


def table(result: dict) -> str:
    names = [k for k in ("memcpy", "socket", "gloo_raw", "grpc", "gloo", "shm", "mooncake") if k in result["payloads"][0]]
    lines = ["control plane (and the grpc transport): " + ("mutual TLS" if result.get("tls") else "plaintext"),
             f"{'payload':>34} " + " ".join(f"{n:>16}" for n in names)]
    for row in result["payloads"] + result["real_kv"]:
        cells = [f"{row[n]['gbps']:6.2f}GB/s {row[n]['latency_ms']:7.1f}ms" for n in names]
        lines.append(f"{row['payload']:>34} " + " ".join(f"{c:>16}" for c in cells))
    lines.append(f"targets: {result['targets']}")
    if "agreement" in result:
        lines.append(f"greedy agreement vs fp32 KV: {result['agreement']}")
    lines.append(f"mooncake: {result['mooncake']}")
    return "\n".join(lines)
