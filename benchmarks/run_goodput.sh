#!/usr/bin/env bash
# Goodput of one suite configuration on this machine, as recorded in benchmarks/README.md.
#
#   flock /tmp/distserve-cpu.lock benchmarks/run_goodput.sh CONFIG WORKLOAD...
#   flock /tmp/distserve-cpu.lock benchmarks/run_goodput.sh coloc1 calibrate
#
# CONFIG: disagg (1 prefill + 1 decode worker, one core each), disagg-cond (the same, the router
# choosing per request where to prefill: docs/conditional-disaggregation.md), disagg-elastic (disagg-cond
# with elastic workers and `distserve plan --watch --apply --min-prefill 0` moving them, its SLO
# WATCH_TTFT / WATCH_TPOT, default 4 s / 80 ms; its log lines are printed at the end), coloc2 (2 colocated workers, one core
# each), coloc1 (1 colocated worker with both cores and 2 threads), and coloc2-chunked / coloc1-chunked
# (the same with chunked prefill). `distserve up` divides and pins the
# cores; the pinning of every worker is printed from /proc before the runs. WORKLOAD: chat, code,
# summarize, `calibrate` (one request at a time, for the SLOs), or saturate-W (CLIENTS=16 closed-loop clients). Results go to benchmarks/results/.
# Environment: REQUESTS per point, BISECT steps, <W>_TTFT / <W>_TPOT / <W>_RATES (W = CHAT, CODE, SUM)
# over slo.env, UP_ARGS (more `distserve up` flags), ALSO_SLO="TTFT,TPOT ..." for more SLO pairs searched over the same runs, SUFFIX on the file.
set -euo pipefail
cd "$(dirname "$0")/.."
config=$1; shift
model=${MODEL:-smollm2-135m}
requests=${REQUESTS:-30}
out=${RESULTS:-benchmarks/results}
case $config in
  disagg) up=(--prefill 1 --decode 1); label="disaggregated 1P+1D, 1 core each" ;;
  disagg-cond) up=(--prefill 1 --decode 1 --router-arg=--disagg-mode=conditional); label="conditional 1P+1D, 1 core each" ;;
  disagg-elastic) up=(--prefill 1 --decode 1 --elastic --router-arg=--disagg-mode=conditional); watch=1
    label="conditional 1P+1D, elastic under plan --watch --apply --min-prefill 0, 1 core each" ;;
  coloc2) up=(--colocated 2 --prefill 0 --decode 0); label="colocated x2, 1 core each" ;;
  coloc1) up=(--colocated 1 --prefill 0 --decode 0); label="colocated x1, 2 cores" ;;
  coloc2-chunked) up=(--colocated 2 --prefill 0 --decode 0 --worker-arg=--chunked-prefill=true); label="colocated x2 chunked, 1 core each" ;;
  coloc1-chunked) up=(--colocated 1 --prefill 0 --decode 0 --worker-arg=--chunked-prefill=true); label="colocated x1 chunked, 2 cores" ;;
  *) echo "unknown config $config" >&2; exit 2 ;;
esac

# SLOs (seconds) and sweep per workload: see "How the SLOs were set" in benchmarks/README.md.
# The SLOs come from the calibration run (slo.env) unless set in the environment.
if [ -f "$out/slo.env" ]; then
  while read -r line; do for kv in $line; do name=${kv%%=*}; [ -n "${!name:-}" ] || export "$kv"; done; done < "$out/slo.env"
fi
params() {
  case $1 in
    chat)      echo "--slo-ttft ${CHAT_TTFT:-2.5} --slo-tpot ${CHAT_TPOT:-0.15} --rates ${CHAT_RATES:-0.5,1,2} --scale-rate ${CHAT_SCALE_RATE:-1}" ;;
    code)      echo "--slo-ttft ${CODE_TTFT:-1.5} --slo-tpot ${CODE_TPOT:-0.15} --rates ${CODE_RATES:-0.5,1,2} --scale-rate ${CODE_SCALE_RATE:-0.5}" ;;
    summarize) echo "--slo-ttft ${SUM_TTFT:-6} --slo-tpot ${SUM_TPOT:-0.15} --rates ${SUM_RATES:-0.25,0.5,1} --scale-rate ${SUM_SCALE_RATE:-0.5}" ;;
  esac
}

mkdir -p "$out"
run=$(mktemp -d)
source benchmarks/up_suite.sh
UP_CLI_ARGS=(--log-level warning)
# shellcheck disable=SC2206
up+=(${UP_ARGS:-})  # more `distserve up` flags, e.g. UP_ARGS=--worker-arg=--max-num-batched-tokens=512
up_suite "$run" --model "$model" "${up[@]}"
# the suite serves TLS with its own CA (docs/security.md): the bench's SDK finds it here
ca=$(grep -o "DISTSERVE_TLS_CA=[^ ]*" "$run/up.out" | head -1 | cut -d= -f2)
[ -n "$ca" ] && export DISTSERVE_TLS_CA="$ca"
if [ -n "${watch:-}" ]; then  # the planner's watch, moving elastic workers between the roles as it sees fit
  python -m distserve.cli --log-level warning plan --watch --apply --min-prefill 0 --redis-url "$(cat "$run/logs/redis-admin.url")" \
    --slo-ttft "${WATCH_TTFT:-4}" --slo-tpot "${WATCH_TPOT:-0.08}" --interval "${WATCH_INTERVAL:-2}" --window 3 > "$run/watch.out" 2>&1 &
  watch_pid=$!
  # (nothing in a trap may fail: under set -e the first failure ends it, and the suite would stay up)
  trap 'kill $watch_pid 2>/dev/null || true; kill -INT $up_pid 2>/dev/null || true; wait $up_pid 2>/dev/null || true
        { grep -E -B1 "RECOMMEND|CHANGED|GAVE UP" "$run/watch.out" || echo "no change of role"; } | sed "s/^/  watch: /"' EXIT
fi
echo "commit $(git rev-parse --short HEAD), $config: $label"
# the Prometheus endpoints of the workers and routers (up prints them): the benches report where each one's time went
scrape=$(grep -m1 "^metrics (Prometheus" "$run/up.out" | tr ' ' '\n' | grep -E "^[a-z]+(-[0-9]+)?=" | cut -d= -f2 | paste -sd, -) || true
children() { local p; for p in $(pgrep -P "$1"); do echo "$p"; children "$p"; done; }
for pid in $(children $up_pid); do  # workers (forked: ds-<name>) and routers (spawned: distserve serve router)
  name=$(cat /proc/$pid/comm 2>/dev/null) || continue
  cmd=$(tr '\0' ' ' < /proc/$pid/cmdline)
  case $name in ds-*) ;; *) grep -q "serve router" <<< "$cmd" || continue; name=router ;; esac
  echo "  $name: threads $(grep -o -- '--threads [0-9]*' <<< "$cmd" | head -1 | cut -d' ' -f2), $(grep Cpus_allowed_list /proc/$pid/status | tr -s '\t' ' ')"
done

others() {  # processes busy right now that are not this run's, so a disturbed figure can be told apart
  local busy="" pid
  for pid in $(top -bn2 -d 0.5 | awk '/^top/ {n++} n == 2 && $1 ~ /^[0-9]+$/ && $9 > 20 {print $1}'); do
    cmd=$(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null | cut -c1-70) || continue
    case $cmd in *"redis-server"*|*"bench goodput"*|*"bench serve"*|*"distserve.cli --log-level warning up"*|*"plan --watch"*) ;; *) busy="$busy [$pid] $cmd;" ;; esac
  done
  echo "  other busy processes at $(date -u +%H:%M:%S):${busy:- none}"
}
for w in "$@"; do
  others
  if [ "$w" = calibrate ]; then
    for cw in chat code summarize; do
      python -m distserve.cli --log-level warning bench serve --target "distserve://127.0.0.1:$port" --workload "$cw" \
        --concurrency 1 --num-requests "${CAL_REQUESTS:-6}" --no-progress --out "$out/calibrate_${cw}_${config}.json"
    done
    # SLO = 5 x the unloaded p50 TTFT and 3 x the unloaded p50 TPOT, two significant digits
    python - "$out" "$config" > "$out/slo.env" <<'PY'
import json, sys
from math import floor, log10
out, config = sys.argv[1], sys.argv[2]
sig2 = lambda x: round(x, 1 - floor(log10(x)))
for w, key in (("chat", "CHAT"), ("code", "CODE"), ("summarize", "SUM")):
    s = json.load(open(f"{out}/calibrate_{w}_{config}.json"))["summary"]
    print(f"{key}_TTFT={sig2(5 * s['ttft']['p50'])} {key}_TPOT={sig2(3 * s['tpot']['p50'])}")
PY
    cat "$out/slo.env"
    continue
  fi
  if [ "${w%%-*}" = saturate ]; then  # saturate-chat: closed loop, 16 clients, output tok/s and where the time goes
    python -m distserve.cli --log-level warning bench serve --target "distserve://127.0.0.1:$port" --workload "${w#saturate-}" \
      --concurrency "${CLIENTS:-16}" --num-requests "${SAT_REQUESTS:-96}" --warmup 2 --no-progress ${scrape:+--scrape "$scrape"} --out "$out/${w}_${config}${SUFFIX:-}.json"
    continue
  fi
  # shellcheck disable=SC2046
  python -m distserve.cli --log-level warning bench goodput --target "distserve://127.0.0.1:$port" --label "$label" \
    --workload "$w" --num-requests "$requests" --bisect-steps "${BISECT:-2}" $(params "$w") $(for a in ${ALSO_SLO:-}; do echo --also-slo "$a"; done) \
    ${scrape:+--scrape "$scrape"} --note "distserve up ${up[*]} --model $model" --out "$out/goodput_${w}_${config}${SUFFIX:-}.json"
done
others
