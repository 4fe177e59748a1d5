"""The README's first command, on the real default model: `distserve up`, then ask it something."""

import json
import os
import subprocess
import sys

import pytest

from distserve.up import UpProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_default_suite_knows_the_capital_of_france(tmp_path):
    up = UpProcess(tmp_path)  # no flags: smollm2-135m, 1 prefill + 1 decode, Redis started by us, TLS
    assert up.tls_ca is not None  # TLS by default
    try:
        out = subprocess.run(
            [sys.executable, "-m", "distserve.cli", "generate", "--target", up.target, "--json", "--max-tokens", "24",
             "What is the capital of France?"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "DISTSERVE_TLS_CA": up.tls_ca},  # as the "is up" line tells users to
        )
        if out.returncode != 0:
            up.dump()
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert "Paris" in result["text"], result
        assert result["finish_reason"] == "stop" and result["ttft_s"] > 0
    finally:
        assert up.stop() == 0
