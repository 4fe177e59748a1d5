"""Which interface the KV transports are given: the bind address, or the advertised one when the
worker binds every interface; Mooncake (a stand-in module here: the wheel does not import on this
machine) advertises that host and warns that it listens everywhere anyway."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from distserve.kv import factory
from distserve.kv.factory import data_plane_host


@pytest.mark.parametrize("bind, advertised, want", [
    ("127.0.0.1", "127.0.0.1", "127.0.0.1"),
    ("10.0.0.5", "decode-1.example", "10.0.0.5"),  # a specific bind address wins over the advertised name
    ("0.0.0.0", "decode-1.example", "decode-1.example"),  # every interface: the one peers reach
    ("::", "10.0.0.6", "10.0.0.6"),
    ("", "10.0.0.7", "10.0.0.7"),
])
def test_data_plane_host(bind, advertised, want):
    assert data_plane_host(bind, advertised) == want


def test_torch_transports_get_the_data_plane_host():
    senders = factory.build_senders(("gloo",), "decode-1.example", torch.device("cpu"), 60.0, bind_host="127.0.0.2")
    assert [s.host for s in senders] == ["127.0.0.2"] and senders[0].params() == {}  # no store address: none listens
    pullers = factory.build_pullers(("gloo",), None, worker_id="w", device=torch.device("cpu"), advertise_host="127.0.0.3",
                                    bind_host="0.0.0.0")
    assert pullers.get("gloo").host == "127.0.0.3"


class _FakeEngine:
    initialized: list[tuple] = []

    def initialize(self, *args):
        _FakeEngine.initialized.append(args)
        return 0

    def get_rpc_port(self):
        return 15123


def test_mooncake_advertises_the_data_plane_host_and_warns(monkeypatch, caplog):
    pkg = types.ModuleType("mooncake")
    pkg.engine = types.ModuleType("mooncake.engine")
    pkg.engine.TransferEngine = _FakeEngine
    monkeypatch.setitem(sys.modules, "mooncake", pkg)
    monkeypatch.setitem(sys.modules, "mooncake.engine", pkg.engine)
    with caplog.at_level(logging.WARNING, logger="distserve.kv.mooncake_transport"):
        (sender,) = factory.build_senders(("mooncake",), "prefill-1.example", torch.device("cpu"), 60.0, bind_host="10.0.0.5")
    assert _FakeEngine.initialized[-1][:2] == ("10.0.0.5", "P2PHANDSHAKE")
    assert sender.params() == {"mooncake": "10.0.0.5:15123"}
    assert "listens on every interface" in caplog.text and "keep its network isolated" in caplog.text
