"""KV transports between real processes: a holder (`distserve.bench.kv_peer`) and pullers here.

Bit-exact fp32/bf16/int8 moves over grpc, gloo and shm; fp16/int8 wire compression within bounds;
negotiation; a transfer broken mid-way falls back to gRPC (counted) or, with the holder dead, fails
UNAVAILABLE; idle pairs and segments are closed on both sides and nothing stays in /dev/shm.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distserve.bench.kv_peer import Peer, random_kv
from distserve.errors import NotFound, Unavailable
from distserve.kv import compression
from distserve.kv.factory import build_pullers
from distserve.engine.kv_cache import KVLayout
from distserve.kv.handle import KvHandle
from distserve.kv.puller import KvPuller
from distserve.kv.shm_transport import our_segments, sweep_stale_segments
from distserve.kv.torch_transport import TorchKvTransport
from distserve.metrics import Metrics
from distserve.rpc.channels import ChannelPool
from distserve.runtime import host_id

pytestmark = pytest.mark.timeout(120)

SIDE = ("gloo", "shm")


@pytest.fixture(scope="module")
def peer():
    with Peer(transports="gloo,shm") as p:
        yield p


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bytes(a.contiguous().view(torch.uint8).numpy()) == bytes(
        b.contiguous().view(torch.uint8).numpy())


def run(body, *, wire: str = "", idle_s: float = 60.0, chunk_bytes: int | None = None):
    async def main():
        pool = ChannelPool()
        transports = build_pullers(("gloo", "shm"), pool, worker_id="test-decode", device=torch.device("cpu"),
                                   wire_dtype=wire, idle_s=idle_s)
        if chunk_bytes:
            transports.register(TorchKvTransport("gloo", pool, worker_id="test-decode", chunk_bytes=chunk_bytes, idle_s=idle_s, wire_dtype=wire))
        try:
            return await body(transports)
        finally:
            await transports.close()
            await pool.close_all()

    return asyncio.run(main())


CASES = [  # (shape, dtype): one block, ragged tokens, a multi-chunk 6.3 MB payload, an int8 cache's export
    ((2, 2, 16, 2, 8), "float32"),
    ((30, 2, 37, 3, 64), "bfloat16"),
    ((30, 2, 257, 3, 64), "float32"),
    ((4, 2, 33, 2, 64), "uint8"),
    ((30, 2, 45, 3, 68), "int8"),  # int8 KV cache: 64 codes + the block's fp32 scale per row
]


@pytest.mark.parametrize("name", ["grpc", "gloo", "shm"])
def test_each_transport_moves_kv_bit_exactly_between_processes(peer, name):
    handles = [(peer.hold(f"{name}-{i}", shape, dtype, seed=i), random_kv(shape, getattr(torch, dtype), i)) for i, (shape, dtype) in enumerate(CASES)]

    async def body(transports):
        t = transports.get(name)
        for handle, want in handles:
            for _ in range(2):  # the second pull reuses the warm buffer (and the pair / segment)
                pulled = await t.borrow(handle)
                assert bits_equal(pulled.tensor, want), (name, handle.shape)
                assert pulled.wire_bytes == handle.nbytes
                pulled.release()
        if name == "gloo":
            assert t.pairs() == 1 and t.buffers.stats().in_use == 0
            assert t.buffers.stats().created <= len(CASES)
        if name == "shm":
            assert t.segments() >= 1 and our_segments(pid=os.getpid()) == []  # every name unlinked already

    run(body, chunk_bytes=1 << 20 if name == "gloo" else None)  # gloo: 1 MiB chunks, so 6.3 MB is 7 sends


@pytest.mark.parametrize("wire", ["float16", "int8"])
@pytest.mark.parametrize("name", ["grpc", "gloo", "shm"])
def test_compressed_kv_on_the_wire_is_close_and_smaller(peer, name, wire):
    shape = (6, 2, 45, 3, 64)
    handle = peer.hold(f"c-{name}-{wire}", shape, "float32", seed=7)
    want = random_kv(shape, torch.float32, 7)

    async def body(transports):
        pulled = await transports.get(name).borrow(handle)
        got = pulled.tensor
        assert got.shape == want.shape and got.dtype == torch.float32
        assert pulled.wire_bytes == compression.wire_nbytes(handle.layout, handle.num_tokens, wire) < handle.nbytes
        if wire == "float16":
            assert torch.equal(got, want.half().float())
        else:  # |error| <= half a step of its block's scale
            blocks = -(-45 // 16)
            padded = torch.nn.functional.pad(want, (0, 0, 0, 0, 0, blocks * 16 - 45)).view(6, 2, blocks, 16, 3, 64)
            step = padded.abs().amax(dim=(3, 5)) / 127
            bound = step.repeat_interleave(16, dim=2)[:, :, :45][..., None] / 2 + 1e-6
            assert ((got - want).abs() <= bound).all()
            assert (got - want).abs().max() > 0
        pulled.release()

    run(body, wire=wire)


def test_int8_codec_round_trip_bounds_and_size():
    layout = KVLayout(3, 2, 8, 4, torch.float32)
    kv = random_kv(layout.export_shape(10), torch.float32, 3) * 5
    payload = compression.encode(kv, "int8", 4)
    assert payload.numel() == compression.wire_nbytes(layout, 10, "int8") == 3 * 2 * 3 * 2 * 4 + kv.numel()
    back = compression.decode(payload, layout, 10, "int8")
    assert (back - kv).abs().max() <= kv.abs().max() / 127 / 2 + 1e-6
    raw = compression.encode(kv, "auto", 4)
    assert raw.data_ptr() == kv.data_ptr()  # the held format is never copied
    assert torch.equal(compression.decode(raw, layout, 10), kv)
    with pytest.raises(Exception, match="wire dtype"):
        compression.encode(kv, "int4", 4)


def test_negotiation_forcing_and_counted_fallback(peer):
    handle = peer.hold("neg", (2, 2, 16, 2, 8), "float32", seed=1)
    want = random_kv((2, 2, 16, 2, 8), torch.float32, 1)
    fields = {f: getattr(handle, f) for f in KvHandle.__slots__}
    elsewhere = KvHandle(**{**fields, "host_id": "another-host"})
    grpc_only = KvHandle(**{**fields, "transports": ("grpc",)})

    async def body(transports):
        metrics = Metrics("decode")
        auto = KvPuller(transports, metrics, host_id())
        assert auto.negotiate(handle) == ("shm", None)  # one host: shared memory
        assert auto.negotiate(elsewhere) == ("gloo", None)  # across hosts: torch over gloo
        assert (await auto.pull(handle)).transport == "shm"
        forced = KvPuller(transports, Metrics("decode"), host_id(), forced="gloo")
        result = await forced.pull(handle)
        assert result.transport == "gloo" and bits_equal(result.pulled.tensor, want)
        result.pulled.release()
        # forced to a transport the holder does not offer: pulled over grpc, logged and counted
        result = await forced.pull(grpc_only)
        assert result.transport == "grpc" and bits_equal(result.pulled.tensor, want)
        assert forced.fallbacks.labels("gloo", "grpc", "forced transport not shared")._value.get() == 1
        assert metrics.transfer_bytes.labels("shm")._value.get() == handle.nbytes

    run(body)


@pytest.mark.parametrize("name", SIDE)
def test_transfer_broken_mid_way_is_retried_over_grpc_and_counted(name):
    with Peer(transports="gloo,shm") as p:
        shape = (8, 2, 256, 4, 64)  # 4 MiB: several chunks
        handle = p.hold("broken", shape, "float32", seed=5)
        p.call("fault", transport=name, mode="raise")

        async def body(transports):
            t = transports.get(name)
            if name == "gloo":
                t.chunk_bytes = 1 << 20  # several sends; the holder's fault fires after the first
            puller = KvPuller(transports, Metrics("decode"), host_id(), forced=name)
            result = await puller.pull(handle)
            assert result.transport == "grpc" and result.wanted == name
            assert bits_equal(result.pulled.tensor, random_kv(shape, torch.float32, 5))
            assert puller.fallbacks.labels(name, "grpc", "Unavailable")._value.get() == 1
            if name == "gloo":
                assert t.pairs() == 0 and t.buffers.stats().in_use == 0  # the broken pair is gone
            else:
                assert t.segments() == 0 and our_segments(pid=os.getpid()) == []
            # the next pull opens a new channel; the holder still breaks it, so grpc again
            assert (await puller.pull(handle)).transport == "grpc"

        run(body)
        stats = p.call("stats")
        assert stats["held"] == 1 and stats["reading"] == 0  # no pin left behind


@pytest.mark.parametrize("name", SIDE)
def test_holder_dying_mid_transfer_is_unavailable_and_leaks_nothing_here(name):
    p = Peer(transports="gloo,shm")
    try:
        shape = (8, 2, 512, 4, 64)
        handle = p.hold("dies", shape, "float32")
        p.call("fault", transport=name, mode="exit")

        async def body(transports):
            t = transports.get(name)
            if name == "gloo":
                t.chunk_bytes = 1 << 20
            puller = KvPuller(transports, Metrics("decode"), host_id(), forced=name)
            with pytest.raises(Unavailable):
                await puller.pull(handle)
            assert p.proc.wait(timeout=10) == 3
            if name == "gloo":
                assert t.pairs() == 0 and t.buffers.stats().in_use == 0
            else:
                assert t.segments() == 0
            assert our_segments(pid=os.getpid()) == []

        run(body)
    finally:
        p.close()


def test_idle_pairs_and_segments_close_on_both_sides_and_free_threads(peer):
    base = peer.call("stats")
    handle = peer.hold("idle", (2, 2, 64, 2, 8), "float32")

    async def body(transports):
        for name in SIDE:
            pulled = await transports.get(name).borrow(handle)
            pulled.release()
        during = peer.call("stats")
        assert during["pairs"] == base["pairs"] + 1 and during["mappings"] == base["mappings"] + 1
        assert transports.get("gloo").pairs() == 1
        await asyncio.sleep(1.5)  # idle_s 0.3 here; the holder evicts after 2 * its own idle_s + 10 or on Disconnect
        assert transports.get("gloo").pairs() == 0 and transports.get("shm").segments() == 0
        after = peer.call("stats")
        assert after["pairs"] == base["pairs"] and after["mappings"] == base["mappings"]
        assert after["threads"] <= base["threads"] + 1 and after["fds"] <= base["fds"] + 1

    run(body, idle_s=0.3)
    assert our_segments(pid=os.getpid()) == []


def test_segment_of_a_killed_puller_is_swept():
    code = "from distserve.kv.shm_transport import ShmSegment; import time; s = ShmSegment(1 << 20); print(s.name, flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    name = child.stdout.readline().strip()
    assert name in our_segments(pid=child.pid)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert sweep_stale_segments() >= 1
    assert our_segments(pid=child.pid) == []


def test_lease_gone_is_not_found_over_side_channels(peer):
    handle = peer.hold("gone", (2, 2, 16, 2, 8), "float32", ttl_s=0.2)
    time.sleep(0.4)

    async def body(transports):
        for name in SIDE:
            with pytest.raises(NotFound):
                await transports.get(name).borrow(handle)
        assert transports.get("gloo").buffers.stats().in_use == 0

    run(body)


@pytest.mark.gpu
def test_nccl_pair_moves_cuda_kv_bit_exactly():
    """The torch transport's group factory with the nccl backend: two ranks (one per GPU, as NCCL
    refuses two ranks on one device) exchange a multi-chunk CUDA payload bit-exactly."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (NCCL refuses two ranks on one GPU); this machine has none")
    import threading

    import torch.distributed as dist

    from distserve.kv.torch_transport import _chunks, make_group

    store = dist.HashStore()
    want = random_kv((30, 2, 300, 3, 64), torch.float32, 9).reshape(-1).view(torch.uint8)
    got = {}

    def rank(r):
        dev = torch.device(f"cuda:{r}")
        pg = make_group(dist.PrefixStore("kv/nccl-test", store), r, "nccl", 60, dev)
        buf = want.to(dev) if r == 0 else torch.empty_like(want, device=dev)
        for i, (o, n) in enumerate(_chunks(buf.numel(), 1 << 20)):
            (pg.send if r == 0 else pg.recv)([buf[o : o + n]], 1 - r, i).wait()
        torch.cuda.synchronize(dev)
        got[r] = buf.cpu()
        pg.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert torch.equal(got[1], want)

MOONCAKE_OK, MOONCAKE_WHY = __import__("distserve.kv.mooncake_transport", fromlist=["status"]).status()


@pytest.mark.skipif(not MOONCAKE_OK, reason=f"mooncake wheel unusable here: {MOONCAKE_WHY}")
def test_mooncake_moves_kv_bit_exactly_over_tcp():
    from distserve.kv.mooncake_transport import MooncakeKvTransport

    with Peer(transports="mooncake") as p:
        handles = [(p.hold(f"mc-{i}", shape, dtype, seed=i), random_kv(shape, getattr(torch, dtype), i)) for i, (shape, dtype) in enumerate(CASES)]

        async def main():
            pool = ChannelPool()
            t = MooncakeKvTransport(pool, "127.0.0.1")
            try:
                for handle, want in handles:
                    for _ in range(2):
                        pulled = await t.borrow(handle)
                        assert bits_equal(pulled.tensor, want)
                        pulled.release()
                assert t.buffers.stats().in_use == 0
            finally:
                await t.close()
                await pool.close_all()

        asyncio.run(main())
