#!/usr/bin/env bash
# TCP (L4) mode beside HAProxy `mode tcp`, one run each, same backends, same client:
#  1. throughput: iperf3 through the proxy for 10 s (bytes per second, and the proxy's CPU
#     seconds per GB moved);
#  2. connections: wrk with `Connection: close` to an HTTP backend through the L4 proxy, so
#     every request is a new TCP connection (the proxy's CPU microseconds per connection).
# CPU is the proxy process's utime+stime from /proc, before and after.
# Usage: bench/tcp.sh   (needs a quiet machine: do not run it while others build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
base=${TCP_BENCH_PORT:-$((21000 + $(echo "$root" | cksum | cut -d' ' -f1) % 300 * 10))}
for tool in iperf3 wrk haproxy; do
  command -v $tool >/dev/null || { apt-get update -qq && apt-get install -y -qq iperf3 wrk haproxy >/dev/null; break; }
done
cargo build --release --manifest-path "$root/Cargo.toml" >/dev/null
bin=$root/target/release/velocity
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
iperf=$((base + 1)); http=$((base + 2)); vel=$((base + 3)); vel_http=$((base + 4)); ha=$((base + 5)); ha_http=$((base + 6))
iperf3 -s -p $iperf >/dev/null 2>&1 & pids+=($!)
"$bin" testserver --listen 127.0.0.1:$http --name b1 >/dev/null 2>&1 & pids+=($!)
cat > "$dir/velocity.yaml" <<YAML
listen: 127.0.0.1:$((base + 7))
access_log: off
listeners:
  - {name: iperf, listen: 127.0.0.1:$vel, protocol: tcp, service: iperf}
  - {name: http, listen: 127.0.0.1:$vel_http, protocol: tcp, service: http}
services:
  - name: iperf
    backends: [{address: 127.0.0.1:$iperf}]
  - name: http
    backends: [{address: 127.0.0.1:$http}]
YAML
cat > "$dir/haproxy.cfg" <<CFG
global
  maxconn 20000
defaults
  mode tcp
  timeout connect 2s
  timeout client 1h
  timeout server 1h
frontend iperf
  bind 127.0.0.1:$ha
  default_backend iperf
backend iperf
  server s1 127.0.0.1:$iperf
frontend http
  bind 127.0.0.1:$ha_http
  default_backend http
backend http
  server s1 127.0.0.1:$http
CFG
"$bin" run -c "$dir/velocity.yaml" >/dev/null 2>&1 & vpid=$!; pids+=($vpid)
haproxy -f "$dir/haproxy.cfg" -db >/dev/null 2>&1 & hpid=$!; pids+=($hpid)
for p in $vel $vel_http $ha $ha_http; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
run() {
  local name=$1 pid=$2 port=$3 http_port=$4
  local c0 c1 bps conns
  c0=$(cpu "$pid")
  bps=$(iperf3 -c 127.0.0.1 -p "$port" -t 10 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8)')
  c1=$(cpu "$pid")
  python3 -c "b=$bps; s=($c1-$c0)/$hz; print(f'$name throughput: {b/1e9:.2f} GB/s, {s / (b*10/1e9):.3f} CPU s per GB')"
  c0=$(cpu "$pid")
  conns=$(wrk -t2 -c32 -d10s -H 'Connection: close' "http://127.0.0.1:$http_port/" | awk '/requests in/{print $1}')
  c1=$(cpu "$pid")
  python3 -c "n=$conns; s=($c1-$c0)/$hz; print(f'$name connections: {n/10:,.0f}/s, {s*1e6/n:.1f} CPU us per connection')"
}
run velocity $vpid $vel $vel_http
run haproxy $hpid $ha $ha_http
