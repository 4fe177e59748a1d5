#!/usr/bin/env bash
# TPOT with and without speculative decoding through the whole suite (docs/speculative-decoding.md).
#
#   flock /tmp/distserve-cpu.lock benchmarks/run_spec_serve.sh [SPECULATIVE...]
#
# For each SPECULATIVE (default: none ngram) starts `distserve up --prefill 1 --decode 1 --tls off
# --speculative S` (one core per worker, the defaults: int8 weights), then runs `distserve bench serve`
# closed-loop at concurrency 1 and 8 on the rewrite workload and the chat workload. One JSON line per
# run goes to stdout and benchmarks/results/spec_serve_<S>_<workload>_c<N>.json. Environment: WORKLOADS, CONCURRENCIES,
# REQUESTS_C1 and REQUESTS_C8 (requests at concurrency 1 and at the other), MODEL, RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${MODEL:-smollm2-135m}
out=${RESULTS:-benchmarks/results}
n1=${REQUESTS_C1:-10}
n8=${REQUESTS_C8:-32}
mkdir -p "$out"
source benchmarks/up_suite.sh
UP_CLI_ARGS=()
for spec in "${@:-none ngram}"; do
for s in $spec; do
  run=$(mktemp -d)
  up_suite "$run" --model "$model" --http-port -1 --tls off --prefill 1 --decode 1 --speculative "$s"
  for workload in ${WORKLOADS:-rewrite chat}; do
    for c in ${CONCURRENCIES:-1 8}; do
      n=$([ "$c" = 1 ] && echo "$n1" || echo "$n8")
      f="$out/spec_serve_${s}_${workload}_c${c}.json"
      python -m distserve.cli bench serve --target "distserve://127.0.0.1:$port" --model "$model" --workload "$workload" \
        --concurrency "$c" --num-requests "$n" --warmup 2 --no-progress --json --out "$f" > /dev/null
      python - "$f" "$s" "$workload" "$c" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); s = d["summary"]
print(json.dumps({"speculative": sys.argv[2], "workload": sys.argv[3], "concurrency": int(sys.argv[4]), "commit": d["commit"],
                  "requests": s["requests"], "failed": s["failed"], "tpot_mean_ms": round(s["tpot"]["mean"] * 1e3, 2),
                  "tpot_p50_ms": round(s["tpot"]["p50"] * 1e3, 2), "output_tok_s": round(s["output_tok_s"], 1)}))
PY
    done
  done
  python - "$run/logs/decode-1.log" "$s" <<'PY'
import re, sys
rows = [(int(a), int(b)) for a, b in re.findall(r"\+ (\d+) new tokens in (\d+) steps", open(sys.argv[1], errors="replace").read())]
tok, steps = sum(a for a, _ in rows), sum(b for _, b in rows)
print(f"# {sys.argv[2]}: decode worker made {tok} tokens in {steps} request-steps ({tok / max(1, steps):.2f} tokens per step, all runs incl. warm-up)")
PY
  kill -INT $up_pid; wait $up_pid 2>/dev/null || true
  trap - EXIT
done
done
