"""API keys for the router's public APIs: `authorization: Bearer <key>` on gRPC and HTTP.

Keys come from a file (one a line; `#` starts a comment; a line `sha256:<hex>` is a key given by its
hash, so the file need not hold the key itself) and/or a comma-separated list (the router's
`DISTSERVE_API_KEYS`). Only SHA-256 hashes are kept in memory, and a presented key is hashed and
compared to each with `hmac.compare_digest`. With no keys configured, nothing is checked.

On gRPC, `ApiKeyInterceptor` guards the listed services (the router's Generation); health and
reflection stay open for probes. A missing or wrong key is UNAUTHENTICATED; the HTTP API answers 401
(services/router/http.py).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

import grpc

from distserve.errors import InvalidRequest
from distserve.rpc.handlers import before_handler

AUTH_HEADER = "authorization"


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, hashes: Iterable[bytes] = ()):
        self._hashes = tuple(hashes)

    @classmethod
    def load(cls, file: str = "", inline: str = "") -> "ApiKeys":
        """From a key file and/or a comma-separated list; raises InvalidRequest naming what is wrong."""
        hashes = [_hash(k.strip()) for k in inline.split(",") if k.strip()]
        if file:
            try:
                lines = Path(file).read_text().splitlines()
            except OSError as exc:
                raise InvalidRequest("api_keys_file", f"cannot read {file!r}: {exc.strerror}") from None
            for n, line in enumerate(lines, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                if line.startswith("sha256:"):
                    try:
                        digest = bytes.fromhex(line[len("sha256:"):])
                    except ValueError:
                        digest = b""
                    if len(digest) != 32:
                        raise InvalidRequest("api_keys_file", f"line {n}: sha256: must be followed by 64 hex digits")
                    hashes.append(digest)
                else:
                    hashes.append(_hash(line))
        return cls(hashes)

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    def allows(self, authorization: str | None) -> bool:
        """Whether an `authorization` value ("Bearer <key>") carries a known key (always, when none are set)."""
        if not self._hashes:
            return True
        if not authorization:
            return False
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        presented = _hash(key.strip())
        found = False
        for h in self._hashes:  # every hash compared, in constant time each
            found |= hmac.compare_digest(presented, h)
        return found


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata that carries `key`."""
    return ((AUTH_HEADER, f"Bearer {key}"),)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for calls to `services` without a known key; other services pass."""

    def __init__(self, keys: ApiKeys, services: Iterable[str]):
        self.keys = keys
        self.prefixes = tuple(f"/{s}/" for s in services)

    async def intercept_service(self, continuation, handler_call_details):
        if not self.keys.enabled or not handler_call_details.method.startswith(self.prefixes):
            return await continuation(handler_call_details)
        md = dict(handler_call_details.invocation_metadata or ())
        if self.keys.allows(md.get(AUTH_HEADER)):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        why = "missing API key (authorization: Bearer <key>)" if not md.get(AUTH_HEADER) else "invalid API key"

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        return before_handler(handler, refuse)
