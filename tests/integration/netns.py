"""Test hosts in network namespaces: a bridge in a switch namespace and one namespace per host with
one address on it (as compose gives each container one), for the multi-host and partition tests.

`Net(tag, subnet)` makes the switch; `host(name, octet)` adds a host at subnet.octet; `cut(name, peer,
on)` drops (or stops dropping) what a host sends to an address (iptables where present, else a
blackhole route: iproute2 only); `close()` deletes every namespace it made. Only namespaces and
addresses made here are touched. `sh` runs one command, raising CalledProcessError on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def require_netns() -> None:
    """Skips the test where namespaces cannot be made (not root, no iproute2)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not shutil.which("ip") or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        pytest.skip("`ip netns` (iproute2) is not available")


class Net:
    """A bridge in a switch namespace, and one namespace per host with one address on it."""

    def __init__(self, tag: str, subnet: str):
        self.tag, self.subnet = tag, subnet  # namespace name prefix; the /24's first three octets
        self.switch = f"{tag}-sw"
        self.hosts: dict[str, str] = {}  # name -> namespace
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")

    def host(self, name: str, octet: int) -> str:
        ns = f"{self.tag}-{name}"
        sh("ip", "netns", "add", ns)
        self.hosts[name] = ns
        port = f"p{octet}"
        sh("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{self.subnet}.{octet}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def cut(self, name: str, peer: str, on: bool) -> None:
        """Drop what host `name` sends to address `peer` (on=True), or stop dropping it (on=False)."""
        if shutil.which("iptables"):
            sh("ip", "netns", "exec", self.hosts[name], "iptables", "-w", "-I" if on else "-D", "OUTPUT", "-d", peer, "-j", "DROP")
        else:
            sh("ip", "-n", self.hosts[name], "route", "add" if on else "del", "blackhole", f"{peer}/32")

    def close(self) -> None:
        for ns in [*self.hosts.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
