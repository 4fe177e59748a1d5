"""The rendezvous store of one torch.distributed pair: it exists only while the pair forms.

torch's TCPStore has no authentication, lets any client list, read, write and delete every key,
and, left to itself, listens on every interface ([::], whatever host it is given). So no worker
keeps one open. Instead, per pair:

  puller: `PairStore.serve(host)` binds a socket on the worker's data-plane host only (ephemeral
          port) and hands it to a TCPStore server; a fresh 128-bit secret goes with it
          -> `params()` (address + secret) travel to the holder in KvTransfer.Connect, over the
          control plane (authenticated gRPC), and nowhere else
  holder: `PairStore.join(address, secret)` connects as a client
  both:   build their rank of the group over the PairStore, then `close()` it; the puller's close
          drops the server: its listener and every connection to it are gone. gloo is done with the
          store once both ranks are built; NCCL exchanges its unique id there at the pair's first
          send/recv, so an nccl pair closes it after its first transfer.

Every key gloo or NCCL writes is stored under HMAC(secret, key) and its value carries an
HMAC(secret, key, value) tag that `get` checks. What the store still exposes, while it listens
(one rendezvous, normally milliseconds; after a failed Connect, until the puller's rank that still
waits in it times out): anyone who can reach host:port can connect, list the key names (tags only:
no channel id, nothing that says which workers pair), read the values (gloo's pair addresses or
NCCL's unique id, in clear), and overwrite or delete them. A forged or replayed value
fails its tag and the rendezvous fails (the pull falls back to gRPC, logged and counted): denial of
service, never a hijack. The name of a key not yet written cannot be guessed, so nothing can be
planted ahead of a rank. After close() there is nothing to reach.
Out of scope here: gloo's pair sockets (bound to the same host, open for the pair's life) and NCCL
traffic are unauthenticated and unencrypted; keep the data-plane network isolated.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets
import socket

import torch.distributed as dist

SECRET_BYTES = 16
_TAG_BYTES = hashlib.sha256().digest_size


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def listen_socket(host: str) -> socket.socket:
    """A listening TCP socket on `host` (a name is resolved) and an ephemeral port, never a wildcard."""
    family, _, _, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    return socket.create_server(addr, family=family)


class PairStore(dist.Store):
    """One pair's view of a TCPStore: keys renamed and values tagged with the pair's secret."""

    def __init__(self, store: dist.Store, secret: bytes, address: str):
        super().__init__()
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a pair secret has {SECRET_BYTES} bytes, got {len(secret)}")
        self._store: dist.Store | None = store
        self._secret = secret
        self.address = address  # host:port of the server, what the holder dials

    @classmethod
    def serve(cls, host: str, timeout_s: float) -> PairStore:
        """The server end, listening on `host` only, with a new secret."""
        sock = listen_socket(host)
        bound, port = sock.getsockname()[:2]
        fd = sock.detach()  # the store owns the fd from here and closes it with its listener
        store = dist.TCPStore(bound, port, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False, master_listen_fd=fd)
        return cls(store, secrets.token_bytes(SECRET_BYTES), join_address(bound, port))

    @classmethod
    def join(cls, address: str, secret: bytes, timeout_s: float) -> PairStore:
        host, port = split_address(address)
        return cls(dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s)), secret, address)

    def params(self) -> dict[str, str]:
        """What the holder needs to join: only ever sent over the control plane."""
        return {"store": self.address, "secret": self._secret.hex()}

    def close(self) -> None:
        """Drops the store: a server stops listening, a client disconnects (calls still running finish)."""
        self._store = None

    @property
    def closed(self) -> bool:
        return self._store is None

    # -- what gloo and NCCL call ----------------------------------------------------------------
    def set(self, key: str, value) -> None:
        value = _bytes(value)
        self._inner().set(self._name(key), self._tag(key, value) + value)

    def get(self, key: str) -> bytes:
        raw = bytes(self._inner().get(self._name(key)))
        tag, value = raw[:_TAG_BYTES], raw[_TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(key, value)):
            raise RuntimeError(f"rendezvous key {key!r} was not written by this pair (forged or stale)")
        return value

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        names = [self._name(k) for k in keys]
        if timeout is None:
            self._inner().wait(names)
        else:
            self._inner().wait(names, timeout)

    def check(self, keys: list[str]) -> bool:
        # a closed store holds nothing (NCCL's watchdog polls check() for the pair's life)
        store = self._store
        return store is not None and store.check([self._name(k) for k in keys])

    def delete_key(self, key: str) -> bool:
        return self._inner().delete_key(self._name(key))

    def add(self, key: str, amount: int) -> int:  # a counter: renamed, not tagged (the server adds)
        return self._inner().add(self._name(key), amount)

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._inner().set_timeout(timeout)

    def _inner(self) -> dist.Store:
        store = self._store
        if store is None:
            raise RuntimeError("the pair's rendezvous store is closed")
        return store

    def _name(self, key: str) -> str:
        return "kv/" + hmac.new(self._secret, b"name\0" + key.encode(), hashlib.sha256).hexdigest()[:32]

    def _tag(self, key: str, value: bytes) -> bytes:
        return hmac.new(self._secret, b"value\0" + key.encode() + b"\0" + value, hashlib.sha256).digest()


def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)
