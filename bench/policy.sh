#!/usr/bin/env bash
# Issue 15's cost figure: lbbench `small` through three Velocity instances in ONE run, their
# rounds interleaved (bench/lbbench_ab.py gives the harness's single custom slot to each):
#   plain   round robin over the harness's 3 backends, access log off (velocity-bench.sh's config);
#   plain2  the same again: an A/A control, the noise floor of the paired ratios;
#   policy  plain plus a rate limit (key client_ip, 1,000,000/s, burst 1,000,000) and a
#           10,000-entry deny list (/32s in 10.0.0.0/8), neither triggered by wrk's 127.0.0.1.
# The bar: policy at most 5% more CPU per request than plain.
# Usage: bench/policy.sh [lbbench flags]   (default -r 8 -d 4: more, shorter rounds, as the
#        harness's README advises below a 15% difference; VELOCITY_BIN=path skips the build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk nginx >/dev/null; }
bin=${VELOCITY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --manifest-path "$root/Cargo.toml" >/dev/null
  bin=$root/target/release/velocity
fi
# Ports from the checkout's path, so that two checkouts can run it at once.
base=$((23000 + $(echo "$root" | cksum | cut -d' ' -f1) % 300 * 50))
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
plain='listen: 127.0.0.1:$port
access_log: off
services:
  - name: bench
    algorithm: round_robin
    backends:
$backends
'
printf '%s' "$plain" > "$dir/plain.yaml"
{
  printf '%s' "$plain"
  echo "    rate_limits: [{key: client_ip, rate: 1000000/s, burst: 1000000}]"
  echo "    deny:"
  for i in $(seq 0 9999); do echo "      - 10.$((i / 65536)).$((i / 256 % 256)).$((i % 256))"; done
} > "$dir/policy.yaml"
python3 "$root/bench/lbbench_ab.py" --bin "$bin" \
  --variant plain="$dir/plain.yaml" --variant plain2="$dir/plain.yaml" --variant policy="$dir/policy.yaml" \
  --backend-port "$base" --nginx-port $((base + 5)) --haproxy-port $((base + 6)) --custom-port $((base + 7)) \
  -r 8 -d 4 "$@"
