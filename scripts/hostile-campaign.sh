#!/usr/bin/env bash
# The hostile-guest campaign of issue 14, longer than CI's: SEEDS seeds from FIRST (default 1000
# from 1), ITERS guest steps per seed (default the guest's 200). One VM per seed; prints each
# failing seed with its console and the campaign's figures at the end:
#   scripts/hostile-campaign.sh [SEEDS] [FIRST] [ITERS]
# A failing seed replays exactly: scripts/hostile-campaign.sh 1 SEED.
set -euo pipefail
cd "$(dirname "$0")/.."
export HOSTILE_SEEDS="${1:-1000}"
export HOSTILE_SEED_BASE="${2:-1}"
if [[ -n "${3:-}" ]]; then
	export HOSTILE_ITERS="$3"
fi
# Build once, then run a frozen copy of kata-snap and of the test, so the tree may be rebuilt
# while a long campaign runs.
frozen="$(mktemp -d)"
trap 'rm -rf "$frozen"' EXIT
cargo build -p runtime-cli --bin kata-snap
test_bin="$(cargo test -p runtime-cli --test hostile_guest --no-run --message-format=json 2>/dev/null |
	sed -n 's/.*"executable":"\([^"]*hostile_guest[^"]*\)".*/\1/p' | tail -1)"
cp target/debug/kata-snap "$test_bin" "$frozen/"
export HOSTILE_KATA_SNAP="$frozen/kata-snap"
"$frozen/$(basename "$test_bin")" --nocapture
