"""deploy/k8s: the Kubernetes manifests pass kubernetes-validate's schemas strictly, and what they promise
holds: each role has a Deployment, a Service, probes (exec probes running `distserve health`, which
speaks TLS), resources and a grace period longer than the drain; Redis mounts the ACL users the
kustomization generates; each pod mounts only its own role's TLS Secret, made by `distserve certs`; the
HPAs scale on metrics the workers export."""

from __future__ import annotations

import base64
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from distserve.cli import main as distserve_main
from distserve.rpc.certs import role_files
from distserve.rpc.tls import ROLE_URI
from tests.integration.deploy_common import HEALTH, K8S, ROOT, SERVICES, WORKERS, exported_series, operator_redis_secrets

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def redis_secrets(tmp_path_factory):
    yield from operator_redis_secrets(tmp_path_factory)


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
