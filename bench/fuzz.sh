#!/usr/bin/env bash
# Run one fuzz target (fuzz/fuzz_targets/TARGET.rs) for SECONDS under nice, growing its corpus
# in fuzz/corpus/TARGET; crashes land in fuzz/artifacts/TARGET. Then, with --cmin, minimise
# the corpus (what is committed; tests/fuzz_corpus.rs replays it under cargo test).
# Usage: bench/fuzz.sh TARGET [SECONDS] [--cmin]     (default 600 s)
# Needs cargo-fuzz (cargo install cargo-fuzz) and a nightly toolchain (or RUSTC_BOOTSTRAP=1).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=${1:?usage: bench/fuzz.sh TARGET [SECONDS] [--cmin]}
seconds=${2:-600}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
toolchain=+nightly
rustup toolchain list 2>/dev/null | grep -q nightly || { toolchain=; export RUSTC_BOOTSTRAP=1; }
cd "$root/fuzz"
mkdir -p "corpus/$target"
# No sanitizer: the code under test is safe Rust, and without ASan it runs several times faster.
nice -n 19 cargo $toolchain fuzz run -s none "$target" "corpus/$target" -- \
  -max_total_time="$seconds" -max_len=16384 -print_final_stats=1 2>&1 | tee "/tmp/fuzz-$target.log" | grep -E "^#|Done|stat::|ERROR|panicked" | tail -20
if [ "${3:-}" = "--cmin" ]; then
  nice -n 19 cargo $toolchain fuzz cmin -s none "$target" "corpus/$target" 2>&1 | tail -2
fi
