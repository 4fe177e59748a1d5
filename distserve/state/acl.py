"""Redis ACL users: one per distserve role, each allowed only the commands and keys its code sends.

`distserve up` (through `RedisServer(acl=True)`) and the deploy files (through
`python -m distserve.state.acl DIR`) run Redis with these users: `default` is off, so a client that
does not authenticate is refused (NOAUTH); `admin` may do anything (supervisor, operators, tests);
`router`, `prefill`, `decode` and `colocated` each get a random password (`secrets.token_urlsafe`)
and the grant below. The ACL file holds only SHA-256 hashes of the passwords (`#<hex>`); the
passwords themselves travel in the role's URL, `redis://<user>:<password>@host:port/0`.

What each grant covers (prefix `distserve`; keep this in step with distserve/state/*.py):
  every role   what redis-py sends on connecting: HELLO 3 (with AUTH in it), CLIENT SETNAME (the
               connection's name, `distserve-<role>`), SELECT (a URL with a db other than 0); PING;
               MULTI/EXEC/DISCARD (every write is a transaction pipeline). `connect` turns redis-py's
               CLIENT SETINFO and CLIENT MAINT_NOTIFICATIONS off, so no grant names them.
  workers      Registry.register/heartbeat: EXISTS, HSET, PEXPIRE, SADD; deregister: DEL, SREM;
               on {prefix}:worker:* and {prefix}:workers only. No request state, no router keys.
               Decode and colocated workers also read the registry (Registry.live_workers, below),
               to pull KV only from prefill workers it lists (services/decode/peers.py).
  router       Registry.live_workers: EVALSHA (SCRIPT LOAD when Redis lost the script) running
               SMEMBERS, HMGET, SREM; Registry.prefixes (workers' prefix-cache filters): HMGET; RequestStateStore.update: HSETNX, HSET, SADD, SREM, PEXPIRE;
               RouterHeartbeat: SET, SADD, DEL; the reaper's script: SMEMBERS, EXISTS, HMGET, HSET,
               PEXPIRE, DEL, SREM (Redis checks a script's calls against the caller's grant too).
               Keys: the workers', {prefix}:request:*, {prefix}:inflight:*, {prefix}:router:*,
               {prefix}:routers.
No role may run ACL, CONFIG, FLUSHALL, KEYS, SCAN, EVAL, DEBUG, SHUTDOWN or any pub/sub command
(`resetchannels`), and no role may touch a key outside its patterns. Key patterns do not tell reads
from writes on Redis 6, so a router may also write a worker's hash; a worker may rewrite another
worker's entry (one user per role, not per worker).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

PREFIX = "distserve"
ADMIN = "admin"
ROLES = ("router", "prefill", "decode", "colocated")
USERS = (ADMIN, *ROLES)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one ACL user may do."""

    keys: tuple[str, ...]  # key patterns (`~pattern` in the ACL)
    commands: tuple[str, ...]  # commands and `command|subcommand`s, each allowed with `+`

    def rules(self) -> str:
        """The ACL rules after the user's password: everything reset, then this grant."""
        return " ".join(["resetkeys", "resetchannels", "-@all", *(f"~{k}" for k in self.keys),
                         *(f"+{c}" for c in self.commands)])


_SESSION = ("hello", "client|setname", "select", "ping", "multi", "exec", "discard")
_WORKER_KEYS = (f"{PREFIX}:worker:*", f"{PREFIX}:workers")
_HEARTBEAT = ("exists", "hset", "pexpire", "sadd", "del", "srem")
_READ_REGISTRY = ("evalsha", "script|load", "smembers", "hmget", "srem")  # Registry.live_workers
_WORKER = Grant(_WORKER_KEYS, (*_SESSION, *_HEARTBEAT))
_PULLER = Grant(_WORKER_KEYS, tuple(dict.fromkeys((*_SESSION, *_HEARTBEAT, *_READ_REGISTRY))))

GRANTS: Mapping[str, Grant] = {
    "router": Grant(
        (*_WORKER_KEYS, f"{PREFIX}:request:*", f"{PREFIX}:inflight:*", f"{PREFIX}:router:*", f"{PREFIX}:routers"),
        tuple(dict.fromkeys((*_SESSION, *_READ_REGISTRY, "exists", "hset", "hsetnx", "set", "sadd", "srem", "pexpire",
                             "del"))),
    ),
    "prefill": _WORKER,
    "decode": _PULLER,
    "colocated": _PULLER,
}


def make_passwords() -> dict[str, str]:
    """A fresh random password (256 bits, URL-safe) for the admin and every role."""
    return {user: secrets.token_urlsafe(32) for user in USERS}


def _hashed(password: str) -> str:
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def acl_file(passwords: Mapping[str, str]) -> str:
    """An ACL file (redis-server --aclfile) for `passwords` (user -> password), hashes only."""
    lines = ["user default off resetpass resetkeys resetchannels -@all", f"user {ADMIN} on {_hashed(passwords[ADMIN])} ~* &* +@all"]
    lines += [f"user {role} on {_hashed(passwords[role])} {GRANTS[role].rules()}" for role in ROLES]
    return "\n".join(lines) + "\n"


def user_url(url: str, user: str, password: str) -> str:
    """`url` (redis://, rediss:// or unix://, query kept) with `user:password@` in it."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


def without_credentials(url: str) -> str:
    """`url` with any `user:password@` taken out, for logs and status lines."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write `text` to `path` with `mode` from the first byte (no window where others may read it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the file may have existed with a wider mode
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def write_secrets(out: Path, url: str) -> None:
    """The files the deploy folder reads: users.acl for Redis, and for each user its URL twice over:
    <user>.url (Kubernetes' secretGenerator) and <user>.env (DISTSERVE_REDIS_URL=..., compose's env_file)."""
    out.mkdir(parents=True, exist_ok=True)
    passwords = make_passwords()
    # Redis reads this as its own user inside its container: readable by all, and it holds only hashes
    write_private(out / "users.acl", acl_file(passwords), 0o644)
    for user, password in passwords.items():
        role_url = user_url(url, user, password)
        write_private(out / f"{user}.url", role_url)
        write_private(out / f"{user}.env", f"DISTSERVE_REDIS_URL={role_url}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m distserve.state.acl",
        description="Make Redis ACL users for distserve: DIR/users.acl (password hashes, for redis-server --aclfile) "
                    "and DIR/<user>.url and DIR/<user>.env (each user's URL, owner-only) for admin, router, prefill, "
                    "decode and colocated. New random passwords every run.",
    )
    p.add_argument("dir", type=Path, help="where to write (deploy/secrets for compose, deploy/k8s/secrets for kustomize)")
    p.add_argument("--url", default="redis://redis:6379/0",
                   help="Redis as the services reach it, without credentials (rediss://...?ssl_ca_certs=... for TLS) "
                        "[default: %(default)s]")
    args = p.parse_args(argv)
    write_secrets(args.dir, args.url)
    print(f"wrote {args.dir}/users.acl and the URLs of {', '.join(USERS)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
