#!/usr/bin/env bash
# Runs every test: unit, device-model, test-guest and Linux smoke tests (the README's test command).
# Tests that cannot run on this host print a SKIPPED line with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/fetch-linux-kernel.sh >/dev/null
cargo test --workspace --locked "$@"
