#!/usr/bin/env bash
# Fuzzes the training-state checkpoint loader and the manifest parser, each for a bounded time
# (default 120 s each):
#   scripts/fuzz.sh [SECONDS]
# Needs the nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz if absent.
# Not part of CI: the sanitizer build of Candle alone takes ~10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-120}"
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/candle-fit-fuzz-target}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# The seed: a real checkpoint of the tiny model, flattened, and truncated variants.
cargo +nightly run --release --bin make-seed -- corpus/checkpoint
cargo +nightly fuzz run checkpoint corpus/checkpoint -- -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10
# The manifest parser alone, seeded with the seed checkpoint's manifest body.
mkdir -p corpus/manifest
cargo +nightly run --release --bin make-seed -- corpus/checkpoint corpus/manifest
cargo +nightly fuzz run manifest corpus/manifest -- -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10
