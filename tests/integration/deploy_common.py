"""What the deploy/ tests share: paths, role names, the series the services export, and the Redis ACL
secrets an operator makes before the first start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from distserve.metrics import Metrics
from distserve.state.acl import main as make_redis_secrets

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


def operator_redis_secrets(tmp_path_factory) -> Iterator[Path]:
    """What an operator makes before the first `up` (python -m distserve.state.acl), in a temp folder the
    compose file is pointed at (DISTSERVE_SECRETS_DIR)."""
    out = tmp_path_factory.mktemp("secrets")
    assert make_redis_secrets([str(out)]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTSERVE_SECRETS_DIR", str(out))
        yield out
