"""TLS on every gRPC server and channel, and the roles that certificates name.

Every distserve certificate is signed by the suite's CA and names its holder's role in a SPIFFE URI
SAN, `spiffe://distserve/role/<role>` (`distserve certs` makes them; docs/security.md). With TLS set
(`--tls-ca/--tls-cert/--tls-key`, `DISTSERVE_TLS_*`):
- a worker's server asks every caller for a certificate from the CA (mutual TLS) and `PeerRoles`
  lets only the roles in `WORKER_CALLERS` call each service: routers call Prefill and Decode, decode
  and colocated workers pull KV; health and reflection are open to any peer with a valid certificate;
- a router's server is TLS, with client certificates optional unless asked (its callers hold API keys);
- internal channels present the process's own certificate and check the peer's against the CA under
  one name, `distserve.internal`, which every certificate carries: workers are dialed by whatever
  address they advertise (pod IPs, compose service names), and which peer is dialed comes from the
  registry, not from a request (services/decode/peers.py).
Without TLS settings everything stays plaintext, as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
import grpc

from distserve.config import setting
from distserve.errors import InvalidRequest
from distserve.rpc.handlers import before_handler

ROLE_URI = "spiffe://distserve/role/"

# Which roles may call which worker service, or one method of it (the more specific entry wins;
# mutual TLS only; health and reflection: any valid peer). Routers release the KV of requests whose
# clients left before a decode worker took it.
WORKER_CALLERS: Mapping[str, frozenset[str]] = {
    "distserve.v1.Prefill": frozenset({"router"}),
    "distserve.v1.Decode": frozenset({"router"}),
    "distserve.v1.KvTransfer": frozenset({"decode", "colocated"}),
    "distserve.v1.KvTransfer/Release": frozenset({"decode", "colocated", "router"}),
}


@dataclasses.dataclass(frozen=True, slots=True)
class TlsSettings:
    """The TLS files of a service (a base of the worker's and the router's settings)."""

    tls_ca: str = setting("", "CA certificate (PEM) that peers' certificates must chain to; with tls_cert and tls_key turns TLS on (`distserve certs` makes a set)")
    tls_cert: str = setting("", "this process's certificate (PEM), naming its role (spiffe://distserve/role/<role>)")
    tls_key: str = setting("", "this process's private key (PEM), readable only by its owner")

    def tls_problems(self) -> list[str]:
        """What is wrong with the TLS files, each named, for the settings' validation."""
        try:
            Tls.load(self.tls_ca, self.tls_cert, self.tls_key, need_cert=True)
        except InvalidRequest as exc:
            return [str(exc)]
        return []

    def tls(self) -> "Tls | None":
        return Tls.load(self.tls_ca, self.tls_cert, self.tls_key, need_cert=True)


def _read(setting_name: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequest(setting_name, f"cannot read {path!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise InvalidRequest(setting_name, f"{path!r} is not PEM")
    return data


@dataclasses.dataclass(frozen=True, slots=True)
class Tls:
    ca: bytes  # PEM of the CA that peers must chain to
    cert: bytes = b""  # PEM chain of our own certificate (b"": a client without one)
    key: bytes = b""

    @classmethod
    def load(cls, ca: str = "", cert: str = "", key: str = "", *, need_cert: bool = False) -> "Tls | None":
        """From files; None when none is named. Raises InvalidRequest naming the setting at fault."""
        if not (ca or cert or key):
            return None
        if not ca:
            raise InvalidRequest("tls_ca", "a CA certificate is needed with tls_cert/tls_key")
        if cert and not key:
            raise InvalidRequest("tls_key", "the private key of tls_cert is needed with it")
        if key and not cert:
            raise InvalidRequest("tls_cert", "the certificate of tls_key is needed with it")
        if need_cert and not cert:
            raise InvalidRequest("tls_cert", "a service needs its own certificate and key (tls_cert, tls_key) with tls_ca")
        return cls(_read("tls_ca", ca), _read("tls_cert", cert) if cert else b"", _read("tls_key", key) if key else b"")

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        if not self.cert:
            raise InvalidRequest("tls_cert", "a server needs its own certificate and key")
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=require_client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key or None, self.cert or None)


def peer_role(context: grpc.aio.ServicerContext) -> str | None:
    """The role the caller's certificate names, or None (no certificate, or not one of ours)."""
    for uri in context.auth_context().get("peer_spiffe_id", ()):
        text = uri.decode(errors="replace")
        if text.startswith(ROLE_URI):
            return text[len(ROLE_URI):]
    return None


class PeerRoles(grpc.aio.ServerInterceptor):
    """Lets each listed service (`pkg.Service`) or method (`pkg.Service/Method`) be called only by the
    roles given for it (by their certificates); a caller without one gets UNAUTHENTICATED, one of
    another role PERMISSION_DENIED."""

    def __init__(self, callers: Mapping[str, frozenset[str]]):
        # "/pkg.Service/Method" exactly, or "/pkg.Service/" as a prefix; the longest match wins
        self.callers = sorted(((f"/{name}" if "/" in name else f"/{name}/", roles) for name, roles in callers.items()),
                              key=lambda item: -len(item[0]))

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        roles = next((r for name, r in self.callers if method == name or (name.endswith("/") and method.startswith(name))), None)
        if handler is None or roles is None:
            return handler

        async def check(request, context) -> None:
            role = peer_role(context)
            if role is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method} needs a distserve client certificate")
            if role not in roles:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{method} is not for the {role!r} role (allowed: {', '.join(sorted(roles))})")

        return before_handler(handler, check)
