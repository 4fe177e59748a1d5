"""`distserve certs`: a development CA and one certificate per role, made with `cryptography`.

Layout of the output directory (keys 0600, the directory 0700):
    ca.pem, ca-key.pem                the CA (keep ca-key.pem off the serving hosts)
    <role>.pem, <role>-key.pem        for role in ROLES: router, prefill, decode, colocated, client
Each role certificate (ECDSA P-256, serverAuth + clientAuth) names its role in the SAN URI
`spiffe://distserve/role/<role>` (what rpc.tls.PeerRoles checks) and carries `distserve.internal`
(what internal channels verify), `localhost`, 127.0.0.1, ::1 and every `--host` given (the names and
addresses external clients use to reach the router). `client` is for SDK callers of a router that
asks for client certificates. Production deployments use their own PKI the same way.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from distserve.rpc.channels import INTERNAL_NAME
from distserve.rpc.tls import ROLE_URI

ROLES = ("router", "prefill", "decode", "colocated", "client")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class RoleFiles:
    ca: Path
    cert: Path
    key: Path

    def env(self) -> dict[str, str]:
        """The DISTSERVE_TLS_* variables a service of this role runs with."""
        return {"DISTSERVE_TLS_CA": str(self.ca), "DISTSERVE_TLS_CERT": str(self.cert), "DISTSERVE_TLS_KEY": str(self.key)}


def role_files(directory: str | Path, role: str) -> RoleFiles:
    d = Path(directory)
    return RoleFiles(d / "ca.pem", d / f"{role}.pem", d / f"{role}-key.pem")


def _name(common: str, unit: str = "") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "distserve")]
    if unit:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_certs(out: str | Path, hosts: Iterable[str] = (), *, days: int = 365, roles: Iterable[str] = ROLES) -> Path:
    """Writes a fresh CA and a certificate per role into `out`; returns it."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("distserve development CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(d / "ca.pem", ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(d / "ca-key.pem", _key_pem(ca_key), private=True)
    names = list(dict.fromkeys([INTERNAL_NAME, *DEFAULT_HOSTS, *hosts]))
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(role, role)).issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ROLE_URI + role),
                                                            *map(_san, names)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        files = role_files(d, role)
        _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(files.key, _key_pem(key), private=True)
    return d


def valid_for(directory: str | Path, hosts: Iterable[str], margin_days: float = 1.0) -> bool:
    """Whether `directory` holds a whole set that can be kept: ca.pem and every role's certificate and
    key, each certificate signed by that CA and matching its key, none within `margin_days` of its end,
    and the router's naming every host. A set cut short (an interrupted `make_certs`) is not valid."""
    d = Path(directory)
    try:
        ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        certs = {}
        for role in ROLES:
            files = role_files(d, role)
            cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
            key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
            cert.verify_directly_issued_by(ca)
            if cert.public_key() != key.public_key():
                return False
            certs[role] = cert
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    end = min(c.not_valid_after_utc for c in (ca, *certs.values()))
    if end - datetime.datetime.now(datetime.timezone.utc) <= datetime.timedelta(days=margin_days):
        return False
    san = certs["router"].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    wanted = {str(ipaddress.ip_address(h)) if _is_ip(h) else h for h in hosts}
    return wanted <= have


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
