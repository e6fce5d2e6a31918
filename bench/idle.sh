#!/usr/bin/env bash
# Memory per idle keep-alive client connection: Velocity, NGINX and HAProxy in turn, each
# proxying to one local backend (`velocity testserver`). For each proxy: one request to warm
# it up, read its RSS, open N connections that each send one request, read its answer and
# stay open (idle, kept alive), read the RSS again: (after - before) / N is what one idle
# connection costs in the proxy's process(es). Kernel socket buffers are not in RSS (they are
# the kernel's, and the same for the three).
# Usage: bench/idle.sh [N]   (default 9000; HAProxy needs `ulimit -n` above 2N, raised to the hard limit;
#        VELOCITY_BIN=path measures that binary instead of a fresh build, see bench/lib.sh)
# Everything listens on 127.0.0.1; every process the script starts is stopped by its PID.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
n=${1:-9000}
ulimit -n "$(ulimit -Hn)"
# HAProxy wants two descriptors per `maxconn` (a client and a server side) and refuses to start
# if the limit cannot hold them.
if [ "$(ulimit -n)" -le $((2 * (n + 100) + 100)) ]; then echo "ulimit -n is $(ulimit -n): too low for $n connections" >&2; exit 1; fi
need nginx haproxy
velocity_build
base=$(port_base 24000 300)
backend=127.0.0.1:$((base + 1))

"$bin" testserver --listen "$backend" --name idle >/dev/null 2>&1 & pids+=($!)

cat > "$dir/velocity.yaml" <<YAML
listen: 127.0.0.1:$((base + 2))
access_log: off
max_client_connections: $((n + 1000))
timeouts: {client_idle: 300s}
services:
  - name: idle
    backends: [{address: "$backend"}]
YAML
cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log;
worker_rlimit_nofile $((n + 1000));
events { worker_connections $((n + 1000)); }
http {
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 100000;
  upstream b { server $backend; keepalive 32; }
  server {
    listen 127.0.0.1:$((base + 3));
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
cat > "$dir/haproxy.cfg" <<CONF
global
  maxconn $((n + 100))
  nbthread 1
defaults
  mode http
  timeout connect 2s
  timeout client 300s
  timeout server 30s
  timeout http-keep-alive 300s
frontend f
  bind 127.0.0.1:$((base + 4))
  default_backend b
backend b
  server s1 $backend
CONF

cat > "$dir/idle.py" <<'PY'
import asyncio, os, sys, time

port, n, pids = int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")]
REQUEST = b"GET / HTTP/1.1\r\nHost: idle.local\r\n\r\n"

def rss_kib():
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return total

async def one(conns, gate):
    async with gate:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(REQUEST)
        head = await r.readuntil(b"\r\n\r\n")
        length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
        await r.readexactly(length)
        conns.append((r, w))

async def main():
    await one([], asyncio.Semaphore(1))      # warm up: the first request's one-off allocations
    time.sleep(0.5)
    before = rss_kib()
    conns, gate = [], asyncio.Semaphore(200)
    await asyncio.gather(*(one(conns, gate) for _ in range(n)))
    time.sleep(2.0)                          # Velocity gives buffers back after 50 ms idle
    after = rss_kib()
    print(f"{len(conns)} {before} {after}")
    for _, w in conns:
        w.close()

asyncio.run(main())
PY

wait_port() { for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
# The PIDs whose RSS counts: the process and its children (NGINX's worker).
family() { echo "$1$(pgrep -P "$1" | sed 's/^/,/' | tr -d '\n')"; }
measure() {  # NAME PORT PID
  wait_port "$2"
  read -r conns before after < <(python3 "$dir/idle.py" "$2" "$n" "$(family "$3")")
  python3 -c "print(f'{\"$1\":<9} {$conns} idle connections: RSS {$before/1024:.1f} -> {$after/1024:.1f} MiB, {($after-$before)/$conns:.2f} KiB per idle connection')"
  kill "$3"; wait "$3" 2>/dev/null || true
}

wait_port $((base + 1))
"$bin" run -c "$dir/velocity.yaml" >/dev/null 2>&1 & p=$!; pids+=($p); measure Velocity $((base + 2)) $p
nginx -p "$dir" -c "$dir/nginx.conf" >/dev/null 2>&1 & p=$!; pids+=($p); measure NGINX $((base + 3)) $p
haproxy -f "$dir/haproxy.cfg" >/dev/null 2>&1 & p=$!; pids+=($p); measure HAProxy $((base + 4)) $p
