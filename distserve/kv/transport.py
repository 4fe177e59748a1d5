"""The one interface every KV transport implements, and the choice of a transport per pair.

Lifecycle: a decode worker builds its transports at start and keeps them in a `KvTransports`
registry; for each request it calls `choose_transport(its offers, the handle's offers, same_host)`,
then `await transports.get(name).borrow(handle)` for the tensor (valid until `Pulled.release()`; `pull`
gives an owned copy), then releases the lease through the holder's KvTransfer.Release
(transport-independent). `close()` at shutdown.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from distserve.errors import InvalidRequest, Unavailable
from distserve.kv.handle import KvHandle

logger = logging.getLogger(__name__)

# Best first. "shm" needs both sides on one host; "nccl"/"gloo" are torch.distributed backends.
PREFERENCE: tuple[str, ...] = ("shm", "nccl", "mooncake", "gloo", "grpc")
SAME_HOST_ONLY = frozenset({"shm"})


@dataclass(slots=True)
class Pulled:
    """A pulled KV tensor that may live in a pooled receive buffer."""

    tensor: torch.Tensor  # handle.shape, handle.layout.dtype
    wire_bytes: int  # bytes that crossed the wire
    wire_dtype: str = ""  # "" = as held
    _release: Callable[[bool], None] | None = field(default=None, repr=False)

    def release(self, reuse: bool = True) -> None:
        """Done with the tensor. reuse=False when something may still read it (the buffer is then left to the GC)."""
        fn, self._release = self._release, None
        if fn is not None:
            fn(reuse)


class KvTransport(abc.ABC):
    """Moves one request's KV from its holder to here."""

    name: str  # one of PREFERENCE

    @abc.abstractmethod
    async def borrow(self, handle: KvHandle) -> Pulled:
        """The held tensor, bit-exact, shape handle.shape and dtype handle.layout.dtype, until `release()`.

        Raises NotFound if the lease is gone, Unavailable if the transfer failed.
        """

    async def pull(self, handle: KvHandle) -> torch.Tensor:
        """The held tensor as a copy of its own."""
        pulled = await self.borrow(handle)
        try:
            return pulled.tensor.clone()
        finally:
            pulled.release()

    async def close(self) -> None:
        """Release connections and buffers (default: nothing)."""


class KvTransports:
    """Transports of one worker by name."""

    def __init__(self, transports: Iterable[KvTransport] = ()):
        self._by_name: dict[str, KvTransport] = {}
        for transport in transports:
            self.register(transport)

    def register(self, transport: KvTransport) -> None:
        if transport.name not in PREFERENCE:
            raise InvalidRequest("transport", f"unknown transport {transport.name!r}; known: {', '.join(PREFERENCE)}")
        self._by_name[transport.name] = transport

    def get(self, name: str) -> KvTransport:
        try:
            return self._by_name[name]
        except KeyError:
            raise Unavailable(f"transport {name!r} is not set up here") from None

    def names(self) -> tuple[str, ...]:
        """Offered names, best first (what a worker advertises)."""
        return tuple(name for name in PREFERENCE if name in self._by_name)

    async def close(self) -> None:
        for transport in self._by_name.values():
            try:
                await transport.close()
            except Exception:
                logger.exception("closing KV transport %s failed", transport.name)


def choose_transport(
    local_offers: Iterable[str],
    remote_offers: Iterable[str],
    same_host: bool,
    forced: str | None = None,
) -> str:
    """The best transport both sides offer (shm only on one host); `forced` must be usable."""
    common = set(local_offers) & set(remote_offers)
    if not same_host:
        common -= SAME_HOST_ONLY
    if forced is not None:
        if forced not in PREFERENCE:
            raise InvalidRequest("transport", f"unknown transport {forced!r}; known: {', '.join(PREFERENCE)}")
        if forced not in common:
            raise Unavailable(f"transport {forced!r} is not usable between these workers (common: {sorted(common)})")
        return forced
    for name in PREFERENCE:
        if name in common:
            return name
    raise Unavailable(
        f"no common KV transport: local {sorted(set(local_offers))}, remote {sorted(set(remote_offers))}"
    )
