#!/usr/bin/env bash
# Velocity beside NGINX and HAProxy on this machine, through the shared lbbench harness.
# Usage: bench/run.sh [extra lbbench.py flags, e.g. -r 5 -d 6 --scenario body]
# Prints lbbench's table: read the vs_nginx / vs_haproxy ratios, not absolute numbers.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
harness=${LBBENCH:-$root/../shared/bench}
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk nginx haproxy >/dev/null
fi
cargo build --release --manifest-path "$root/Cargo.toml"
exec python3 "$harness/lbbench.py" --proxies nginx,haproxy,velocity --custom-name velocity \
  --custom-cmd "$harness/velocity-bench.sh $root/target/release/velocity {port} {backends}" \
  -r 3 -d 6 --json /tmp/velocity-bench.json "$@"
