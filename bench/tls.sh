#!/usr/bin/env bash
# HTTPS beside NGINX with the same certificate, one run each (issue 16):
#   keepalive: wrk over TLS on kept-alive connections: requests/s and CPU per request;
#   handshake: a new TLS connection per request (Connection: close): connections/s and CPU
#              per connection (full handshakes: wrk does not resume sessions).
# Both proxies use one worker (Velocity: taskset to one CPU; NGINX: worker_processes 1) and
# the same three `velocity testserver` backends over plain HTTP with keep-alive.
# Usage: bench/tls.sh [SECONDS]   (default 10; VELOCITY_BIN=path skips the build).
# CPU is the proxy's user+system time from /proc, over the run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-10}
base=${TLS_BENCH_PORT:-$((21000 + $(echo "$root" | cksum | cut -d' ' -f1) % 400 * 10))}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
bin=${VELOCITY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --manifest-path "$root/Cargo.toml" >/dev/null 2>&1
  bin=$root/target/release/velocity
fi
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=bench.test" \
  -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
for p in $((base + 1)) $((base + 2)) $((base + 3)); do
  "$bin" testserver --listen 127.0.0.1:$p --name b$p >/dev/null 2>&1 & pids+=($!)
done

cat > "$dir/velocity.yaml" <<YAML
access_log: off
listeners:
  - name: bench
    listen: 127.0.0.1:$((base + 4))
    tls:
      certificates: [{cert: $dir/cert.pem, key: $dir/key.pem}]
services:
  - name: bench
    backends:
      - address: 127.0.0.1:$((base + 1))
      - address: 127.0.0.1:$((base + 2))
      - address: 127.0.0.1:$((base + 3))
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

taskset -c 0 "$bin" run -c "$dir/velocity.yaml" >"$dir/velocity.log" 2>&1 & vpid=$!; pids+=($vpid)
nginx -c "$dir/nginx.conf" -g "daemon off;" >"$dir/nginx.log" 2>&1 & npid=$!; pids+=($npid)
for port in $((base + 4)) $((base + 5)); do
  ready=
  for _ in $(seq 300); do curl -skf -o /dev/null https://127.0.0.1:$port/ && ready=1 && break; sleep 0.1; done
  [ -n "$ready" ] || { echo "https://127.0.0.1:$port/ did not answer:"; tail -n 20 "$dir"/*.log; exit 1; }
done

# User+system clock ticks of a process and its children threads/workers.
ticks() {
  local total=0 p
  for p in "$@" $(pgrep -P "$1" 2>/dev/null || true); do
    [ -r /proc/$p/stat ] && total=$((total + $(awk '{print $14 + $15}' /proc/$p/stat)))
  done
  echo $total
}
hz=$(getconf CLK_TCK)

run() { # NAME PID PORT MODE
  local name=$1 pid=$2 port=$3 mode=$4 extra=() before after out count
  [ "$mode" = handshake ] && extra=(-H "Connection: close")
  before=$(ticks "$pid")
  out=$(wrk -t1 -c16 -d"${secs}s" "${extra[@]}" https://127.0.0.1:$port/)
  after=$(ticks "$pid")
  count=$(awk '/requests in/{print $1}' <<<"$out")
  python3 -c "c=$count; t=($after-$before)/$hz; print(f'{\"$name\":9} {\"$mode\":10} {c/$secs:10.0f}/s {t*1e6/max(c,1):10.1f} us CPU each')"
}

echo "proxy     scenario      rate          CPU"
for mode in keepalive handshake; do
  run velocity "$vpid" $((base + 4)) $mode
  run nginx "$npid" $((base + 5)) $mode
done
