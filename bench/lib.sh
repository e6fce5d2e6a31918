# Sourced by the bench scripts: the build they share, the tools they install, and the
# processes they start, which are stopped (and the temporary folder removed) however the
# script ends: normally, on an error (set -e), or by Ctrl-C / SIGTERM.
#
# After `. bench/lib.sh`: $root (the checkout), $dir (a temporary folder), $pids (append the
# PID of everything started in the background), $hz (clock ticks per second).

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hz=$(getconf CLK_TCK)
dir=$(mktemp -d)
pids=()

bench_cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # Reaped before the folder goes: a process still writing its log there is gone first.
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# A port base for this checkout: BASE [STEPS] gives BASE plus one of STEPS (default 400)
# steps of 10 chosen by the checkout's path, so that two checkouts can run the same benchmark
# at once. Each script has its own range below the ephemeral ports (32768): callgrind.sh
# 20000, idle.sh 24000, tls.sh 27000, tcp.sh 31000 (170 steps).
port_base() {
  echo $(($1 + $(echo "$root" | cksum | cut -d' ' -f1) % ${2:-400} * 10))
}

# Install whichever of these tools is missing (Debian packages of the same names).
need() {
  local t missing=()
  for t in "$@"; do command -v "$t" >/dev/null || missing+=("$t"); done
  [ ${#missing[@]} -eq 0 ] || { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; }
}

# Sets $bin: $VELOCITY_BIN if given, else a release build with debug info in
# target/callgrind. Debug info changes no generated code, so callgrind (which needs the
# symbols) and the timing scripts share this one fat-LTO build instead of making two.
velocity_build() {
  bin=${VELOCITY_BIN:-}
  [ -z "$bin" ] || return 0
  if ! CARGO_PROFILE_RELEASE_DEBUG=1 nice cargo build --release --manifest-path "$root/Cargo.toml" \
    --target-dir "$root/target/callgrind" >"$dir/build.log" 2>&1; then
    tail -n 30 "$dir/build.log" >&2
    exit 1
  fi
  bin=$root/target/callgrind/release/velocity
}

# Start a `velocity testserver` backend on each of these ports (127.0.0.1), named bPORT.
testservers() {
  local p
  for p in "$@"; do "$bin" testserver --listen 127.0.0.1:$p --name b$p >"$dir/testserver-$p.log" 2>&1 & pids+=($!); done
}

# The `backends:` of a service (indented for `services: - name: ...`) on these ports.
backends_yaml() {
  local p
  echo "    backends:"
  for p in "$@"; do echo "      - address: 127.0.0.1:$p"; done
}

# From here on this script and what it starts run on CPU 0 (clients, backends), except what
# is started under `taskset -c 1` (the proxy measured, alone on its core).
pin_clients() {
  taskset -pc 0 $$ >/dev/null
}

# User+system clock ticks of processes and their children (NGINX's workers), threads included.
cpu_ticks() {
  local total=0 p
  for p in "$@" $(pgrep -P "$(echo "$@" | tr ' ' ,)" 2>/dev/null || true); do
    [ -r "/proc/$p/stat" ] && total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo $total
}

# Wait until CMD... succeeds (up to 30 s); else print the logs in $dir and fail.
wait_for() {
  local what=$1 i
  shift
  for i in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$what did not come up:" >&2
  tail -n 20 "$dir"/*.log >&2 || true
  exit 1
}
