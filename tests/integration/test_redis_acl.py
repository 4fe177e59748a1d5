"""Redis with distserve's ACL users (issue 13), against a real redis-server this test starts: a client
without the password, or with a wrong one, is refused; each role's user runs that role's real state
code (registry heartbeats, request state, router presence and the reaper) and is refused what its code
never sends; a restart brings the same users back; the passwords never reach redis-server's argv; a
rediss:// URL with the CA in its query string reaches Redis over TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from distserve.state.acl import ROLES, acl_file, main as acl_main, make_passwords, user_url, without_credentials
from distserve.state.connect import connect
from distserve.state.redis_server import RedisServer
from distserve.state.registry import Heartbeat, Registry, WorkerInfo, WorkerLoad
from distserve.state.requests import RequestPhase, RequestStateStore, inflight_key
from distserve.state.routers import RouterHeartbeat, RouterInfo, reap_orphans

pytestmark = pytest.mark.timeout(60)

WORKERS = ("prefill", "decode", "colocated")
SCRIPT_REFUSED = r"(?i)NOPERM|no permissions|can't run|can't access"  # Redis 7's words, then Redis 6's


def password(url: str) -> str:
    return urlsplit(url).password


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer(acl=True) as s:
        yield s


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(server.admin_url, socket_timeout=2)
    r.flushall()
    r.acl_log_reset()
    yield r
    r.close()


def info(worker_id: str, role: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, address="127.0.0.1:5001", kv_address="127.0.0.1:5001",
                      model="tiny-llama", host_id="h", transports=("grpc",), total_blocks=64, block_size=16,
                      max_model_len=512, started_at=time.time())


def test_a_client_without_the_password_or_with_a_wrong_one_is_refused(server: RedisServer, admin: redis.Redis) -> None:
    with pytest.raises(AuthenticationError, match="Authentication required"):  # NOAUTH
        redis.Redis.from_url(server.url, socket_timeout=2, protocol=2).get("distserve:workers")
    with pytest.raises(AuthenticationError, match="authenticated"):  # RESP3's HELLO, unauthenticated
        redis.Redis.from_url(server.url, socket_timeout=2, protocol=3).get("distserve:workers")
    with pytest.raises(AuthenticationError):  # `default` is off, with or without a password
        redis.Redis.from_url(user_url(server.url, "default", "x"), socket_timeout=2).ping()
    for user in ("admin", *ROLES):
        with pytest.raises(AuthenticationError, match="invalid username-password pair"):
            redis.Redis.from_url(user_url(server.url, user, "not-the-password"), socket_timeout=2).ping()
    with pytest.raises(AuthenticationError, match="invalid username-password pair"):  # one role's password is not another's
        redis.Redis.from_url(user_url(server.url, "router", password(server.role_url("prefill"))), socket_timeout=2).ping()
    # through the services' own client, a refused login is a Redis the caller cannot use: Unavailable
    from distserve.errors import Unavailable

    async def register_without_password() -> None:
        r = connect(server.url, role="prefill")
        try:
            await Registry(r).register(info("p-x", "prefill"), WorkerLoad(), 5)
        finally:
            await r.aclose()

    with pytest.raises(Unavailable, match="authenticated"):
        asyncio.run(register_without_password())
    assert admin.smembers("distserve:workers") == set()


@pytest.mark.parametrize("role", WORKERS)
def test_a_worker_user_runs_its_heartbeat_and_nothing_else(server: RedisServer, admin: redis.Redis, role: str) -> None:
    async def body() -> None:
        r = connect(server.role_url(role), role=role)
        try:
            beat = Heartbeat(Registry(r), info(f"{role}-1", role), lambda: WorkerLoad(free_blocks=7), interval_s=0.05, ttl_s=2)
            assert await beat.start()
            await asyncio.sleep(0.2)
            assert beat.failures == 0 and beat.last_ok > 0
            assert admin.hget(f"distserve:worker:{role}-1", "info") is not None
            admin.delete(f"distserve:worker:{role}-1")  # as a Redis restart would: the next beat writes it back
            await asyncio.sleep(0.2)
            assert beat.failures == 0 and admin.exists(f"distserve:worker:{role}-1")
            await beat.stop()  # deregisters
            assert not admin.exists(f"distserve:worker:{role}-1") and admin.smembers("distserve:workers") == set()
            assert admin.acl_log() == []  # nothing its code (or redis-py on connecting) sent was refused

            refused = [
                ("FLUSHALL",), ("CONFIG", "SET", "maxmemory", "1"), ("ACL", "WHOAMI"), ("ACL", "SETUSER", role, "+@all"),
                ("KEYS", "*"), ("SCAN", "0"), ("SHUTDOWN", "NOSAVE"), ("EVAL", "return 1", "0"), ("PUBLISH", "distserve", "x"),
                ("SUBSCRIBE", "distserve"), ("HSET", "distserve:request:r1", "phase", "FINISHED"),  # request state is the router's
                ("SET", "distserve:router:r1", "{}"), ("SADD", "distserve:routers", "r1"), ("SET", "other:key", "x"),
                ("GET", f"distserve:worker:{role}-1"),  # not a command its code sends
            ]
            for command in refused:
                with pytest.raises(NoPermissionError):
                    await r.execute_command(*command)
            if role == "prefill":  # reading the registry is for routers, and for decoders checking KV holders
                with pytest.raises(NoPermissionError):
                    await Registry(r).live_workers()
            else:
                admin.script_flush()  # NOSCRIPT first: SCRIPT LOAD, then EVALSHA again
                await Registry(r).register(info(f"{role}-2", role), WorkerLoad(), 5)
                assert [v.worker_id for v in await Registry(r).live_workers()] == [f"{role}-2"]
        finally:
            await r.aclose()

    asyncio.run(body())
    assert admin.get("other:key") is None and admin.config_get("maxmemory") == {"maxmemory": "0"}


def test_the_router_user_runs_discovery_request_state_presence_and_the_reaper(server: RedisServer, admin: redis.Redis) -> None:
    async def body() -> None:
        w = connect(server.role_url("decode"), role="decode")
        r = connect(server.role_url("router"), role="router")
        try:
            await Registry(w).register(info("decode-1", "decode"), WorkerLoad(free_blocks=9), 5)
            registry = Registry(r)
            assert [v.worker_id for v in await registry.live_workers()] == ["decode-1"]
            admin.script_flush()  # as after a Redis restart: NOSCRIPT, then SCRIPT LOAD and EVALSHA again
            assert [v.load.free_blocks for v in await registry.live_workers()] == [9]

            presence = RouterHeartbeat(r, RouterInfo("router-a", "127.0.0.1:1", time.time()), interval_s=1, ttl_s=5)
            await presence.beat()
            states = RequestStateStore(r, router_id="router-a")
            for phase in (RequestPhase.QUEUED, RequestPhase.PREFILLING, RequestPhase.PREFILLED, RequestPhase.DECODING):
                await states.update("req-1", phase, prompt_tokens=4, decode_worker="decode-1")
            await states.update("req-2", RequestPhase.QUEUED)
            await states.update("req-2", RequestPhase.FINISHED, tokens_emitted=3, finish_reason="length")
            assert admin.hget("distserve:request:req-1", "phase") == b"DECODING"
            assert admin.smembers(inflight_key("distserve", "router-a")) == {b"req-1"}

            await presence.stop(leave=True)  # router-a is gone: another router's reaper closes req-1
            orphans = await reap_orphans(r)
            assert [(o.router_id, o.request_id) for o in orphans] == [("router-a", "req-1")]
            assert admin.hget("distserve:request:req-1", "phase") == b"EXPIRED"
            assert admin.hget("distserve:request:req-2", "phase") == b"FINISHED"
            assert admin.acl_log() == []

            refused = [
                ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "maxmemory", "1"), ("ACL", "LIST"), ("KEYS", "*"),
                ("SCAN", "0"), ("EVAL", "return 1", "0"), ("PUBLISH", "distserve", "x"), ("SET", "other:key", "x"),
                ("HGETALL", "distserve:request:req-1"),  # the router writes request state; reading it is for admin
                ("DEBUG", "OBJECT", "distserve:workers"), ("SCRIPT", "FLUSH"),
            ]
            for command in refused:
                with pytest.raises(NoPermissionError):
                    await r.execute_command(*command)
            # a script runs with its caller's rights: the router cannot reach past its grant through one
            sha = await r.script_load("return redis.call('FLUSHALL')")
            with pytest.raises(ResponseError, match=SCRIPT_REFUSED):
                await r.evalsha(sha, 0)
            sha = await r.script_load("return redis.call('SET', 'other:key', 'x')")
            with pytest.raises(ResponseError, match=SCRIPT_REFUSED):
                await r.evalsha(sha, 0)
        finally:
            await r.aclose()
            await w.aclose()

    asyncio.run(body())
    assert admin.exists("distserve:request:req-1") and admin.get("other:key") is None


def test_a_restart_brings_the_same_users_back_and_no_password_reaches_argv(tmp_path: Path) -> None:
    with RedisServer(acl=True) as s:
        urls = {role: s.role_url(role) for role in ROLES}
        users = Path(s.log_path).parent / "users.acl"
        assert users.stat().st_mode & 0o777 == 0o600
        text = users.read_text()
        secrets = [password(url) for url in (*urls.values(), s.admin_url)]
        assert len(set(secrets)) == len(ROLES) + 1 and all(len(p) >= 40 for p in secrets)
        assert not any(p in text for p in secrets)  # hashes only
        argv = " ".join(s._proc.args)  # as launched (redis-server then rewrites its title in /proc)
        cmdline = Path(f"/proc/{s.pid}/cmdline").read_bytes().decode()
        assert "--aclfile" in argv and not any(p in argv or p in cmdline for p in secrets)
        assert without_credentials(s.admin_url) == s.url and "@" not in s.url

        os.kill(s.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while s.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        s.restart()
        assert {role: s.role_url(role) for role in ROLES} == urls
        assert redis.Redis.from_url(s.admin_url, socket_timeout=2).ping()
        for role in ROLES:
            assert redis.Redis.from_url(urls[role], socket_timeout=2).ping()
        with pytest.raises(AuthenticationError):
            redis.Redis.from_url(s.url, socket_timeout=2).ping()


def test_without_acl_every_url_is_the_plain_one() -> None:
    with RedisServer() as s:
        assert s.admin_url == s.url == s.role_url("router") == s.role_url("prefill")
        assert redis.Redis.from_url(s.role_url("decode"), socket_timeout=2).ping()
        with pytest.raises(ValueError, match="role"):
            s.role_url("admin ")


def test_the_deploy_secrets_command_writes_a_working_acl_file_and_owner_only_urls(tmp_path: Path) -> None:
    out = tmp_path / "secrets"
    assert acl_main([str(out), "--url", "redis://127.0.0.1:6379/0"]) == 0
    assert (out / "users.acl").stat().st_mode & 0o777 == 0o644  # hashes only; Redis reads it as its own user
    for user in ("admin", *ROLES):
        for ext in ("url", "env"):
            assert (out / f"{user}.{ext}").stat().st_mode & 0o777 == 0o600
        url = (out / f"{user}.url").read_text()
        assert url.startswith(f"redis://{user}:") and url.endswith("@127.0.0.1:6379/0")
        assert (out / f"{user}.env").read_text() == f"DISTSERVE_REDIS_URL={url}\n"
        assert password(url) not in (out / "users.acl").read_text()
    # the file loads in a real redis-server (ACL LOAD over the one it started with), and its URLs log in
    with RedisServer(acl=True) as s:
        (Path(s.log_path).parent / "users.acl").write_text((out / "users.acl").read_text())
        assert redis.Redis.from_url(s.admin_url, socket_timeout=2).acl_load()
        for user in ("admin", *ROLES):
            url = (out / f"{user}.url").read_text().replace("127.0.0.1:6379", f"127.0.0.1:{s.port}")
            assert redis.Redis.from_url(url, socket_timeout=2).ping()
        with pytest.raises(AuthenticationError):
            redis.Redis.from_url(s.admin_url, socket_timeout=2).ping()  # the old passwords are gone


def test_acl_file_names_every_role_with_its_own_password_hash() -> None:
    passwords = make_passwords()
    lines = acl_file(passwords).splitlines()
    assert lines[0].startswith("user default off")
    assert [ln.split()[1] for ln in lines] == ["default", "admin", *ROLES]
    assert len({ln.split()[3] for ln in lines[1:]}) == len(ROLES) + 1
    for ln in lines[2:]:
        assert "resetchannels" in ln and "-@all" in ln and "~*" not in ln and "@all " not in ln.replace("-@all", "")


# -- TLS: rediss:// with the CA in the URL's query string ----------------------------------------
def _certs(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1/localhost signed by it: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test redis CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_a_rediss_url_with_the_ca_in_its_query_reaches_redis_over_tls(server: RedisServer, admin: redis.Redis, tmp_path: Path) -> None:
    """The redis-server here is built without TLS, so TLS ends in a proxy in front of it (as stunnel or
    a cloud Redis's TLS endpoint would); what is tested is the client side: connect() with rediss://."""
    ca, cert, key = _certs(tmp_path)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def body() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        proxy = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=ctx)
        port = proxy.sockets[0].getsockname()[1]
        base = f"rediss://127.0.0.1:{port}/0"
        secret = password(server.role_url("decode"))
        try:
            r = connect(user_url(f"{base}?ssl_ca_certs={ca}&ssl_cert_reqs=required", "decode", secret), role="decode")
            try:
                await Registry(r).register(info("decode-tls", "decode"), WorkerLoad(), 5)
            finally:
                await r.aclose()
            assert admin.exists("distserve:worker:decode-tls")
            # without the CA the server's certificate does not verify, and nothing is sent
            plain = redis.Redis.from_url(user_url(base, "decode", secret), socket_timeout=2, socket_connect_timeout=2)
            with pytest.raises(redis.exceptions.ConnectionError, match="(?i)certificate"):
                await asyncio.to_thread(plain.ping)
        finally:
            proxy.close()
            await proxy.wait_closed()

    asyncio.run(body())
