#!/usr/bin/env bash
# Memory of per-client rate limits under many distinct clients (issue 15): 1,000,000 client
# addresses, each named by X-Forwarded-For from a trusted proxy (127.0.0.1), each limited by
# `key: client_ip`. Prints Velocity's resident memory before, at the peak (VmHWM) and after
# the idle keys have been swept (target: under 150 MiB at the peak, under 50 MiB after).
# Memory, not time: the figures do not depend on how loaded the machine is.
# Usage: bench/ratelimit_memory.sh [BIN] [CLIENTS]   (default: VELOCITY_BIN or a build, see bench/lib.sh; 1000000)
#   RATE=10/s BURST=20 (default): a key is forgotten once its bucket has refilled (governor
#   keeps it two intervals after its last request for a burst of 1), so the 5 s sweep keeps
#   only the last seconds' clients. RATE=1/m BURST=1: every key stays for two minutes, so all
#   1,000,000 are held at the peak (the worst case); WATCH=135 then sees them swept.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
clients=${2:-1000000}
VELOCITY_BIN=${1:-${VELOCITY_BIN:-}} velocity_build
base=$(port_base 21000)
cat > "$dir/velocity.yaml" <<YAML
listen: 127.0.0.1:$base
access_log: off
trusted_proxies: [127.0.0.1]
services:
  - name: web
    rate_limits: [{key: client_ip, rate: ${RATE:-10/s}, burst: ${BURST:-20}}]
    backends:
      - address: 127.0.0.1:$((base + 1))
YAML
"$bin" testserver --listen 127.0.0.1:$((base + 1)) --name b >/dev/null 2>&1 & pids+=($!)
"$bin" run -c "$dir/velocity.yaml" > "$dir/velocity.log" 2>&1 & vpid=$!
pids+=($vpid)
for _ in $(seq 300); do curl -sf -o /dev/null http://127.0.0.1:$base/ && break; sleep 0.1; done
python3 - "$base" "$vpid" "$clients" "${WATCH:-20}" <<'PY'
import socket, sys, threading, time

port, pid, clients, watch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def rss(field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    return 0.0

THREADS, BATCH = 4, 200
statuses = {}
lock = threading.Lock()

def ip(n):
    # Distinct addresses from 1.0.0.0 on: n < 2^24 stays in 1.0.0.0/8 .. 2.0.0.0/8.
    n += 1 << 24
    return f"{n >> 24 & 255}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"

def drive(first, last):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    seen = {}
    n = first
    while n < last:
        count = min(BATCH, last - n)
        reqs = b"".join(
            b"GET / HTTP/1.1\r\nHost: web\r\nX-Forwarded-For: %s\r\n\r\n" % ip(i).encode() for i in range(n, n + count)
        )
        s.sendall(reqs)
        got, limited = 0, 0
        tail_any, tail_429 = b"", b""
        while got < count:
            data = s.recv(1 << 16)
            if not data:
                raise SystemExit("velocity closed the connection")
            # Markers split across reads are counted once: each keeps its own short tail.
            a, b = tail_any + data, tail_429 + data
            got += a.count(b"HTTP/1.1 ")
            limited += b.count(b"HTTP/1.1 429")
            tail_any, tail_429 = a[-8:], b[-11:]
        seen[b"429"] = seen.get(b"429", 0) + limited
        seen[b"all"] = seen.get(b"all", 0) + got
        n += count
    s.close()
    with lock:
        for k, v in seen.items():
            statuses[k] = statuses.get(k, 0) + v

before = rss()
start = time.time()
per = clients // THREADS
threads = [threading.Thread(target=drive, args=(i * per, (i + 1) * per)) for i in range(THREADS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
took = time.time() - start
after_load = rss()
peak = rss("VmHWM")
print(f"{per * THREADS} distinct client addresses in {took:.0f}s; statuses {dict((k.decode(), v) for k, v in statuses.items())}")
print(f"resident memory: {before:.1f} MiB before, {peak:.1f} MiB at the peak (VmHWM), {after_load:.1f} MiB when the last request was answered")
# Keys are idle once their bucket has refilled; the sweep runs every 5 s. Watch for `watch`
# seconds: the figure after eviction is the one at the end.
t0 = time.time()
samples = []
while time.time() - t0 < watch:
    time.sleep(1)
    samples.append(rss())
print("resident memory each second after the last request: " + " ".join(f"{m:.0f}" for m in samples) + " MiB")
print(f"after eviction: {samples[-1]:.1f} MiB, {time.time() - t0:.0f}s after the last request")
PY
