#!/usr/bin/env bash
# The demo (as root, on a fresh Debian machine): installs what it needs, builds weave and the
# demo, then simulates two hosts with network namespaces (each with its own dockerd), launches
# weave on both and shows containers talking. Everything it starts is removed at the end.
# WEAVE_PASSWORD sets the password the peers encrypt with (default: a demo password).
set -euo pipefail

cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: run as root (network namespaces, dockerd)" >&2
  exit 1
fi
bash .ci/install-deps.sh
cargo build --release -p weave -p weave-integration --bins
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
WEAVE_BIN="$TARGET/release/weave" exec "$TARGET/release/demo"
