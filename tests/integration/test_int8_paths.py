"""int8 paths end to end: int8 KV exported by a prefill engine crosses a real gRPC KvTransfer bit for
bit and decodes to the colocated tokens; the tiny-llama suite (`distserve up` as processes) with
int8 weights and int8 KV serves the tokens the same settings give in process, and frees everything."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from distserve.client import Client
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.sampling import SamplingParams
from distserve.kv.grpc_transport import GrpcKvTransport, KvTransferServicer, add_to_server
from distserve.kv.release import LeaseClient
from distserve.kv.handle import KvHandle
from distserve.kv.lease import LeaseTable
from distserve.rpc.channels import ChannelPool
from distserve.rpc.server import build_server
from distserve.up import UpProcess
from distserve.v1 import kv_pb2
from tests.engine_helpers import prompts, run_prompts, run_to_end

pytestmark = pytest.mark.timeout(400)

KV_SERVICE = kv_pb2.DESCRIPTOR.services_by_name["KvTransfer"].full_name
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def test_int8_kv_crosses_grpc_bit_exact_and_decodes_to_the_colocated_tokens(tiny):
    ps = prompts(4, seed=21, lo=5, hi=80)
    want = run_prompts(LLMEngine(tiny, EngineConfig(num_blocks=80, kv_dtype="int8")), ps, GREEDY)

    pre = LLMEngine(tiny, EngineConfig(mode="prefill", num_blocks=80, kv_dtype="int8"))
    dec = LLMEngine(tiny, EngineConfig(mode="decode", num_blocks=80, kv_dtype="int8"))
    for i, p in enumerate(ps):
        pre.add_request(str(i), p, GREEDY)
    firsts = {}
    while pre.has_work():
        for o in pre.step():
            firsts[o.request_id] = o.new_token_ids[0]
    layout = pre.layout  # the engine's own layout is what a handle carries
    assert layout.dtype_name == "int8" and layout.export_shape(7)[-1] == layout.head_dim + 4

    async def move():
        table = LeaseTable()
        built = await build_server([KV_SERVICE])
        add_to_server(KvTransferServicer(table, chunk_bytes=64 * 1024), built.server)
        await built.server.start()
        pool = ChannelPool()
        transport = GrpcKvTransport(pool, timeout_s=10)
        pulled = {}
        try:
            for i, p in enumerate(ps):
                rid = str(i)
                exported = pre.export_kv(rid)
                token, expiry = table.hold(rid, lambda rid=rid: pre.export_kv(rid), lambda rid=rid: pre.free(rid), 30.0,
                                           nbytes=exported.nbytes)
                handle = KvHandle(rid, "p0", built.address, ("grpc",), layout, len(p), expiry, token, "host-a")
                assert handle.nbytes == exported.nbytes
                got = await transport.pull(handle)
                assert got.dtype == torch.int8 and torch.equal(got, exported)
                assert await LeaseClient(pool).release_handle(handle)
                pulled[rid] = got
        finally:
            await pool.close_all()
            await built.server.stop(None)
        return pulled

    pulled = asyncio.run(move())
    assert pre.blocks.num_free == pre.blocks.num_blocks  # every lease released frees its blocks
    got = {}
    for i, p in enumerate(ps):
        rid = str(i)
        dec.reserve(rid, p, GREEDY)
        dec.admit_prefilled(rid, firsts[rid], None, pulled[rid])
        got[rid] = [firsts[rid]]
    for rid, toks in run_to_end(dec).items():
        got[rid] += toks
    assert got == want


def worker_children(parent: int) -> dict[str, int]:
    """/proc/PID/comm -> pid of the children of `parent`."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                out[(d / "comm").read_text().strip()] = int(d.name)
        except OSError:
            continue
    return out


@pytest.mark.parametrize("preload", ["on", "off"])
def test_suite_with_int8_weights_and_int8_kv_serves_valid_tokens(tmp_path, tiny, preload):
    up = UpProcess(tmp_path, "--model", "tiny-llama", "--prefill", "1", "--decode", "1", "--preload", preload,
                   "--weights", "int8", "--kv-dtype", "int8", "--worker-arg=--num-blocks=128")
    ps = prompts(6, seed=22, lo=5, hi=80)
    try:
        children = worker_children(up.proc.pid)
        forked = {name: pid for name, pid in children.items() if name.startswith("ds-")}
        if preload == "on":  # forked from up, each in its own session, named after its role
            assert sorted(forked) == ["ds-decode-1", "ds-prefill-1"], children
            assert all(os.getsid(pid) == pid for pid in forked.values())
        else:
            assert not forked, children
        want = run_prompts(LLMEngine(tiny, EngineConfig(num_blocks=128, weights="int8", kv_dtype="int8")), ps, GREEDY)
        with Client(up.target, timeout_s=120, **up.client_tls) as c:
            for i, p in enumerate(ps):
                out = c.generate(p, max_tokens=12, temperature=0.0)
                if out.token_ids != want[str(i)]:
                    up.dump()
                assert out.token_ids == want[str(i)], f"request {i}"
                assert all(0 <= t < tiny.model.config.vocab_size for t in out.token_ids)
        logs = "".join(f.read_text(errors="replace") for f in up.logs.glob("*-1.log"))
        assert "int8" in logs, "workers did not report their weights format"
    finally:
        assert up.stop() == 0
