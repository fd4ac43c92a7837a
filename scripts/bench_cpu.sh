#!/usr/bin/env bash
# Reproduces every CPU table of BENCHMARKS.md. Usage: scripts/bench_cpu.sh [OUT_DIR]
# Run on an otherwise idle machine: step times are wall-clock.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results}"
mkdir -p "$out"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/candle-fit-target}"
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/candle-fit"

# 1. The README's run: the default GPT for 300 steps.
"$bin" train --quiet | tee "$out/default-train.txt"

# 2. Every technique against the FP32 baseline, on the default GPT and a larger one.
"$bin" bench --layers 4 --width 128 --batch 16 --seq-len 128 --steps 5 --warmup 2 \
  --json "$out/techniques-default.json" --markdown "$out/techniques-default.md" --chart "$out/techniques-default.svg"
"$bin" bench --layers 8 --width 256 --batch 8 --seq-len 128 --steps 5 --warmup 2 \
  --configs fp32,candle-plain,recompute-all,recompute-sqrt,accum4,bf16,f16,bf16+recompute-all+accum4 \
  --json "$out/techniques-large.json" --markdown "$out/techniques-large.md"

# 3. Peak memory against depth for each recompute policy and plain Candle backward.
"$bin" bench --layers 4,8,16,24,48 --width 64 --batch 8 --seq-len 64 --steps 5 --warmup 1 \
  --configs fp32,candle-plain,recompute-sqrt,recompute-all \
  --json "$out/recompute-depth.json" --markdown "$out/recompute-depth.md"

# 3b. Peak memory against width, sequence length and micro-batch.
for grid in "--width 64,128,256 --batch 8 --seq-len 128" "--width 128 --batch 8 --seq-len 64,128,256" \
  "--width 128 --batch 4,8,16 --seq-len 128"; do
  name=$(echo "$grid" | tr -d ' -' | tr ',' '_')
  # shellcheck disable=SC2086 # the grid is several flags
  "$bin" bench --layers 4 $grid --steps 5 --warmup 2 --configs fp32,recompute-all,accum4,bf16,adamw8bit \
    --json "$out/scaling-$name.json" --markdown "$out/scaling-$name.md"
done

# 10. 8-bit and offloaded optimizers in the harness, and the CPU optimizer step against the
# machine's memory bandwidth.
"$bin" bench --layers 8 --width 256 --batch 8 --seq-len 128 --steps 5 --warmup 2 \
  --configs fp32,adamw8bit,offload,bf16+recompute-all+adamw8bit+offload \
  --json "$out/optimizers.json" --markdown "$out/optimizers.md"
"$bin" bench-optimizer --json "$out/optimizer-throughput.json" | tee "$out/optimizer-throughput.md"

# 6. ZeRO stages 0-2 on 1-8 in-process ranks: state bytes, bytes sent, tokens/s.
cargo run --release --quiet --example zero_scaling -- 4 128 6 | tee "$out/zero-scaling.md"

# 6b. One process per rank over TCP: per-rank peak heap for ZeRO 0-2 on 1, 2, 4 processes.
for S in 0 1 2; do for N in 1 2 4; do
  echo "== stage $S N $N"
  "$bin" launch --nproc $N -- train --zero $S --steps 4 --micro-batch 16 \
    --accumulation-steps 2 --seq-len 64 --context 64 --eval-windows 4 --eval-interval 0 --quiet
done; done | tee "$out/zero-processes.txt"

# 14. candle-fit against PyTorch eager on the CPU, interleaved (needs torch for python3; never
# in CI). Add `--candle before=OLD_BINARY` for a before/after comparison in the same run.
if python3 -c "import torch" 2>/dev/null; then
  python3 benches/cpu_compare.py --candle after="$bin" --rounds 3 --steps 3 --warmup 1 \
    --json "$out/cpu-compare.json" --markdown "$out/cpu-compare.md"
fi
