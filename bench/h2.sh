#!/usr/bin/env bash
# HTTP/2 to clients beside NGINX (`http2 on`): h2load -c 64 -m 10 over TLS (ALPN h2, the same
# certificate for both), each proxy with one worker, both in front of the same three
# `velocity testserver` backends over HTTP/1.1. One run each: requests per second and CPU
# per request (the proxy's user+system CPU time over the run, from /proc). The machine is
# shared and noisy: compare the two figures of one run, not runs with each other.
# Usage: bench/h2.sh [REQUESTS]   (default 200000; VELOCITY_BIN skips the build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-200000}
for tool in nginx h2load openssl; do
  pkg=$tool; [ "$tool" = h2load ] && pkg=nghttp2-client
  command -v $tool >/dev/null || { apt-get update -qq && apt-get install -y -qq $pkg >/dev/null; }
done
bin=${VELOCITY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --manifest-path "$root/Cargo.toml" >/dev/null 2>&1
  bin=$root/target/release/velocity
fi
base=$((26000 + $(echo "$root" | cksum | cut -d' ' -f1) % 300 * 10))
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -keyout "$dir/k.pem" -out "$dir/c.pem" 2>/dev/null
for p in 1 2 3; do taskset -c 0 "$bin" testserver --listen 127.0.0.1:$((base + p)) --name b$p >/dev/null 2>&1 & pids+=($!); done
cat > "$dir/velocity.yaml" <<YAML
listen: 127.0.0.1:$((base + 8))
access_log: off
listeners:
  - name: tls
    listen: 127.0.0.1:$((base + 4))
    tls: {certificates: [{cert: $dir/c.pem, key: $dir/k.pem}]}
services:
  - name: bench
    backends: [{address: 127.0.0.1:$((base + 1))}, {address: 127.0.0.1:$((base + 2))}, {address: 127.0.0.1:$((base + 3))}]
YAML
cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  # HTTP/2 connections close after keepalive_requests (1000 by default) and h2load does not
  # reconnect: lift it, as Velocity has no such limit.
  keepalive_requests 10000000;
  upstream b { server 127.0.0.1:$((base + 1)); server 127.0.0.1:$((base + 2)); server 127.0.0.1:$((base + 3)); keepalive 64; }
  server {
    # NGINX 1.22 (Debian 12) has no `http2 on;` yet (1.25.1+): the listen flag is the same switch.
    listen 127.0.0.1:$((base + 5)) ssl http2;
    ssl_certificate $dir/c.pem; ssl_certificate_key $dir/k.pem;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
# Each proxy alone on CPU 1 (Velocity: one runtime worker, as NGINX has one worker process);
# h2load and the backends on CPU 0. `-e`: NGINX opens its default error log before reading
# the config otherwise, and fails without root's /var/log/nginx.
taskset -c 1 "$bin" run -c "$dir/velocity.yaml" > "$dir/velocity.log" 2>&1 & vel=$!; pids+=($vel)
taskset -c 1 nginx -e "$dir/nginx-error.log" -c "$dir/nginx.conf" > "$dir/nginx.log" 2>&1 & ngx=$!; pids+=($ngx)
for port in $((base + 4)) $((base + 5)); do
  for _ in $(seq 100); do curl -skf -o /dev/null --http2 https://127.0.0.1:$port/ && break; sleep 0.1; done
done
cpu() { # user+system ticks of a process and its children threads
  awk '{print $14 + $15}' "/proc/$1/stat"
}
run() { # name pid port
  local worker=$2
  [ "$1" = nginx ] && worker=$(pgrep -P "$2" | head -1)
  local before; before=$(cpu "$worker")
  local out; out=$(taskset -c 0 h2load -n "$n" -c 64 -m 10 "https://127.0.0.1:$3/" 2>&1)
  local after; after=$(cpu "$worker")
  local rps; rps=$(echo "$out" | awk '/^finished in/{print $4}')
  local ok; ok=$(echo "$out" | awk '/^requests:/{print $8}')
  local hz; hz=$(getconf CLK_TCK)
  python3 -c "t=($after-$before)/$hz; print(f'$1: {$rps} req/s, {$ok} succeeded, {t*1e6/$ok:.1f} us CPU per request')"
}
run velocity $vel $((base + 4))
run nginx $ngx $((base + 5))
