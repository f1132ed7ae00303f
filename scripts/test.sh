#!/usr/bin/env bash
# The checks CI runs: formatting, clippy with warnings denied, and the whole test
# suite (which starts private PostgreSQL, Redis and Kafka-protocol servers; see
# job/src/embedded/).
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh -- embedded`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash ./scripts/install-deps.sh --test
if ! command -v cargo >/dev/null 2>&1; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
# One target directory outside the clone, shared by every build on the machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/engage/target}"

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# The UDF crates (udfs/, built against arrow 51): built ahead so no test waits
# for arrow 51 to compile (the first time, about 2.5 minutes on 2 cores).
step "engage udf build (udfs/*)"
cargo build -p engage
"$CARGO_TARGET_DIR/debug/engage" udf build

step "cargo test --workspace $*"
cargo test --workspace "$@"
