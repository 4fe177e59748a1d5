"""Configuration: docs/configuration.md is the generated table (so it agrees with `--help`), every
setting is a flag and a DISTSERVE_* variable, and a bad value stops a service at start with a message
that names the setting."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distserve import config
from distserve.cli import build_parser, settings_doc
from distserve.runtime import WorkerSettings
from services.router.settings import RouterSettings

pytestmark = pytest.mark.timeout(120)

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def help_settings(*argv: str) -> dict[str, tuple[str, str]]:
    """flag -> (environment variable, default) as `distserve ... --help` prints them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    text = re.sub(r"\s+", " ", out.getvalue())
    return {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"(--[a-z0-9-]+) [A-Z0-9_]+ .*?\[env (DISTSERVE_[A-Z0-9_]+); default (.*?)\]", text)}


def doc_settings(section: str) -> dict[str, tuple[str, str]]:
    text = next(p for p in DOC.read_text().split("## ") if p.startswith(section))
    return {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^\| `(--[a-z0-9-]+)` \| `(DISTSERVE_[A-Z0-9_]+)` \| `(.*?)` \|", text, re.M)}


def test_committed_doc_equals_the_generated_one():
    assert DOC.read_text() == settings_doc(), "docs/configuration.md is stale: run `distserve settings > docs/configuration.md`"


def test_help_and_doc_list_the_same_settings_variables_and_defaults():
    router = help_settings("serve", "router")
    assert router == doc_settings("Router")
    assert set(router) == {"--" + f.name.replace("_", "-") for f in dataclasses.fields(RouterSettings)}
    for role in ("prefill", "decode", "colocated"):
        assert help_settings("serve", role) == doc_settings("Workers")
    assert set(doc_settings("Workers")) == {"--" + f.name.replace("_", "-") for f in dataclasses.fields(WorkerSettings)}


def test_flags_win_over_environment_over_defaults(monkeypatch):
    monkeypatch.setenv("DISTSERVE_DRAIN_S", "12.5")
    monkeypatch.setenv("DISTSERVE_CHUNKED_PREFILL", "yes")
    ns = build_parser().parse_args(["serve", "prefill", "--port", "50061"])
    s = config.from_args(WorkerSettings, ns, role="prefill")
    assert (s.port, s.drain_s, s.chunked_prefill, s.role, s.block_size) == (50061, 12.5, True, "prefill", 16)
    ns = build_parser().parse_args(["serve", "prefill", "--drain-s", "3"])
    assert config.from_args(WorkerSettings, ns).drain_s == 3.0


@pytest.mark.parametrize(
    "cls, env, setting",
    [
        (WorkerSettings, {"DISTSERVE_PORT": "fifty"}, "port"),
        (WorkerSettings, {"DISTSERVE_PORT": "70000"}, "port"),
        (WorkerSettings, {"DISTSERVE_DTYPE": "int4"}, "dtype"),
        (WorkerSettings, {"DISTSERVE_DEVICE": "gpu"}, "device"),
        (WorkerSettings, {"DISTSERVE_CPUS": "first"}, "cpus"),
        (WorkerSettings, {"DISTSERVE_CHUNKED_PREFILL": "maybe"}, "chunked_prefill"),
        (WorkerSettings, {"DISTSERVE_TTL_S": "0.4"}, "ttl_s"),
        (WorkerSettings, {"DISTSERVE_REDIS_URL": "localhost:6379"}, "redis_url"),
        (WorkerSettings, {"DISTSERVE_LEAVE_S": "-1"}, "leave_s"),
        (WorkerSettings, {"DISTSERVE_METRICS_PORT": "-2"}, "metrics_port"),
        (RouterSettings, {"DISTSERVE_REFRESH_S": "0"}, "refresh_s"),
        (RouterSettings, {"DISTSERVE_PREFILL_TIMEOUT_S": "soon"}, "prefill_timeout_s"),
        (RouterSettings, {"DISTSERVE_DRAIN_S": "-5"}, "drain_s"),
    ],
)
def test_invalid_values_fail_naming_the_setting(monkeypatch, cls, env, setting):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        config.from_args(cls)
    assert re.search(rf"\b{setting}\b", str(e.value)), str(e.value)


def test_a_service_started_with_a_bad_value_exits_at_once_naming_it(tmp_path):
    res = subprocess.run([sys.executable, "-m", "distserve.cli", "serve", "prefill", "--model", "tiny-llama", "--block-size", "0"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "DISTSERVE_DTYPE": "float8"})
    assert res.returncode != 0
    assert "dtype" in res.stderr and "float8" in res.stderr, res.stderr
