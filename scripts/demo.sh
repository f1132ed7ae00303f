#!/usr/bin/env bash
# Runs the demo end to end on this machine: installs what is missing, then
# `engage demo`, which starts private PostgreSQL, Redis and Kafka (Tansu) servers, generates load
# and runs the job. Arguments go to `engage demo` (see `engage demo --help`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash ./scripts/install-deps.sh
if ! command -v cargo >/dev/null 2>&1; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/engage/target}"

# The dev profile: the workspace builds dependencies at opt-level 1, which is fast
# enough to demo and far cheaper to build than a release binary.
cargo build -p engage --bin engage
# The UDF crates the mission SQL calls (udfs/), built ahead: the first time
# compiles arrow 51 for them (about 2.5 minutes on two cores).
"$CARGO_TARGET_DIR/debug/engage" udf build
exec "$CARGO_TARGET_DIR/debug/engage" demo "$@"
