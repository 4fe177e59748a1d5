"""Which transports a worker sets up, from its settings and what this process can do.

Holder (prefill): gRPC always; gloo (KV on the CPU) or nccl (on CUDA); shm where /dev/shm is
writable; mooncake only when its wheel imports and RDMA devices exist, or when forced.
Puller (decode): the same set. A forced `kv_transport` narrows both to it and gRPC.
Every data-plane listener of theirs goes on one interface, `data_plane_host(bind, advertised)`.
"""

from __future__ import annotations

import logging

import torch

from distserve.kv.grpc_transport import GrpcKvTransport
from distserve.kv.push import KvSender
from distserve.kv.puller import offered
from distserve.kv.shm_transport import ShmKvSender, ShmKvTransport, shm_available
from distserve.kv.torch_transport import TorchKvSender, TorchKvTransport, available_backends
from distserve.kv.transport import KvTransports
from distserve.rpc.channels import ChannelPool

logger = logging.getLogger(__name__)

WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def data_plane_host(bind_host: str, advertise_host: str) -> str:
    """The interface the KV listeners use: the address the worker's gRPC server binds, or, when that
    is every interface, the address it advertises (the one its peers reach it at)."""
    return advertise_host if bind_host in WILDCARDS else bind_host


def available(device: torch.device, forced: str = "auto") -> tuple[str, ...]:
    names = ["grpc", *available_backends(device)]
    if shm_available():
        names.append("shm")
    from distserve.kv import mooncake_transport

    ok, why = mooncake_transport.status()
    if ok and (forced == "mooncake" or mooncake_transport.rdma_devices()):
        names.append("mooncake")
    elif forced == "mooncake":
        logger.warning("kv_transport=mooncake forced but unusable here: %s", why)
    return offered(tuple(names), forced)


def build_senders(names: tuple[str, ...], advertise_host: str, device: torch.device, idle_s: float, *,
                  bind_host: str = "") -> list[KvSender]:
    host = data_plane_host(bind_host, advertise_host)
    senders: list[KvSender] = []
    for name in names:
        if name in ("gloo", "nccl"):
            senders.append(TorchKvSender(name, host, device=device, idle_s=idle_s))
        elif name == "shm":
            senders.append(ShmKvSender(idle_s=idle_s))
        elif name == "mooncake":
            from distserve.kv.mooncake_transport import MooncakeKvSender

            senders.append(MooncakeKvSender(host))
    return senders


def build_pullers(names: tuple[str, ...], pool: ChannelPool, *, worker_id: str, device: torch.device, wire_dtype: str = "",
                  idle_s: float = 60.0, buffer_bytes: int = 1 << 30, advertise_host: str = "127.0.0.1",
                  bind_host: str = "") -> KvTransports:
    host = data_plane_host(bind_host, advertise_host)
    wire = "" if wire_dtype == "auto" else wire_dtype
    transports = KvTransports([GrpcKvTransport(pool, wire_dtype=wire, max_idle_bytes=buffer_bytes, idle_s=idle_s)])
    for name in names:
        if name in ("gloo", "nccl"):
            transports.register(TorchKvTransport(name, pool, host=host, worker_id=worker_id, device=device, wire_dtype=wire,
                                                 idle_s=idle_s, max_idle_bytes=buffer_bytes))
        elif name == "shm":
            transports.register(ShmKvTransport(pool, wire_dtype=wire, idle_s=idle_s, max_idle_bytes=buffer_bytes))
        elif name == "mooncake":
            from distserve.kv.mooncake_transport import MooncakeKvTransport

            transports.register(MooncakeKvTransport(pool, host, wire_dtype=wire, max_idle_bytes=buffer_bytes))
    return transports
