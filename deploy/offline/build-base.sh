#!/usr/bin/env bash
# Base images from Debian packages, for hosts that reach no image registry: `debootstrap` makes a
# Debian bookworm root (its CPython 3.11), `docker import` turns it into an image. Three images:
#
#   distserve-base:bookworm        python3 (3.11) with venv, libgomp1, CA certificates: the final stage
#   distserve-base:bookworm-build  the same plus g++ and python3-dev, and the wheelhouse at /opt/wheelhouse
#                                  with PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/wheelhouse: the build stage
#   distserve-redis:bookworm       the same root plus Debian's redis-server (7.0): compose's `redis`
#
#   deploy/offline/build-base.sh [WHEELHOUSE]   # default: $DISTSERVE_OFFLINE_CACHE/wheelhouse
#
# Needs root, debootstrap and a Debian mirror (DEBIAN_MIRROR; a local mirror or apt cache does, for an
# air-gapped host). The roots are kept under $DISTSERVE_OFFLINE_CACHE/rootfs and the .debs under
# .../debs; an image whose label matches this script and the wheelhouse is not made again.
set -euo pipefail

CACHE=${DISTSERVE_OFFLINE_CACHE:-/var/cache/distserve-offline}
WH=${1:-$CACHE/wheelhouse}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
RUNTIME_PKGS=python3,python3-venv,python-is-python3,libgomp1,ca-certificates
BUILD_PKGS=(g++ python3-dev)
REDIS_PKGS=(redis-server redis-tools)
RUNTIME=distserve-base:$SUITE
BUILD=distserve-base:$SUITE-build
REDIS=distserve-redis:$SUITE
LABEL=org.distserve.offline.key
ENVS=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'ENV LANG=C.UTF-8')

[[ -f $WH/.key ]] || { echo "no wheelhouse at $WH: run deploy/offline/make-wheelhouse.sh first" >&2; exit 1; }
RECIPE=1  # bump when the way the roots are made changes
roots_key=$(echo "$RECIPE $SUITE $MIRROR $RUNTIME_PKGS ${BUILD_PKGS[*]} ${REDIS_PKGS[*]} ${ENVS[*]}" | sha256sum | cut -c1-16)
build_key=$roots_key-$(cat "$WH/.key")
ROOTS=$CACHE/rootfs

have() {  # image $1 exists with label key $2
    [[ $(docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$1" 2> /dev/null) == "$2" ]]
}

in_root() {  # runs apt-get in root $1 to install the rest of the arguments, then cleans it
    local root=$1; shift
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"  # no service starts in the root
    chmod +x "$root/usr/sbin/policy-rc.d"
    mkdir -p "$CACHE/debs/partial"
    mount -t proc proc "$root/proc"
    mount --bind "$CACHE/debs" "$root/var/cache/apt/archives"
    local rc=0
    chroot "$root" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"' \
        sh "$@" || rc=$?
    umount "$root/var/cache/apt/archives" "$root/proc"
    rm -f "$root/usr/sbin/policy-rc.d"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
    : > "$root/etc/resolv.conf"
    return $rc
}

start=$(date +%s)
if [[ $(cat "$ROOTS/.key" 2> /dev/null) != "$roots_key" ]]; then
    command -v debootstrap > /dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
    rm -rf "$ROOTS"
    mkdir -p "$ROOTS" "$CACHE/debs"
    echo "debootstrap $SUITE from $MIRROR into $ROOTS/runtime"
    debootstrap --variant=minbase --include="$RUNTIME_PKGS" --cache-dir="$CACHE/debs" \
        "$SUITE" "$ROOTS/runtime" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    rm -rf "$ROOTS"/runtime/var/lib/apt/lists/* "$ROOTS"/runtime/var/cache/apt/*.bin
    : > "$ROOTS/runtime/etc/resolv.conf"
    cp -a "$ROOTS/runtime" "$ROOTS/build"
    in_root "$ROOTS/build" "${BUILD_PKGS[@]}" > "$CACHE/apt-build.log" 2>&1 || { tail -20 "$CACHE/apt-build.log" >&2; exit 1; }
    cp -a "$ROOTS/runtime" "$ROOTS/redis"
    in_root "$ROOTS/redis" "${REDIS_PKGS[@]}" > "$CACHE/apt-redis.log" 2>&1 || { tail -20 "$CACHE/apt-redis.log" >&2; exit 1; }
    echo "$roots_key" > "$ROOTS/.key"
    echo "roots made in $(( $(date +%s) - start )) s: $(du -sh "$ROOTS"/runtime "$ROOTS"/build "$ROOTS"/redis | awk '{printf "%s %s  ", $2, $1}')"
fi

if ! have "$RUNTIME" "$roots_key"; then
    tar -C "$ROOTS/runtime" --numeric-owner -c . \
        | docker import "${ENVS[@]}" --change "LABEL $LABEL=$roots_key" - "$RUNTIME" > /dev/null
fi
if ! have "$BUILD" "$build_key"; then
    # the wheelhouse rides in the same layer, at /opt/wheelhouse
    tar --numeric-owner -c -C "$ROOTS/build" . -C "$(dirname "$WH")" --transform "s,^$(basename "$WH"),opt/wheelhouse," \
        "$(basename "$WH")" \
        | docker import "${ENVS[@]}" --change 'ENV PIP_NO_INDEX=1' --change 'ENV PIP_FIND_LINKS=/opt/wheelhouse' \
            --change "LABEL $LABEL=$build_key" - "$BUILD" > /dev/null
fi
if ! have "$REDIS" "$roots_key"; then
    tar -C "$ROOTS/redis" --numeric-owner -c . \
        | docker import "${ENVS[@]}" --change "LABEL $LABEL=$roots_key" --change 'USER redis' \
            --change 'WORKDIR /var/lib/redis' --change 'EXPOSE 6379' --change 'CMD ["redis-server"]' - "$REDIS" > /dev/null
fi
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E "^(distserve-base|distserve-redis):$SUITE" || true
echo "base images ready in $(( $(date +%s) - start )) s"
