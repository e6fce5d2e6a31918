#!/usr/bin/env bash
# Issue 19's cost figure: lbbench `small` through three Velocity instances in ONE run, their
# rounds interleaved (bench/lbbench_ab.py gives the harness's single custom slot to each):
#   local    a never-triggered rate limit (key client_ip, 1,000,000/s, burst 1,000,000), scope: local;
#   local2   the same again: an A/A control, the noise floor of the paired ratios;
#   cluster  the same limit with scope: cluster, against a redis-server of its own on an
#            ephemeral port (pinned to the client's CPU, beside the backends): one EVALSHA per
#            request. store_timeout 1s (the longest allowed): at the default 5 ms a loaded
#            machine's late answers open the breaker, and the requests served by the
#            fallback meanwhile cost no round trip, so the figure would understate it.
# Open loop by default (`--rate`: oha drives every variant at the same offered rate), so the
# p99s compare the proxies and not a saturated load generator, and CPU per request is taken at
# the same load for all three. Also prints Redis's own CPU per decision (EVALSHA).
# Usage: [RATE=n] bench/cluster.sh [lbbench flags]   (default -r 6 -d 5 -c 64, RATE=5000
#        requests/s; RATE=0: wrk's closed loop instead; VELOCITY_BIN=path skips the build;
#        JSON=path for the harness's data, default /tmp/velocity-cluster-bench.json).
#        Needs redis-server (apt-get install redis-server) and, open loop, oha (cargo install
#        oha --locked).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
rate=${RATE:-5000}
open_loop=()
if [ "$rate" != 0 ]; then
  command -v oha >/dev/null || { echo "needs oha (cargo install oha --locked), or RATE=0" >&2; exit 1; }
  open_loop=(--rate "$rate")
else
  command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
fi
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
bin=${VELOCITY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --manifest-path "$root/Cargo.toml" >/dev/null
  bin=$root/target/release/velocity
fi
# Ports from the checkout's path (another range than bench/policy.sh), so both can run at once.
base=$((38000 + $(echo "$root" | cksum | cut -d' ' -f1) % 300 * 50))
dir=$(mktemp -d)
redis_pid=
cleanup() { [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
taskset -c "${LBBENCH_CLIENT_CPUS:-0}" redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
  --dir "$dir" --logfile "$dir/redis.log" & redis_pid=$!
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$redis_port" ping >/dev/null
limit='    rate_limits: [{key: client_ip, rate: 1000000/s, burst: 1000000, scope: SCOPE}]'
template() {
  echo 'listen: 127.0.0.1:$port'
  echo 'access_log: off'
  [ "$1" = cluster ] && printf 'cluster:\n  redis: redis://127.0.0.1:%s\n  key_prefix: "bench:"\n  store_timeout: 1s\n' "$redis_port"
  printf 'services:\n  - name: bench\n    algorithm: round_robin\n    backends:\n$backends\n'
  echo "${limit/SCOPE/$1}"
}
template local > "$dir/local.yaml"
template cluster > "$dir/cluster.yaml"
# Redis's CPU seconds (user + system) and EVALSHA calls (one per cluster-scope decision)
# so far.
stats() {
  redis-cli -p "$redis_port" info all | tr -d '\r' |
    awk -F'[:,=]' '/^used_cpu_(user|sys):/{cpu += $2} /^cmdstat_evalsha:/{n = $3} END{print cpu, n + 0}'
}
before=$(stats)
json=${JSON:-/tmp/velocity-cluster-bench.json}
python3 "$root/bench/lbbench_ab.py" --bin "$bin" \
  --variant local="$dir/local.yaml" --variant local2="$dir/local.yaml" --variant cluster="$dir/cluster.yaml" \
  --backend-port "$base" --nginx-port $((base + 5)) --haproxy-port $((base + 6)) --custom-port $((base + 7)) \
  -r 6 -d 5 -c 64 "${open_loop[@]}" --json "$json" "$@"
after=$(stats)
python3 - "$before" "$after" "$json" <<'PY'
import json, sys
(cpu0, c0), (cpu1, c1) = ([float(x) for x in a.split()] for a in sys.argv[1:3])
with open(sys.argv[3]) as f:
    measured = sum(r.get("requests") or 0 for r in json.load(f)["runs"] if r["proxy"] == "cluster")
n = c1 - c0
# Warm-ups and the sanity check also ask Redis: at least as many EVALSHAs as measured
# requests means none of them was decided without the store.
print(f"\nredis-server: {n:,.0f} EVALSHAs for {measured:,} measured cluster requests (warm-ups included), "
      f"{(cpu1 - cpu0) / n * 1e6:.1f} µs of Redis CPU per EVALSHA" if n else "redis: no EVALSHA")
PY
