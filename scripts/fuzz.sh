#!/usr/bin/env bash
# Fuzzes the training-state checkpoint loader, the manifest parser and the fine-tuning data
# loaders (JSONL/CSV, label maps, chat templates), each for a bounded time
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
# The fine-tuning data loaders, seeded with one record of each format (first byte: 0 JSONL, 1 CSV).
mkdir -p corpus/datasets
printf '\0{"text": "a"}\n' > corpus/datasets/text
printf '\0{"prompt": "q", "completion": "a"}\n' > corpus/datasets/prompt
printf '\0{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n' > corpus/datasets/chat
printf '\0{"text": "a", "label": 3}\n' > corpus/datasets/label
printf '\001text,label\n"a, b",x\n' > corpus/datasets/csv
cargo +nightly fuzz run datasets corpus/datasets -- -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10
