"""KV handoff over real gRPC: leases, chunked Pull, Release, expiry."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import torch

from distserve.errors import InvalidRequest, NotFound, Unavailable
from distserve.kv.grpc_transport import GrpcKvTransport, KvTransferServicer, add_to_server, encode_chunks, split_chunk
from distserve.kv.release import LeaseClient
from distserve.engine.kv_cache import KVLayout
from distserve.kv.handle import KvHandle, layout_from_proto
from distserve.kv.lease import LeaseTable
from distserve.kv.transport import KvTransports, choose_transport
from distserve.rpc.channels import ChannelPool
from distserve.rpc.server import build_server
from distserve.v1 import common_pb2, kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(60)

KV_SERVICE = kv_pb2.DESCRIPTOR.services_by_name["KvTransfer"].full_name


class Holder:
    """A prefill-side stand-in: tensors held under leases, counting frees."""

    def __init__(self, table: LeaseTable, address: str):
        self.table = table
        self.address = address
        self.frees: dict[str, int] = {}
        self._lock = threading.Lock()

    def hold(self, request_id: str, kv: torch.Tensor, ttl_s: float = 30.0) -> KvHandle:
        def free() -> None:
            with self._lock:
                self.frees[request_id] = self.frees.get(request_id, 0) + 1

        token, expiry = self.table.hold(request_id, kv.clone, free, ttl_s, nbytes=kv.nbytes)
        _, _, num_tokens, heads, head_dim = kv.shape
        layout = KVLayout(kv.shape[0], heads, head_dim, 16, kv.dtype)
        return KvHandle(request_id, "p0", self.address, ("grpc",), layout, num_tokens, expiry, token, "host-a")


def run_kv(body: Callable[[Holder, GrpcKvTransport, ChannelPool], Awaitable[Any]], chunk_bytes: int = 256 * 1024) -> Any:
    async def main() -> Any:
        table = LeaseTable()
        built = await build_server([KV_SERVICE])
        add_to_server(KvTransferServicer(table, chunk_bytes=chunk_bytes), built.server)
        await built.server.start()
        await built.health.set_serving()
        pool = ChannelPool()
        try:
            return await body(Holder(table, built.address), GrpcKvTransport(pool, timeout_s=10), pool)
        finally:
            await pool.close_all()
            await built.server.stop(None)
            table.release_all()

    return asyncio.run(main())


def random_kv(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int16).to(dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bytes(a.view(torch.uint8).numpy()) == bytes(
        b.view(torch.uint8).numpy()
    )


async def raw_chunks(pool: ChannelPool, handle: KvHandle, chunk_bytes: int = 0) -> list[kv_pb2.KvChunk]:
    stub = kv_pb2_grpc.KvTransferStub(pool.get(handle.kv_address))
    request = kv_pb2.PullKvRequest(
        request_id=handle.request_id, transfer_token=handle.transfer_token, chunk_bytes=chunk_bytes
    )
    return [chunk async for chunk in stub.Pull(request, timeout=10)]


@pytest.mark.parametrize(
    "dtype, shape, chunk",
    [
        (torch.float32, (8, 2, 128, 4, 64), 256 * 1024),  # 2 MiB, divides evenly
        (torch.uint8, (30, 2, 257, 3, 64), 100_000),  # 2.96 MB, ragged last chunk ("int8" is the int8 cache format)
        (torch.bfloat16, (4, 2, 33, 2, 64), 7_000),
    ],
)
def test_pull_is_bit_exact_in_bounded_chunks(dtype: torch.dtype, shape: tuple[int, ...], chunk: int) -> None:
    kv = random_kv(shape, dtype)
    total = kv.nbytes

    async def body(holder: Holder, transport: GrpcKvTransport, pool: ChannelPool) -> None:
        handle = holder.hold("r1", kv)
        assert handle.nbytes == total
        got = await transport.pull(handle)
        assert bits_equal(got, kv)
        chunks = await raw_chunks(pool, handle)
        assert len(chunks) == -(-total // chunk)
        assert max(len(c.data) for c in chunks) == min(chunk, total)
        assert sum(len(c.data) for c in chunks) == total
        assert list(chunks[0].shape) == list(shape) and chunks[0].dtype == handle.layout.dtype_name
        assert all(not c.shape and not c.dtype for c in chunks[1:])
        # the puller may ask for smaller chunks, never larger ones
        assert len(await raw_chunks(pool, handle, chunk_bytes=chunk // 2)) == -(-total // (chunk // 2))
        assert len(await raw_chunks(pool, handle, chunk_bytes=chunk * 4)) == len(chunks)
        assert holder.frees == {}
        assert await LeaseClient(pool).release_handle(handle)
        assert holder.frees == {"r1": 1}

    run_kv(body, chunk_bytes=chunk)


def test_hand_written_chunks_are_ordinary_kvchunks_both_ways() -> None:
    data = memoryview(bytes(range(256)) * 10)
    messages = list(encode_chunks(data, 1000, [2, 2, 5, 2, 8], "float32"))
    parsed = [kv_pb2.KvChunk.FromString(m) for m in messages]  # what any gRPC client sees
    assert b"".join(p.data for p in parsed) == bytes(data)
    assert [p.offset for p in parsed] == [0, 1000, 2000] and {p.total_bytes for p in parsed} == {2560}
    assert list(parsed[0].shape) == [2, 2, 5, 2, 8] and parsed[0].dtype == "float32"
    assert [split_chunk(m)[0] for m in messages] == [kv_pb2.KvChunk(offset=p.offset, total_bytes=p.total_bytes, shape=p.shape, dtype=p.dtype) for p in parsed]
    # and a chunk protobuf wrote, fields in its order, parses the same way
    std = kv_pb2.KvChunk(offset=7, data=b"abc", total_bytes=10, shape=[1, 2], dtype="int8", wire_dtype="int8").SerializeToString()
    head, got = split_chunk(std)
    assert bytes(got) == b"abc" and not head.data
    assert (head.offset, head.total_bytes, list(head.shape), head.dtype, head.wire_dtype) == (7, 10, [1, 2], "int8", "int8")
    for broken in (std[:-1], std[:3], b"\x13"):  # a field cut short, a truncated varint, an unknown wire type
        with pytest.raises(Unavailable, match="malformed"):
            split_chunk(broken)


def test_borrowed_kv_lives_in_a_warm_buffer_reused_by_the_next_pull() -> None:
    kv = random_kv((8, 2, 100, 4, 64), torch.float32, 3)

    async def body(holder: Holder, transport: GrpcKvTransport, pool: ChannelPool) -> None:
        for i in range(3):
            pulled = await transport.borrow(holder.hold(f"r{i}", kv))
            assert bits_equal(pulled.tensor, kv) and pulled.wire_bytes == kv.nbytes
            pulled.release()
        stats = transport.buffers.stats()
        assert stats.created == 1 and stats.in_use == 0 and stats.idle == 1
        held = await transport.borrow(holder.hold("r3", kv))  # not released: the next pull needs another buffer
        assert bits_equal((await transport.borrow(holder.hold("r4", kv))).tensor, kv)
        assert transport.buffers.stats().created == 2 and bits_equal(held.tensor, kv)

    run_kv(body)


def test_wrong_token_is_not_found_and_looks_like_unknown_id() -> None:
    async def body(holder: Holder, transport: GrpcKvTransport, pool: ChannelPool) -> None:
        handle = holder.hold("r1", random_kv((2, 2, 8, 2, 8), torch.float32))
        forged = KvHandle(**{f: getattr(handle, f) for f in KvHandle.__slots__ if f != "transfer_token"},
                          transfer_token=b"\0" * 16)
        unknown = KvHandle(**{f: getattr(handle, f) for f in KvHandle.__slots__ if f != "request_id"},
                           request_id="nope")
        with pytest.raises(NotFound) as wrong:
            await transport.pull(forged)
        with pytest.raises(NotFound) as missing:
            await transport.pull(unknown)
        assert str(wrong.value).replace("r1", "nope") == str(missing.value)
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await raw_chunks(pool, forged)
        assert raw.value.code() == grpc.StatusCode.NOT_FOUND
        assert not await LeaseClient(pool).release_handle(forged)  # a wrong token cannot free it either
        assert holder.frees == {}
        assert bits_equal(await transport.pull(handle), handle_tensor(holder, handle))

    run_kv(body)


def handle_tensor(holder: Holder, handle: KvHandle) -> torch.Tensor:
    return holder.table.export(handle.request_id, handle.transfer_token)


def test_release_frees_once_and_pull_after_release_is_not_found() -> None:
    async def body(holder: Holder, transport: GrpcKvTransport, pool: ChannelPool) -> None:
        handle = holder.hold("r1", random_kv((2, 2, 8, 2, 8), torch.float32))
        await transport.pull(handle)
        results = await asyncio.gather(*(LeaseClient(pool).release_handle(handle) for _ in range(5)))
        assert sorted(results) == [False, False, False, False, True]
        assert holder.frees == {"r1": 1}
        with pytest.raises(NotFound):
            await transport.pull(handle)
        assert holder.table.stats().held == 0 and holder.table.stats().released_total == 1

    run_kv(body)


def test_lease_expiry_frees_and_then_pull_is_not_found() -> None:
    async def body(holder: Holder, transport: GrpcKvTransport, pool: ChannelPool) -> None:
        reaper = asyncio.create_task(holder.table.run_reaper(0.02))
        try:
            short = holder.hold("short", random_kv((2, 2, 8, 2, 8), torch.float32), ttl_s=0.2)
            long = holder.hold("long", random_kv((2, 2, 8, 2, 8), torch.float32), ttl_s=30)
            assert short.lease_expiry_unix < time.time() + 0.3
            await asyncio.sleep(0.4)
            assert holder.frees == {"short": 1}
            with pytest.raises(NotFound):
                await transport.pull(short)
            assert not await LeaseClient(pool).release_handle(short)
            assert holder.frees == {"short": 1}
            stats = holder.table.stats()
            assert stats.held == 1 and stats.expired_total == 1 and stats.bytes_held == 2 * 2 * 8 * 2 * 8 * 4
            await transport.pull(long)
        finally:
            reaper.cancel()

    run_kv(body)


def test_layout_mismatch_is_unavailable() -> None:
    async def body(holder: Holder, transport: GrpcKvTransport, pool: ChannelPool) -> None:
        handle = holder.hold("r1", random_kv((2, 2, 8, 2, 8), torch.float32))
        fields = {f: getattr(handle, f) for f in KvHandle.__slots__}
        for change in ({"num_tokens": 9}, {"layout": KVLayout(2, 2, 8, 16, torch.float16)}):
            with pytest.raises(Unavailable, match="holder sent shape"):
                await transport.pull(KvHandle(**{**fields, **change}))
        assert holder.frees == {}

    run_kv(body)


def test_unreachable_holder_is_unavailable() -> None:
    async def body(holder: Holder, transport: GrpcKvTransport, pool: ChannelPool) -> None:
        handle = holder.hold("r1", random_kv((1, 2, 1, 1, 4), torch.float32))
        fields = {f: getattr(handle, f) for f in KvHandle.__slots__}
        with pytest.raises(Unavailable):
            await transport.borrow(KvHandle(**{**fields, "kv_address": "127.0.0.1:1"}), timeout_s=5)

    run_kv(body)


def test_release_during_pull_defers_free_until_the_read_ends() -> None:
    table = LeaseTable()
    frees: list[str] = []
    token, _ = table.hold("r1", lambda: torch.zeros(1), lambda: frees.append("r1"))
    with table.pinned("r1", token) as export:
        assert table.release("r1", token)
        assert frees == [] and table.stats().reading == 1
        export()
        with pytest.raises(NotFound):
            table.export("r1", token)
    assert frees == ["r1"]
    assert table.stats().reading == 0 and not table.release("r1", token)


def test_lease_table_rules() -> None:
    now = [100.0]
    table = LeaseTable(default_ttl_s=5, clock=lambda: now[0])
    frees: list[str] = []
    token, _ = table.hold("a", lambda: torch.ones(2), lambda: frees.append("a"))
    with pytest.raises(InvalidRequest):
        table.hold("a", lambda: torch.ones(2), lambda: None)
    assert torch.equal(table.export("a", token), torch.ones(2))
    now[0] += 5
    with pytest.raises(NotFound):  # expired even before the reaper ran
        table.export("a", token)
    assert table.expire_now() == 1 and frees == ["a"]
    table.hold("b", lambda: torch.ones(1), lambda: frees.append("b"))
    assert table.release_all() == 1 and frees == ["a", "b"] and len(table) == 0


def test_handle_proto_round_trip_and_transport_choice() -> None:
    handle = KvHandle("r1", "p0", "10.0.0.1:7001", ("shm", "grpc"), KVLayout(30, 3, 64, 16, torch.float32),
                      256, 1712345678.5, b"\x01" * 16, "host-a", {"shm": "/dev/shm/x"})
    msg = handle.to_proto()
    again = KvHandle.from_proto(common_pb2.KvHandle.FromString(msg.SerializeToString()))
    assert again == handle
    assert handle.nbytes == 256 * 46080  # 45 KiB per token, as DESIGN.md counts for SmolLM2-135M
    with pytest.raises(InvalidRequest, match="dtype"):
        KVLayout(1, 1, 1, 16, torch.complex64)
    with pytest.raises(InvalidRequest, match="dtype"):  # what a peer sends
        layout_from_proto(common_pb2.KvLayout(num_layers=1, num_kv_heads=1, head_dim=1, block_size=16, dtype="complex64"))
    assert choose_transport(["shm", "gloo", "grpc"], ["shm", "grpc"], same_host=True) == "shm"
    assert choose_transport(["shm", "gloo", "grpc"], ["shm", "gloo", "grpc"], same_host=False) == "gloo"
    assert choose_transport(["nccl", "mooncake", "grpc"], ["mooncake", "nccl"], same_host=False) == "nccl"
    assert choose_transport(["shm", "grpc"], ["shm", "grpc"], True, forced="grpc") == "grpc"
    with pytest.raises(Unavailable):
        choose_transport(["shm"], ["shm"], same_host=False)
    with pytest.raises(Unavailable):
        choose_transport(["grpc"], ["grpc"], True, forced="gloo")
    with pytest.raises(InvalidRequest):
        choose_transport(["grpc"], ["grpc"], True, forced="carrier-pigeon")
    transports = KvTransports([GrpcKvTransport(ChannelPool())])
    assert transports.names() == ("grpc",) and transports.get("grpc").name == "grpc"
    with pytest.raises(Unavailable):
        transports.get("shm")
