"""The torch transports' rendezvous store: where it listens, for how long, and what it gives away.

A pair's store listens on the worker's data-plane host only (never a wildcard) and only until the
pair is built; a pull over gloo between real processes leaves no store listener on either side. A
client without the pair's secret can connect while it listens and list and read keys (TCPStore has
no authentication), but sees only opaque names, cannot plant keys ahead of a rank, cannot join as a
rank, and a value it forges makes the rendezvous fail rather than pair with it.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import os
import socket
import threading
import time

import grpc
import pytest
import torch
import torch.distributed as dist

from distserve.bench.kv_peer import Peer, random_kv
from distserve.errors import InvalidRequest
from distserve.kv import rendezvous
from distserve.kv.rendezvous import PairStore, split_address
from distserve.kv.torch_transport import TorchKvSender, TorchKvTransport, make_group
from distserve.rpc.channels import ChannelPool
from distserve.v1 import kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(120)

WILDCARD_ADDRS = ("0.0.0.0", "::")


def _addr(hex_addr: str) -> tuple[str, int]:
    ip, port = hex_addr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # /proc/net/tcp6: four host-order words
    ip6 = socket.inet_ntop(socket.AF_INET6, words)
    return ip6.removeprefix("::ffff:") if "." in ip6 else ip6, int(port, 16)  # v4-mapped: the IPv4 address


def listening(pid: int | None = None) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket, or only those `pid` owns."""
    inodes = None
    if pid is not None:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and (inodes is None or cols[9] in inodes):  # 0A: LISTEN
                    out.append(_addr(cols[1]))
    return out


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return exc.errno == errno.ECONNREFUSED
    return False


def second_loopback() -> str:
    """127.0.0.2: on Linux all of 127/8 is loopback, so a listener there is not reachable at 127.0.0.1."""
    try:
        socket.create_server(("127.0.0.2", 0)).close()
    except OSError:
        pytest.skip("127.0.0.2 is not a local address here")
    return "127.0.0.2"


def test_the_store_listens_on_the_given_address_only_and_not_after_close():
    host = second_loopback()
    store = PairStore.serve(host, 10)
    _, port = split_address(store.address)
    try:
        assert store.address == f"{host}:{port}"
        assert [a for a in listening() if a[1] == port] == [(host, port)]  # no 0.0.0.0 / :: twin
        assert refused("127.0.0.1", port)  # another address of the same host: nobody there
        client = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=5))
        client.set("k", b"v")
        del client
    finally:
        store.close()
    time.sleep(0.2)
    assert [a for a in listening() if a[1] == port] == [] and refused(host, port)


def test_a_pull_over_gloo_leaves_no_store_listener_on_either_side(monkeypatch):
    served = []
    real = PairStore.serve.__func__
    monkeypatch.setattr(PairStore, "serve", classmethod(lambda cls, *a: served.append(real(cls, *a)) or served[-1]))
    here_before = set(listening(os.getpid()))
    with Peer(transports="gloo") as p:
        shape = (2, 2, 16, 2, 8)
        handle = p.hold("r", shape, "float32", seed=3)
        holder_before = listening(p.pid)
        assert not [a for a in holder_before if a[0] in WILDCARD_ADDRS], holder_before  # the old store sat on [::]

        async def main():
            pool = ChannelPool()
            t = TorchKvTransport("gloo", pool, host="127.0.0.1", worker_id="test-decode")
            try:
                pulled = await t.borrow(handle)
                assert torch.equal(pulled.tensor, random_kv(shape, torch.float32, 3))
                pulled.release()
                assert t.pairs() == 1
                return set(listening(os.getpid())) - here_before, listening(p.pid)
            finally:
                await t.close()
                await pool.close_all()

        here, there = asyncio.run(main())
    assert len(served) == 1 and served[0].closed
    _, store_port = split_address(served[0].address)
    assert store_port not in [port for _, port in here]
    # what remains while the pair lives: gloo's pair sockets, each on its side's data-plane host
    assert here and all(a == "127.0.0.1" for a, _ in here), here
    assert all(a == "127.0.0.1" for a, _ in there), there
    assert len(there) == len(holder_before) + 1  # the holder's gloo pair listener; no store


def _rank(store: dist.Store, rank: int, out: dict, timeout_s: float) -> threading.Thread:
    def run():
        try:
            out[rank] = make_group(store, rank, "gloo", timeout_s, torch.device("cpu"), "127.0.0.1")
        except Exception as exc:
            out[rank] = exc

    t = threading.Thread(target=run)
    t.start()
    return t


def _attacker(store: PairStore) -> dist.TCPStore:
    """A TCPStore client of the pair's store, as anyone who reaches its port can make one: no secret."""
    host, port = split_address(store.address)
    return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=5))


def _first_keys(client: dist.TCPStore) -> list[str]:
    deadline = time.monotonic() + 10
    while not (keys := client.list_keys()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return keys


def _exchange(pg0, pg1) -> torch.Tensor:
    got = torch.zeros(4)
    recv = pg1.recv([got], 0, 0)
    pg0.send([torch.arange(4.0)], 1, 0).wait()
    recv.wait()
    return got


def test_without_the_secret_a_client_sees_opaque_names_and_its_planted_keys_change_nothing():
    store = PairStore.serve("127.0.0.1", 10)
    params = store.params()
    out: dict = {}
    puller = _rank(store, 1, out, 10)
    attacker = _attacker(store)
    keys = _first_keys(attacker)
    # what it can do: list the names and read the values (TCPStore authenticates nobody)
    assert len(keys) == 1 and keys[0].startswith("kv/") and len(keys[0]) == 3 + 32
    assert "0/1" not in keys[0] and params["secret"] not in keys[0]
    assert len(attacker.get(keys[0])) > 32  # gloo's address record, behind its 32-byte tag
    # what it cannot do: plant rank 0's key under any name gloo would use without the secret
    for name in ("0/0", "/0/0", "kv/0/0", "default_pg/0/0"):
        attacker.set(name, b"\x00" * 64)
    holder = PairStore.join(params["store"], bytes.fromhex(params["secret"]), 10)
    _rank(holder, 0, out, 10).join()
    puller.join()
    assert not isinstance(out[0], Exception) and not isinstance(out[1], Exception), out
    assert torch.equal(_exchange(out[0], out[1]), torch.arange(4.0))
    store.close()
    holder.close()
    for pg in (out[0], out[1]):
        pg.abort()


def test_without_the_secret_a_client_cannot_join_as_a_rank():
    store = PairStore.serve("127.0.0.1", 3)
    out: dict = {}
    puller = _rank(store, 1, out, 3)
    impostor = PairStore.join(store.address, os.urandom(rendezvous.SECRET_BYTES), 3)
    _rank(impostor, 0, out, 3).join()
    puller.join()
    assert isinstance(out[0], Exception) and isinstance(out[1], Exception), out  # both waited for keys never written
    store.close()
    impostor.close()


def test_a_forged_value_fails_the_rendezvous_instead_of_pairing_with_the_forger():
    store = PairStore.serve("127.0.0.1", 10)
    params = store.params()
    out: dict = {}
    puller = _rank(store, 1, out, 10)
    attacker = _attacker(store)
    (name,) = _first_keys(attacker)
    attacker.set(name, b"\x00" * 32 + b"an address of the attacker's choosing")  # overwrite rank 1's record
    holder = PairStore.join(params["store"], bytes.fromhex(params["secret"]), 10)
    _rank(holder, 0, out, 10).join()
    puller.join()
    assert isinstance(out[0], Exception) and "not written by this pair" in str(out[0]), out
    store.close()
    holder.close()


def test_connect_without_a_store_and_secret_is_an_invalid_request():
    sender = TorchKvSender("gloo", "127.0.0.1")
    for params in ({}, {"store": "127.0.0.1:1"}, {"store": "127.0.0.1:1", "secret": "zz"}, {"store": "127.0.0.1:1", "secret": "00" * 8}):
        request = kv_pb2.ConnectKvRequest(transport="gloo", channel="c1", peer_id="p", params=params)
        with pytest.raises(InvalidRequest):
            asyncio.run(sender.connect(request))
    assert sender.pairs() == 0


def test_the_holder_dials_only_endpoints_on_the_callers_host():
    """Connect names the store the holder joins: an address on another host (even another loopback
    address) is refused before anything is dialed; the caller's own host, by IP or name, gets through
    to the store checks."""
    with Peer(transports="gloo") as p, grpc.insecure_channel(p.address) as ch:
        stub = kv_pb2_grpc.KvTransferStub(ch)
        for store, code in (("127.0.0.2:9", grpc.StatusCode.PERMISSION_DENIED), ("10.255.255.1:9", grpc.StatusCode.PERMISSION_DENIED),
                            ("127.0.0.1:9", grpc.StatusCode.INVALID_ARGUMENT), ("localhost:9", grpc.StatusCode.INVALID_ARGUMENT)):
            request = kv_pb2.ConnectKvRequest(transport="gloo", channel="c1", peer_id="p", params={"store": store, "secret": "zz"})
            with pytest.raises(grpc.RpcError) as refused:
                stub.Connect(request, timeout=10)
            assert refused.value.code() == code, (store, refused.value.details())
