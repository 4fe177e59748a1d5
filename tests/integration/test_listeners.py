"""What `distserve up` listens on, read from /proc as `ss -ltnp` would: exactly the ports it means to
open (Redis; per worker its gRPC and metrics ports; per router its gRPC, HTTP and metrics ports), all on
the interface asked for, before and after requests moved KV between the workers - no torch.distributed
store, no stray listener on every interface."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import pytest

from distserve.client import Client
from distserve.up import UpProcess

pytestmark = pytest.mark.timeout(300)

READY = re.compile(r"^READY (\S+) (\S+):(\d+) metrics=(\d*)(?: http=(\d+))?$", re.M)


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo.extend(children.get(p, []))
    return found


def _addr(hex_addr: str) -> tuple[str, int]:
    ip, port = hex_addr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        host = str(ipaddress.IPv4Address(raw[::-1]))
    else:  # four little-endian 32-bit words; gRPC binds 127.0.0.1 as ::ffff:127.0.0.1, the same interface
        v6 = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        host = str(v6.ipv4_mapped or v6)
    return host, int(port, 16)


def listening(pids: set[int]) -> dict[tuple[str, int], set[int]]:
    """(host, port) of every listening TCP socket the processes hold -> their pids."""
    out: dict[tuple[str, int], set[int]] = {}
    for pid in pids:
        try:
            inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                      if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
            tables = [Path(f"/proc/{pid}/net/{t}").read_text().splitlines()[1:] for t in ("tcp", "tcp6")]
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited meanwhile
        for line in (row for table in tables for row in table):
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN, and this process's socket
                out.setdefault(_addr(f[1]), set()).add(pid)
    return out


def intended(up: UpProcess) -> set[tuple[str, int]]:
    want = {("127.0.0.1", int(up.redis_address.rsplit(":", 1)[1].split("/")[0]))}
    for log in up.logs.glob("*.log"):
        for m in READY.finditer(log.read_text(errors="replace")):
            host = m.group(2)
            want.add((host, int(m.group(3))))
            want |= {(host, int(p)) for p in (m.group(4), m.group(5)) if p}
    return want


@pytest.mark.parametrize("transport", ["auto", "gloo"])
def test_up_listens_only_where_it_means_to(tmp_path, transport):
    up = UpProcess(tmp_path, "--model", "tiny-llama", "--prefill", "1", "--decode", "1", f"--worker-arg=--kv-transport={transport}")
    try:
        want = intended(up)
        assert len(want) == 1 + 2 * 2 + 3  # redis; gRPC + metrics per worker; gRPC + HTTP + metrics for the router
        before = listening(descendants(up.proc.pid))
        with Client(up.target, timeout_s=60, **up.client_tls) as c:
            for i in range(4):  # KV moves prefill -> decode over the transport the pair agrees on
                out = c.generate([5 + i] * 40, max_tokens=4, temperature=0.0, ignore_eos=True)
                assert out.metrics.kv_bytes > 0 and out.metrics.kv_transport == ("shm" if transport == "auto" else transport)
        after = listening(descendants(up.proc.pid))
        workers = {up.status()[name]["pid"] for name in ("prefill-1", "decode-1")}
        if transport == "gloo":  # gloo's pair sockets, one per side, for the pair's life: on the workers' host only
            pair = {a for a, pids in after.items() if a not in want}
            assert len(pair) == 2 and all(after[a] <= workers for a in pair), after
        else:
            pair = set()
        for seen, meant in ((before, want), (after, want | pair)):
            assert set(seen) == meant, f"unexpected: {set(seen) - meant}; missing: {meant - set(seen)}"
            assert {host for host, _ in seen} == {"127.0.0.1"}
    except BaseException:
        up.dump()
        raise
    finally:
        up.stop()
