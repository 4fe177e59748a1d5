#!/usr/bin/env bash
# Starts or stops a Docker daemon for the Docker test and CI, on a machine with Debian's docker.io
# installed but no daemon running (as on this project's development and CI machines):
#
#   deploy/offline/dockerd.sh start    # exit 0 once `docker info` answers (also when one already ran)
#   deploy/offline/dockerd.sh stop     # stops the daemon only if `start` started it
#
# The daemon picks its storage driver (overlay2 where the filesystem takes it); if it does not start,
# vfs, then vfs without iptables.
# Its networks take addresses from 198.18.0.0/15 (the range set aside for test networks), not from
# the private ranges Docker picks by default, and published ports bind 127.0.0.1 only.
set -euo pipefail

CACHE=${DISTSERVE_OFFLINE_CACHE:-/var/cache/distserve-offline}
PIDFILE=$CACHE/dockerd.pid
LOG=$CACHE/dockerd.log

up() { timeout 10 docker info > /dev/null 2>&1; }

launch() {  # the daemon with extra flags "$@"
    setsid dockerd --pidfile "$PIDFILE" --ip 127.0.0.1 --bip 198.18.0.1/24 \
        --default-address-pool base=198.19.0.0/16,size=24 "$@" >> "$LOG" 2>&1 < /dev/null &
    for _ in $(seq 60); do
        up && return 0
        kill -0 $! 2> /dev/null || return 1
        sleep 1
    done
    return 1
}

case ${1:-} in
start)
    if up; then echo "a Docker daemon is already running"; exit 0; fi
    command -v dockerd > /dev/null || { echo "no dockerd here (apt-get install docker.io)"; exit 3; }
    [[ $(id -u) == 0 ]] || { echo "starting dockerd needs root"; exit 3; }
    mkdir -p "$CACHE"
    : > "$LOG"
    # the daemon's own storage driver, then vfs, then vfs without iptables (a kernel without netfilter)
    first=(); [[ -n ${DISTSERVE_DOCKER_STORAGE_DRIVER:-} ]] && first=(--storage-driver "$DISTSERVE_DOCKER_STORAGE_DRIVER")
    for try in 1 2 3; do
        case $try in
            1) flags=("${first[@]}") ;;
            2) flags=(--storage-driver vfs) ;;
            3) flags=(--storage-driver vfs --iptables=false) ;;
        esac
        if launch "${flags[@]}"; then
            echo "dockerd started (pid $(cat "$PIDFILE"), storage driver $(docker info -f '{{.Driver}}'), flags: ${flags[*]:-none}, log $LOG)"
            exit 0
        fi
        [[ -f $PIDFILE ]] && kill "$(cat "$PIDFILE")" 2> /dev/null && sleep 3
    done
    echo "dockerd did not start; its log ($LOG) ends:"; tail -5 "$LOG"
    exit 3
    ;;
stop)
    [[ -f $PIDFILE ]] || exit 0
    pid=$(cat "$PIDFILE")
    if kill "$pid" 2> /dev/null; then
        for _ in $(seq 60); do kill -0 "$pid" 2> /dev/null || break; sleep 1; done
    fi
    rm -f "$PIDFILE"
    echo "dockerd stopped"
    ;;
*)
    echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
