"""The committed protobuf/gRPC modules (distserve/v1) are what protoc makes of protos/ today."""

import subprocess
import sys


def test_generated_code_is_current():
    done = subprocess.run([sys.executable, "-m", "distserve.rpc.codegen", "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"stale generated code: run `python -m distserve.rpc.codegen`\n{done.stdout}{done.stderr}"
