"""A KV holder in its own process, for `distserve bench kv` and the transport tests.

`Peer()` starts `python -m distserve.bench.kv_peer`, which serves KvTransfer with every transport it
can (gRPC, gloo, shm, and mooncake when asked and usable) plus two raw baselines (a loopback TCP
socket and a gloo pair, each sending preallocated bytes). The parent drives it with one JSON command
per line on stdin and reads one JSON reply per line on stdout:
  hold {rid, shape, dtype, seed}   hold a seeded random tensor under a lease -> {handle: hex proto}
  hold_real {tokens, model}        prefill a prompt of that many tokens and hold its KV (export per pull)
  stats                            leases held, freed, torch pairs, shm mappings, threads, fds
  fault {transport, mode}          the next sends over that transport break after the first chunk:
                                   mode "raise" (the holder fails the Push) or "exit" (the process dies)
  raw_socket                       -> {port}: each connection reads an 8-byte size and gets that many bytes
  raw_gloo                         -> {store, secret}: a raw 2-rank gloo group (rank 0) over that
                                   rendezvous store, serving sizes the same way
`close()` ends the process (SIGKILL after a grace period); its stderr goes to a log file.
With `tls_dir` (a `distserve certs` folder) the holder serves KvTransfer as a prefill worker does
under TLS: its prefill certificate, callers' certificates required, only decode/colocated roles.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def random_kv(shape, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int16).to(dtype)


class Peer:
    """The parent's handle on a holder process."""

    def __init__(self, *, transports: str = "gloo,shm", idle_s: float = 60.0, log: Path | None = None, timeout_s: float = 120.0,
                 tls_dir: Path | None = None):
        self.log_path = log or Path(f"/tmp/distserve-kv-peer-{os.getpid()}-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distserve.bench.kv_peer", "--transports", transports, "--idle-s", str(idle_s),
             *(["--tls-dir", str(tls_dir)] if tls_dir else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
        )
        self.timeout_s = timeout_s
        self.info = self._read()
        self.address = self.info["address"]
        self.pid = self.proc.pid

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"KV peer exited ({self.proc.poll()}); log:\n{self.log()}")
        return json.loads(line)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def call(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"KV peer {cmd}: {reply['error']}")
        return reply

    def hold(self, rid: str, shape, dtype: str = "float32", seed: int = 0, ttl_s: float = 600.0):
        from distserve.kv.handle import KvHandle
        from distserve.v1 import common_pb2

        reply = self.call("hold", rid=rid, shape=list(shape), dtype=dtype, seed=seed, ttl_s=ttl_s)
        return KvHandle.from_proto(common_pb2.KvHandle.FromString(bytes.fromhex(reply["handle"])))

    def hold_real(self, tokens: int, model: str = "smollm2-135m"):
        from distserve.kv.handle import KvHandle
        from distserve.v1 import common_pb2

        reply = self.call("hold_real", tokens=tokens, model=model)
        return KvHandle.from_proto(common_pb2.KvHandle.FromString(bytes.fromhex(reply["handle"])))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the child process --------------------------------------------------------------------------
class _Holder:
    def __init__(self, transports: list[str], idle_s: float, tls_dir: str = ""):
        self.tls_dir = tls_dir
        from distserve.kv.factory import build_senders
        from distserve.kv.lease import LeaseTable
        from distserve.kv.server import KvTransferServer

        self.leases = LeaseTable(default_ttl_s=600)
        self.freed: list[str] = []
        senders = build_senders(tuple(transports), "127.0.0.1", torch.device("cpu"), idle_s)
        self.server = KvTransferServer(self.leases, senders)
        self.senders = {s.name: s for s in senders}
        self.tensors: dict[str, torch.Tensor] = {}
        self.engine = None
        self.raw_buf = torch.empty(0, dtype=torch.uint8)

    async def start(self) -> dict:
        from distserve.rpc.server import build_server
        from distserve.kv.grpc_transport import add_to_server as add_kv_transfer

        tls = None
        if self.tls_dir:
            from distserve.rpc.certs import role_files
            from distserve.rpc.tls import WORKER_CALLERS, PeerRoles, Tls

            f = role_files(self.tls_dir, "prefill")
            tls = Tls.load(str(f.ca), str(f.cert), str(f.key))
        self.built = await build_server(["distserve.v1.KvTransfer"], host="127.0.0.1", port=0, tls=tls,
                                        interceptors=[PeerRoles(WORKER_CALLERS)] if tls else ())
        add_kv_transfer(self.server, self.built.server)
        await self.built.server.start()
        self.reaper = asyncio.create_task(self.server.run_reaper(0.2))
        return {"address": self.built.address, "pid": os.getpid(), "transports": ["grpc", *self.senders], "params": self.server.transport_params()}

    def _handle(self, rid: str, kv: torch.Tensor, export_fn, ttl_s: float = 600.0) -> str:
        from distserve.engine.kv_cache import KV_SCALE_BYTES, KVLayout
        from distserve.kv.handle import KvHandle

        token, expiry = self.leases.hold(rid, export_fn, lambda: self.freed.append(rid), ttl_s, nbytes=kv.nbytes)
        layers, _, tokens, heads, dim = kv.shape
        if kv.dtype == torch.int8:  # an int8 cache's export: each row is head_dim codes plus its block's scale
            dim -= KV_SCALE_BYTES
        layout = KVLayout(layers, heads, dim, 16, kv.dtype)
        handle = KvHandle(rid, "peer", self.built.address, ("grpc", *self.senders), layout, tokens, expiry, token,
                          _host_id(), self.server.transport_params())
        return handle.to_proto().SerializeToString().hex()

    def hold(self, rid, shape, dtype, seed, ttl_s=600.0) -> dict:
        from distserve.engine.kv_cache import torch_dtype

        kv = random_kv(tuple(shape), torch_dtype(dtype), seed)
        self.tensors[rid] = kv
        return {"handle": self._handle(rid, kv, lambda: kv, ttl_s)}

    def hold_real(self, tokens: int, model: str) -> dict:
        from distserve.engine.engine import EngineConfig, LLMEngine
        from distserve.engine.models import load_model
        from distserve.engine.sampling import SamplingParams

        if self.engine is None:
            self.engine = LLMEngine(load_model(model, device="cpu"), EngineConfig(mode="prefill", kv_cache_bytes=1 << 30, max_num_batched_tokens=4096))
        e = self.engine
        rid = f"real-{tokens}-{len(self.leases)}-{time.monotonic_ns()}"
        prompt = [(i * 7919) % 20000 + 10 for i in range(tokens)]
        e.add_request(rid, prompt, SamplingParams(max_tokens=4, temperature=0.0))
        while e.has_work():
            e.step()
        seq = e._seqs[rid]
        table, n = list(seq.block_table), seq.num_prompt_tokens
        kv = e.cache.export(table, n)
        return {"handle": self._handle(rid, kv, lambda: e.cache.export(table, n))}

    def stats(self) -> dict:
        s = self.leases.stats()
        torch_pairs = sum(getattr(x, "pairs", lambda: 0)() for x in self.senders.values())
        shm_maps = getattr(self.senders.get("shm"), "mappings", lambda: 0)()
        return {"held": s.held, "reading": s.reading, "freed": list(self.freed), "pairs": torch_pairs, "mappings": shm_maps,
                "threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd"))}

    def fault(self, transport: str, mode: str) -> dict:
        sender = self.senders[transport]
        if transport == "shm":
            import distserve.kv.shm_transport as shm

            shm.COPY_CHUNK = 1 << 20  # so a payload of a few MiB is several chunks
        name = "_send_chunk" if transport in ("gloo", "nccl") else "_copy_chunk"
        real = getattr(sender, name)
        calls = [0]

        def broken(*args):
            calls[0] += 1
            if calls[0] > 1:
                if mode == "exit":
                    os._exit(3)
                raise RuntimeError("injected fault after the first chunk")
            return real(*args)

        setattr(sender, name, broken)
        return {"ok": True}

    def raw_socket(self) -> dict:
        srv = socket.create_server(("127.0.0.1", 0))

        def serve():
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    break
                n = struct.unpack("<Q", head)[0]
                if self.raw_buf.numel() < n:
                    self.raw_buf = torch.ones(n, dtype=torch.uint8)
                conn.sendall(memoryview(self.raw_buf.numpy())[:n])
            conn.close()
            srv.close()

        threading.Thread(target=serve, daemon=True).start()
        return {"port": srv.getsockname()[1]}

    def raw_gloo(self) -> dict:
        import torch.distributed as dist

        from distserve.kv.rendezvous import PairStore

        store = PairStore.serve("127.0.0.1", 60)

        def serve():
            pg = dist.ProcessGroupGloo(store, 0, 2, datetime.timedelta(seconds=60))
            size = torch.zeros(1, dtype=torch.int64)
            buf = torch.empty(0, dtype=torch.uint8)
            while True:
                pg.recv([size], 1, 0).wait()
                store.close()  # the server end: rank 1 is surely built once its first message is here
                n = int(size.item())
                if n <= 0:
                    break
                if buf.numel() < n:
                    buf = torch.ones(n, dtype=torch.uint8)
                pg.send([buf[:n]], 1, 1).wait()
            pg.abort()

        threading.Thread(target=serve, daemon=True).start()
        return store.params()


def _host_id() -> str:
    from distserve.runtime import host_id

    return host_id()


async def _main(transports: list[str], idle_s: float, tls_dir: str = "") -> None:
    holder = _Holder(transports, idle_s, tls_dir)
    print(json.dumps(await holder.start()), flush=True)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue = asyncio.Queue()

    def reader():
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=reader, daemon=True).start()
    while (line := await lines.get()) is not None:
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        try:
            reply = await asyncio.to_thread(getattr(holder, cmd), **msg)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    holder.reaper.cancel()
    await holder.server.close()
    await holder.built.server.stop(None)


if __name__ == "__main__":
    import argparse
    import logging

    import uvloop

    p = argparse.ArgumentParser()
    p.add_argument("--transports", default="gloo,shm")
    p.add_argument("--idle-s", type=float, default=60.0)
    p.add_argument("--tls-dir", default="")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    uvloop.run(_main([t for t in a.transports.split(",") if t], a.idle_s, a.tls_dir))
