# Sourced by the benchmark scripts: `up_suite RUN ARGS...` starts `distserve up ARGS...` on a free port
# with its output in RUN/up.out and its logs in RUN/logs, waits for its "distserve is up" line (or
# prints why it died and exits), and leaves `port` and `up_pid` set; an EXIT trap stops it.
up_suite() {
  local run=$1; shift
  port=$(python -c "from distserve.state.redis_server import free_port; print(free_port())")
  : > "$run/up.out"
  python -m distserve.cli "${UP_CLI_ARGS[@]}" up --port "$port" --logs "$run/logs" "$@" > "$run/up.out" 2>&1 &
  up_pid=$!
  trap 'kill -INT $up_pid 2>/dev/null; wait $up_pid 2>/dev/null || true' EXIT
  until grep -q "distserve is up" "$run/up.out"; do
    kill -0 $up_pid 2>/dev/null || { cat "$run/up.out"; tail -n 30 "$run"/logs/*.log; exit 1; }
    sleep 0.5
  done
}
