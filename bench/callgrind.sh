#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: repeatable where
# wall-clock benchmarks on this VM drift by ±30%, so it can compare two versions of the hot
# path. Kernel time (about three quarters of the CPU per request) is not counted: confirm a
# change with bench/run.sh before believing it matters.
# Usage: bench/callgrind.sh [BIN] [CONFIG]   (default: VELOCITY_BIN or a release build with debug info,
#        round robin over three `velocity testserver` backends on 127.0.0.1)
#        CALLGRIND_POLICY=1 adds a rate limit and a 10,000-entry deny list to that default
#        config, neither of which the benchmark's requests trigger (issue 15's cost figure).
# Writes target/velocity-callgrind.out; read it with callgrind_annotate. Ports derive from the
# checkout's path (or CALLGRIND_PORT), so two checkouts can count at once.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
base=${CALLGRIND_PORT:-$(port_base 20000)}
out=$root/target/velocity-callgrind.out
mkdir -p "$root/target"
need valgrind wrk curl
VELOCITY_BIN=${1:-${VELOCITY_BIN:-}} velocity_build
config=${2:-$dir/velocity.yaml}
if [ -z "${2:-}" ]; then
  cat > "$config" <<YAML
listen: 127.0.0.1:$base
access_log: off
services:
  - name: bench
$(backends_yaml $((base + 1)) $((base + 2)) $((base + 3)))
YAML
  if [ -n "${CALLGRIND_POLICY:-}" ]; then
    {
      echo "    rate_limits: [{key: client_ip, rate: 1000000/s, burst: 1000000}]"
      echo "    deny:"
      # 10,000 /32s in 10.0.0.0/8 (the benchmark's client is 127.0.0.1).
      for i in $(seq 0 9999); do echo "      - 10.$((i / 65536)).$((i / 256 % 256)).$((i % 256))"; done
    } >> "$config"
  fi
fi
testservers $((base + 1)) $((base + 2)) $((base + 3))
valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" run -c "$config" \
  > "$dir/velocity.log" 2>&1 &
vg=$!
pids+=($vg)
wait_for "velocity under callgrind" curl -sf -o /dev/null http://127.0.0.1:$base/
requests=$(wrk -t1 -c16 -d10s http://127.0.0.1:$base/ | awk '/requests in/{print $1}')
kill -INT "$vg"; wait "$vg" 2>/dev/null || true
total=$(awk '/^(summary|totals):/{print $2; exit}' "$out")
python3 -c "print(f'{$requests} requests, {$total / $requests:,.0f} user-space instructions per request')"
