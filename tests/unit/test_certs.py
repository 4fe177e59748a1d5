"""`distserve certs` (distserve/rpc/certs.py): what make_certs writes (owner-only keys, each role's
certificate naming its role and `distserve.internal`, signed by the CA), when valid_for keeps a set,
and `--keep`, which the compose file's one-shot `certs` service runs at every start."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from distserve.cli import main
from distserve.rpc.certs import ROLES, make_certs, role_files, valid_for
from distserve.rpc.channels import INTERNAL_NAME
from distserve.rpc.tls import ROLE_URI

HOSTS = ("router.distserve.svc", "10.0.0.7")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return make_certs(tmp_path_factory.mktemp("tls") / "set", HOSTS)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def copy(certs: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(certs, tmp_path / "copy"))


def test_keys_are_owner_only_and_the_folder_is_private(certs):
    assert mode(certs) == 0o700
    assert mode(certs / "ca-key.pem") == 0o600 and mode(certs / "ca.pem") == 0o644
    for role in ROLES:
        f = role_files(certs, role)
        assert mode(f.key) == 0o600, role
        assert mode(f.cert) == 0o644, role


def test_each_role_certificate_names_its_role_and_the_internal_name_and_chains_to_the_ca(certs):
    ca = load(certs / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in ROLES:
        cert = load(role_files(certs, role).cert)
        cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ROLE_URI + role]
        dns = san.get_values_for_type(x509.DNSName)
        assert INTERNAL_NAME in dns and "localhost" in dns and "router.distserve.svc" in dns
        assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1", "10.0.0.7"}
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_valid_for_a_whole_set_naming_the_hosts(certs):
    assert valid_for(certs, HOSTS)
    assert valid_for(certs, ["router.distserve.svc"]) and valid_for(certs, [])
    assert valid_for(certs, ["0:0:0:0:0:0:0:1"])  # addresses compare as addresses
    assert not valid_for(certs, ["elsewhere.example"])
    assert not valid_for(certs.parent / "missing", [])


@pytest.mark.parametrize("gone", ["ca.pem", "decode.pem", "client-key.pem"])
def test_valid_for_refuses_a_set_with_a_file_missing(certs, tmp_path, gone):
    d = copy(certs, tmp_path)
    (d / gone).unlink()
    assert not valid_for(d, HOSTS)


def test_valid_for_refuses_certificates_of_another_ca_or_keys_that_do_not_match(certs, tmp_path):
    other = make_certs(tmp_path / "other", HOSTS)
    d = copy(certs, tmp_path)
    shutil.copy(other / "prefill.pem", d / "prefill.pem")  # same role, another CA (with its own key)
    shutil.copy(other / "prefill-key.pem", d / "prefill-key.pem")
    assert not valid_for(d, HOSTS)
    d = copy(certs, tmp_path / "swap")
    shutil.copy(certs / "decode-key.pem", d / "prefill-key.pem")  # the CA's certificate, the wrong key
    assert not valid_for(d, HOSTS)
    d = copy(certs, tmp_path / "torn")
    (d / "router.pem").write_text("-----BEGIN CERTIFICATE-----\ncut short")
    assert not valid_for(d, HOSTS)


def test_valid_for_refuses_a_set_near_its_end(tmp_path):
    d = make_certs(tmp_path / "short", days=2)
    assert valid_for(d, [])
    assert not valid_for(d, [], margin_days=3)


def test_keep_leaves_a_valid_set_alone_and_replaces_one_that_is_not(tmp_path, capsys):
    out = tmp_path / "tls"
    main(["certs", "--out", str(out), "--host", "router", "--keep"])  # nothing there yet: made
    first = (out / "ca.pem").read_bytes()
    assert valid_for(out, ["router"])
    main(["certs", "--out", str(out), "--host", "router", "--keep"])
    assert (out / "ca.pem").read_bytes() == first and "kept" in capsys.readouterr().out
    main(["certs", "--out", str(out), "--host", "router", "--host", "api.example", "--keep"])  # a new name: a new set
    second = (out / "ca.pem").read_bytes()
    assert second != first and valid_for(out, ["router", "api.example"])
    (out / "decode-key.pem").unlink()
    main(["certs", "--out", str(out), "--host", "router", "--keep"])  # incomplete: a new set
    assert (out / "ca.pem").read_bytes() != second and valid_for(out, ["router"])
    third = (out / "ca.pem").read_bytes()
    main(["certs", "--out", str(out), "--host", "router"])  # without --keep: always new
    assert (out / "ca.pem").read_bytes() != third
