"""KV handle: what a prefill worker gives the router for a finished prompt, and decode pulls with.

Lifecycle: the prefill worker holds the KV under a lease (`distserve.kv.lease`), builds a `KvHandle`
(layout, token count, lease expiry, an unguessable transfer token from `new_transfer_token()`) and
returns it as `common_pb2.KvHandle`; the router passes it on untouched; the decode worker turns it
back into a `KvHandle` and pulls over a transport (`distserve.kv.transport`).
The KV of one request travels as one contiguous tensor [num_layers, 2, num_tokens, num_kv_heads,
head_dim] of `layout.dtype`. dtype "int8" is an int8 paged cache with per-block scales: each row then
has head_dim + 4 bytes, the codes followed by the fp32 scale of the token's cache block
(`distserve.engine.kv_cache` documents the format).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from distserve.errors import InvalidRequest
from distserve.engine.kv_cache import KVLayout, torch_dtype
from distserve.v1 import common_pb2

def new_transfer_token() -> bytes:
    """16 random bytes that authorize pulling and releasing one lease."""
    return secrets.token_bytes(16)


def layout_to_proto(layout: KVLayout) -> common_pb2.KvLayout:
    return common_pb2.KvLayout(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                               block_size=layout.block_size, dtype=layout.dtype_name)


def layout_from_proto(msg: common_pb2.KvLayout) -> KVLayout:
    """The layout a peer sent; an unknown dtype name is INVALID_ARGUMENT."""
    return KVLayout(msg.num_layers, msg.num_kv_heads, msg.head_dim, msg.block_size, torch_dtype(msg.dtype))


@dataclass(frozen=True, slots=True)
class KvHandle:
    """Where one request's KV lives and how to pull it (mirrors common.proto KvHandle)."""

    request_id: str
    worker_id: str  # the holder
    kv_address: str  # host:port of the holder's KvTransfer service
    transports: tuple[str, ...]  # transports the holder offers, best first
    layout: KVLayout  # the holder engine's (distserve.engine.kv_cache)
    num_tokens: int  # tokens whose KV is held
    lease_expiry_unix: float  # the holder frees the KV after this unless released
    transfer_token: bytes = field(repr=False)  # required to pull or release
    host_id: str = ""  # holder's host, for same-host transports
    transport_params: dict[str, str] = field(default_factory=dict)  # per-transport endpoint details

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return self.layout.export_shape(self.num_tokens)

    @property
    def nbytes(self) -> int:
        return self.layout.export_nbytes(self.num_tokens)

    def to_proto(self) -> common_pb2.KvHandle:
        return common_pb2.KvHandle(
            request_id=self.request_id,
            worker_id=self.worker_id,
            kv_address=self.kv_address,
            transports=list(self.transports),
            layout=layout_to_proto(self.layout),
            num_tokens=self.num_tokens,
            lease_expiry_unix=self.lease_expiry_unix,
            transfer_token=self.transfer_token,
            host_id=self.host_id,
            transport_params=dict(self.transport_params),
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.KvHandle) -> "KvHandle":
        if not msg.HasField("layout"):
            raise InvalidRequest("kv_handle.layout", "missing")
        return cls(
            request_id=msg.request_id,
            worker_id=msg.worker_id,
            kv_address=msg.kv_address,
            transports=tuple(msg.transports),
            layout=layout_from_proto(msg.layout),
            num_tokens=msg.num_tokens,
            lease_expiry_unix=msg.lease_expiry_unix,
            transfer_token=msg.transfer_token,
            host_id=msg.host_id,
            transport_params=dict(msg.transport_params),
        )
