#!/usr/bin/env bash
# HTTPS beside NGINX with the same certificate, one run each (issue 16):
#   keepalive: wrk over TLS on kept-alive connections: requests/s and CPU per request;
#   handshake: a new TLS connection per request (Connection: close): connections/s and CPU
#              per connection (a full handshake and one request: wrk does not resume sessions).
# Each proxy runs alone on CPU 1 with one worker (Velocity pinned there runs one; NGINX
# worker_processes 1); wrk and the same three `velocity testserver` backends (plain HTTP,
# keep-alive) run on CPU 0. CPU is the proxy's user+system time from /proc, over the run.
# Read the ratios: on a shared VM absolute figures drift.
# Usage: bench/tls.sh [SECONDS]   (default 10; VELOCITY_BIN=path skips the build).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
secs=${1:-10}
base=${TLS_BENCH_PORT:-$(port_base 27000)}
need wrk nginx curl openssl
velocity_build

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=bench.test" \
  -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
pin_clients
testservers $((base + 1)) $((base + 2)) $((base + 3))

cat > "$dir/velocity.yaml" <<YAML
access_log: off
listeners:
  - name: bench
    listen: 127.0.0.1:$((base + 4))
    tls:
      certificates: [{cert: $dir/cert.pem, key: $dir/key.pem}]
services:
  - name: bench
$(backends_yaml $((base + 1)) $((base + 2)) $((base + 3)))
YAML
cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream bench {
    server 127.0.0.1:$((base + 1)); server 127.0.0.1:$((base + 2)); server 127.0.0.1:$((base + 3));
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$((base + 5)) ssl;
    ssl_certificate $dir/cert.pem;
    ssl_certificate_key $dir/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_tickets on;
    location / { proxy_pass http://bench; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF

taskset -c 1 "$bin" run -c "$dir/velocity.yaml" >"$dir/velocity.log" 2>&1 & vpid=$!; pids+=($vpid)
# -e: the error log before the config is read (the default path may not be writable).
taskset -c 1 nginx -e "$dir/nginx-error.log" -c "$dir/nginx.conf" -g "daemon off;" >"$dir/nginx.log" 2>&1 &
npid=$!; pids+=($npid)
for port in $((base + 4)) $((base + 5)); do
  wait_for "https://127.0.0.1:$port/" curl -skf -o /dev/null https://127.0.0.1:$port/
done

declare -A rate cpu
run() { # NAME PID PORT MODE
  local name=$1 pid=$2 port=$3 mode=$4 extra=() before after out count
  [ "$mode" = handshake ] && extra=(-H "Connection: close")
  before=$(cpu_ticks "$pid")
  out=$(wrk -t1 -c16 -d"${secs}s" "${extra[@]}" https://127.0.0.1:$port/)
  after=$(cpu_ticks "$pid")
  count=$(awk '/requests in/{print $1}' <<<"$out")
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "$name $mode: errors:"; grep "Non-2xx\|Socket errors" <<<"$out"; fi
  rate[$name.$mode]=$(python3 -c "print($count / $secs)")
  cpu[$name.$mode]=$(python3 -c "print(($after - $before) / $hz * 1e6 / max($count, 1))")
  printf '%-9s %-10s %10.0f/s %10.1f us CPU each\n' "$name" "$mode" "${rate[$name.$mode]}" "${cpu[$name.$mode]}"
}

echo "proxy     scenario         rate        CPU"
for mode in keepalive handshake; do
  run velocity "$vpid" $((base + 4)) $mode
  run nginx "$npid" $((base + 5)) $mode
done
for mode in keepalive handshake; do
  python3 -c "print(f'$mode: Velocity/NGINX CPU each {${cpu[velocity.$mode]} / ${cpu[nginx.$mode]}:.2f}x, rate {${rate[velocity.$mode]} / ${rate[nginx.$mode]}:.2f}x')"
done
