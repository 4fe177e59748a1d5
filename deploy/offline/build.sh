#!/usr/bin/env bash
# The image without an image registry, as an air-gapped operator builds it (and the Docker test, and CI):
#
#   deploy/offline/build.sh            # wheelhouse, base images, then distserve:cpu
#
# 1. make-wheelhouse.sh: the wheels (needs a Python package index, or a wheelhouse carried in)
# 2. build-base.sh: base images from Debian packages (debootstrap + docker import; needs a Debian mirror)
# 3. docker build -f deploy/Dockerfile with BUILD_BASE / RUNTIME_BASE set to those images: no network
#
# Each step keeps what it made under $DISTSERVE_OFFLINE_CACHE (default /var/cache/distserve-offline) and
# in Docker's image store, so a second run only rebuilds the image, and only the layers whose inputs
# changed. DISTSERVE_IMAGE names the image (default distserve:cpu, compose's default). Then:
#
#   docker compose -f deploy/docker-compose.yml -f deploy/offline/compose.offline.yml up -d
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/deploy/offline
export DISTSERVE_OFFLINE_CACHE=${DISTSERVE_OFFLINE_CACHE:-/var/cache/distserve-offline}
IMAGE=${DISTSERVE_IMAGE:-distserve:cpu}
mkdir -p "$DISTSERVE_OFFLINE_CACHE"

t0=$(date +%s)
"$HERE/make-wheelhouse.sh"
t1=$(date +%s)
"$HERE/build-base.sh"
t2=$(date +%s)
# The build context as BuildKit would send it: Debian's docker.io has no buildx, and its classic builder
# reads only a .dockerignore at the context's root, not deploy/Dockerfile.dockerignore. Without these
# excludes every __pycache__ a test run writes would change `COPY distserve` and rebuild the kernels.
context=$DISTSERVE_OFFLINE_CACHE/context
rm -rf "$context" && mkdir -p "$context"
excludes=(--exclude=__pycache__ --exclude='*.pyc')
while read -r pattern; do excludes+=(--exclude="./${pattern#/}"); done \
    < <(grep -v '^#' "$ROOT/deploy/Dockerfile.dockerignore" | grep -v '^$' | sed 's,^\*\*/,,')
tar -C "$ROOT" "${excludes[@]}" -c . | tar -C "$context" -x
cp "$ROOT/deploy/Dockerfile" "$context/Dockerfile.distserve"
echo "docker build -t $IMAGE (log: $DISTSERVE_OFFLINE_CACHE/image-build.log)"
docker build -f "$context/Dockerfile.distserve" \
    --build-arg BUILD_BASE=distserve-base:bookworm-build --build-arg RUNTIME_BASE=distserve-base:bookworm \
    -t "$IMAGE" "$context" > "$DISTSERVE_OFFLINE_CACHE/image-build.log" 2>&1 \
    || { tail -40 "$DISTSERVE_OFFLINE_CACHE/image-build.log" >&2; exit 1; }
t3=$(date +%s)
echo "$IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"
echo "times: wheelhouse $((t1 - t0)) s, base images $((t2 - t1)) s, image $((t3 - t2)) s, total $((t3 - t0)) s"
