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

import torch

from distserve.errors import InvalidRequest
from distserve.engine.kv_cache import KV_SCALE_BYTES
from distserve.v1 import common_pb2

# dtypes a KV tensor may have on the wire, by torch name.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32" (must be one of DTYPES)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InvalidRequest("dtype", f"unsupported KV dtype {name}; allowed: {', '.join(DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """"float32" -> torch.float32."""
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidRequest("dtype", f"unsupported KV dtype {name!r}; allowed: {', '.join(DTYPES)}") from None


def new_transfer_token() -> bytes:
    """16 random bytes that authorize pulling and releasing one lease."""
    return secrets.token_bytes(16)


@dataclass(frozen=True, slots=True)
class KvLayout:
    """How the engine stores KV, enough for a peer to receive it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per KV block in the engine's paged cache
    dtype: str  # torch dtype name, one of DTYPES

    def __post_init__(self) -> None:
        torch_dtype(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of one request's exported KV (int8: each row carries its block's fp32 scale too)."""
        last = self.head_dim + (KV_SCALE_BYTES if self.dtype == "int8" else 0)
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, last)

    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.shape(1)[-1] * itemsize

    def nbytes(self, num_tokens: int) -> int:
        return self.bytes_per_token() * num_tokens

    def to_proto(self) -> common_pb2.KvLayout:
        return common_pb2.KvLayout(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            block_size=self.block_size,
            dtype=self.dtype,
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.KvLayout) -> "KvLayout":
        return cls(msg.num_layers, msg.num_kv_heads, msg.head_dim, msg.block_size, msg.dtype)


@dataclass(frozen=True, slots=True)
class KvHandle:
    """Where one request's KV lives and how to pull it (mirrors common.proto KvHandle)."""

    request_id: str
    worker_id: str  # the holder
    kv_address: str  # host:port of the holder's KvTransfer service
    transports: tuple[str, ...]  # transports the holder offers, best first
    layout: KvLayout
    num_tokens: int  # tokens whose KV is held
    lease_expiry_unix: float  # the holder frees the KV after this unless released
    transfer_token: bytes = field(repr=False)  # required to pull or release
    host_id: str = ""  # holder's host, for same-host transports
    transport_params: dict[str, str] = field(default_factory=dict)  # per-transport endpoint details

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return self.layout.shape(self.num_tokens)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes(self.num_tokens)

    def to_proto(self) -> common_pb2.KvHandle:
        return common_pb2.KvHandle(
            request_id=self.request_id,
            worker_id=self.worker_id,
            kv_address=self.kv_address,
            transports=list(self.transports),
            layout=self.layout.to_proto(),
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
            layout=KvLayout.from_proto(msg.layout),
            num_tokens=msg.num_tokens,
            lease_expiry_unix=msg.lease_expiry_unix,
            transfer_token=msg.transfer_token,
            host_id=msg.host_id,
            transport_params=dict(msg.transport_params),
        )
