#!/usr/bin/env bash
# Builds the fuzz targets (router/fuzz, proxy/fuzz) and runs each one over its committed seed
# corpus for a bounded time. Any crash, assertion failure, leak-sized allocation or timeout
# fails the script, naming the input that caused it.
#
#   bash .ci/fuzz.sh                  # CI: every target for FUZZ_SECONDS (default 10) each
#   bash .ci/fuzz.sh --long 3600      # a longer run, corpus kept under target/fuzz/corpus
#   bash .ci/fuzz.sh --long 600 gro   # only some targets
#   FUZZ_RUNS=10000000 bash .ci/fuzz.sh --long 3600   # stop each at 10 million executions
#
# Stable Rust only: plain cargo, with libFuzzer's coverage instrumentation (the sancov pass and
# flags that cargo-fuzz would pass) added by .ci/fuzz-rustc, so neither nightly nor cargo-fuzz
# is needed. Debug assertions and overflow checks are on in the code under test (the fuzz
# crates' profiles), as under cargo-fuzz, so arithmetic overflow in a parser is a crash. A
# crashing input is left in target/fuzz/artifacts; reproduce it with
# `target/release/<target> <file>`, fix the bug with a unit test next to the parser, and add
# the input to the target's corpus (router/fuzz/corpus/<target>/).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

SECONDS_EACH=${FUZZ_SECONDS:-10}
LONG=false
if [ "${1:-}" = "--long" ]; then
  LONG=true
  SECONDS_EACH=${2:?--long needs a number of seconds per target}
  shift 2
fi
ONLY=("$@")

CRATES=(router proxy)
# The main build's target directory: the dependencies are shared with it (see .ci/fuzz-rustc);
# the crates under test get their own artefacts (their profile differs), so nothing of the
# main build is overwritten with instrumented code.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}}
export RUSTC_WRAPPER=$ROOT/.ci/fuzz-rustc
BIN=$CARGO_TARGET_DIR/release
ARTIFACTS=$CARGO_TARGET_DIR/fuzz/artifacts
mkdir -p "$ARTIFACTS"

# libFuzzer is C++, built by libfuzzer-sys.
if ! command -v c++ >/dev/null; then
  apt-get install -y --no-install-recommends g++
fi

start=$(date +%s)
for crate in "${CRATES[@]}"; do
  # Same dependency versions as the main build (its lock file), plus libFuzzer's crates.
  cp Cargo.lock "$crate/fuzz/Cargo.lock"
  cargo build --release --manifest-path "$crate/fuzz/Cargo.toml" --bins
done
build_secs=$(($(date +%s) - start))
echo "fuzz: build took $build_secs s"

targets_of() { sed -n 's/^name = "\(.*\)"$/\1/p' "$1/fuzz/Cargo.toml" | tail -n +2; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failed=()
summary=()
for crate in "${CRATES[@]}"; do
  for target in $(targets_of "$crate"); do
    if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " =~ " $target " ]]; then
      continue
    fi
    seeds=$ROOT/$crate/fuzz/corpus/$target
    if $LONG; then
      # Long runs keep what they learn for the next long run (never in the repository).
      corpus=$CARGO_TARGET_DIR/fuzz/corpus/$target
    else
      corpus=$WORK/$target
    fi
    mkdir -p "$corpus"
    log=$WORK/$target.log
    echo "fuzz: $target for ${SECONDS_EACH}s"
    status=0
    # The seeds directory is read too (but new inputs only go into the first directory).
    "$BIN/$target" "$corpus" "$seeds" \
      -max_total_time="$SECONDS_EACH" -runs="${FUZZ_RUNS:--1}" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
      -artifact_prefix="$ARTIFACTS/$target-" -print_final_stats=1 >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    secs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\2/p' "$log" | tail -1)
    summary+=("$(printf '%-18s %12s execs %6ss  exit %s' "$target" "${execs:-?}" "${secs:-?}" "$status")")
    if [ "$status" -eq 0 ] && grep -q 'no interesting inputs were found' "$log"; then
      echo "fuzz: $target is not instrumented (built without .ci/fuzz-rustc?): touch $crate/src and rerun" >&2
      status=1
    fi
    if [ "$status" -ne 0 ]; then
      failed+=("$target")
      echo "===== fuzz: $target FAILED (exit $status); last lines of its log: =====" >&2
      tail -n 60 "$log" >&2
      grep -h 'Test unit written to' "$log" >&2 || true
    fi
  done
done

printf '\n===== fuzz summary (%s s each) =====\n' "$SECONDS_EACH"
printf '%s\n' "${summary[@]}"
echo "fuzz: build $build_secs s, total $(($(date +%s) - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs in $ARTIFACTS)" >&2
  exit 1
fi
