#!/usr/bin/env bash
# TCP (L4) mode beside HAProxy `mode tcp`, one run each, same backends, same clients:
#  1. throughput: iperf3 through the proxy (bytes per second, and the proxy's CPU seconds
#     per GB moved);
#  2. connections: wrk with `Connection: close` to an HTTP backend through the L4 proxy, so
#     every request is a new TCP connection through it (the proxy's CPU µs per connection).
# Each proxy runs alone on CPU 1 with one thread of work (Velocity pinned there runs one
# worker; HAProxy nbthread 1); iperf3, wrk and the backend run on CPU 0. CPU is the proxy's
# user+system time from /proc, over each run. Read the ratios: on a shared VM absolute
# figures drift.
# Usage: bench/tcp.sh [SECONDS]   (default 10; VELOCITY_BIN=path skips the build).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
secs=${1:-10}
base=${TCP_BENCH_PORT:-$(port_base 31000 170)}
need iperf3 wrk haproxy
velocity_build
iperf=$((base + 1)); http=$((base + 2)); vel=$((base + 3)); vel_http=$((base + 4)); ha=$((base + 5)); ha_http=$((base + 6))
pin_clients
iperf3 -s -p $iperf >"$dir/iperf3.log" 2>&1 & pids+=($!)
testservers $http
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
  # Its FD limit is 2 x maxconn + a few, under the 20,000 a container often allows.
  maxconn 4000
  nbthread 1
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
taskset -c 1 "$bin" run -c "$dir/velocity.yaml" >"$dir/velocity.log" 2>&1 & vpid=$!; pids+=($vpid)
taskset -c 1 haproxy -f "$dir/haproxy.cfg" -db >"$dir/haproxy.log" 2>&1 & hpid=$!; pids+=($hpid)
for p in $http $vel_http $ha_http; do
  wait_for "http://127.0.0.1:$p/" curl -sf -o /dev/null http://127.0.0.1:$p/
done

declare -A gbps cpu_gb conns cpu_conn
run() { # NAME PID IPERF_PORT HTTP_PORT
  local name=$1 pid=$2 port=$3 http_port=$4 c0 c1 bps out n
  c0=$(cpu_ticks "$pid")
  bps=$(iperf3 -c 127.0.0.1 -p "$port" -t "$secs" -J |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8)')
  c1=$(cpu_ticks "$pid")
  gbps[$name]=$(python3 -c "print($bps / 1e9)")
  cpu_gb[$name]=$(python3 -c "print(($c1 - $c0) / $hz / ($bps * $secs / 1e9))")
  c0=$(cpu_ticks "$pid")
  out=$(wrk -t1 -c32 -d"${secs}s" -H 'Connection: close' "http://127.0.0.1:$http_port/")
  c1=$(cpu_ticks "$pid")
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "$name connections: errors:"; grep "Non-2xx\|Socket errors" <<<"$out"; fi
  n=$(awk '/requests in/{print $1}' <<<"$out")
  conns[$name]=$(python3 -c "print($n / $secs)")
  cpu_conn[$name]=$(python3 -c "print(($c1 - $c0) / $hz * 1e6 / max($n, 1))")
  printf '%-9s throughput %6.2f GB/s %7.3f CPU s/GB   connections %8.0f/s %7.1f CPU us each\n' \
    "$name" "${gbps[$name]}" "${cpu_gb[$name]}" "${conns[$name]}" "${cpu_conn[$name]}"
}
run velocity $vpid $vel $vel_http
run haproxy $hpid $ha $ha_http
python3 -c "print(f'Velocity/HAProxy: throughput {${gbps[velocity]} / ${gbps[haproxy]}:.2f}x, CPU per GB {${cpu_gb[velocity]} / ${cpu_gb[haproxy]}:.2f}x, connections/s {${conns[velocity]} / ${conns[haproxy]}:.2f}x, CPU per connection {${cpu_conn[velocity]} / ${cpu_conn[haproxy]}:.2f}x')"
