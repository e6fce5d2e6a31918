#!/usr/bin/env bash
# What a client sees when one of three backends dies and comes back mid-run.
# Starts three `velocity testserver` backends and Velocity (health checks + retries) on
# 127.0.0.1, drives it with wrk for 15 s, kills backend 2 at 4 s and restarts it at 9 s.
# Prints wrk's summary (errors, non-2xx, latency percentiles) and Velocity's health log.
# Usage: bench/failover.sh [wrk connections, default 32]   (VELOCITY_BIN=path skips the build)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
conns=${1:-32}
need wrk curl
velocity_build
cat > "$dir/velocity.yaml" <<YAML
listen: 127.0.0.1:19280
access_log: off
services:
  - name: web
    health_check: {type: http, path: /healthz, interval: 500ms, timeout: 250ms, healthy_threshold: 2, unhealthy_threshold: 2}
    retry: {attempts: 2}
    backends:
      - address: 127.0.0.1:19201
      - address: 127.0.0.1:19202
      - address: 127.0.0.1:19203
YAML
for p in 19201 19202 19203; do "$bin" testserver --listen 127.0.0.1:$p --name b$p >/dev/null 2>&1 & pids+=($!); done
"$bin" run -c "$dir/velocity.yaml" > "$dir/velocity.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:19280/ && break; sleep 0.05; done
wrk -t1 -c"$conns" -d15s --latency http://127.0.0.1:19280/ > "$dir/wrk.txt" &
wrk_pid=$!; pids+=($wrk_pid)
sleep 4; kill "${pids[1]}"; echo "t=4s  killed backend 127.0.0.1:19202"
sleep 5; "$bin" testserver --listen 127.0.0.1:19202 --name b19202 >/dev/null 2>&1 & pids+=($!); echo "t=9s  restarted it"
wait "$wrk_pid"
cat "$dir/wrk.txt"
echo "--- velocity log (health and retries)"
grep -E "down|up|retry|unavailable|failed" "$dir/velocity.log" | head -20 || true
