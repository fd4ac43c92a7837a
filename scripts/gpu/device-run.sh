#!/usr/bin/env bash
# The one command to run on a GPU machine lent through the `device` tool, from the repository
# root, with the kit that scripts/gpu-kit.sh built in gpu-kit/ (ignored by git; send it with
# `carry: ["gpu-kit"]`):
#
#   scripts/gpu/device-run.sh quick "$OUT"    # at most 170 s: give the call timeout_s 240
#   scripts/gpu/device-run.sh full "$OUT"     # at most 470 s: give the call timeout_s 540
#
# Budgets (every step runs under a timeout cut from the budget's deadline; a step over its
# time is killed and recorded as TIMEOUT, and the steps after it still run):
#   quick  the device matrix (its CUDA cases, NCCL on a group of one, and its CPU cases), a
#          smoke benchmark of candle-fit, and the PyTorch reference on the same smoke shape.
#   full   the default (L4-W128, 16 x 128) and GPT-2-small (L12-W768, 8 x 512) grids, for
#          candle-fit and for PyTorch (fused `sdpa` attention, and `naive`: the score matrix
#          materialised as candle-fit does), configurations fp32, fp32-tf32 (TF32 off and on),
#          bf16, f16 (loss scaling), recompute-all and accum4, each row with its peak memory by
#          category (CUDA pool high-water mark; torch.cuda.max_memory_allocated for PyTorch).
#          Host<->device transfer counters do not exist yet (issue 16): nothing to collect.
#
# The dry run (CI, every run): the same script with the CPU build of the kit:
#   scripts/gpu-kit.sh --cpu --profile dev DIR && scripts/gpu/device-run.sh quick OUT --device cpu --kit DIR
# On --device cpu every grid runs at the smoke shape with 2 measured steps (the same command
# lines, small enough for CI), and the PyTorch steps are skipped when python3 has no torch.
#
# What comes back (the device tool returns at most 8 files of 16 MiB): summary.txt (the build,
# the machine, every step's status and time, the tail of each failure), nvidia-smi.txt,
# device-matrix.log, candle-fit.json and pytorch.json (every row of every grid, in
# `candle-fit bench --json`'s schema), tables.md (every Markdown table), steps.log (the other
# steps' output). Exit status 0 when every step passed, 1 when one failed or timed out, 2 on
# bad usage or a kit that does not fit the device.
set -uo pipefail

usage() {
  echo "usage: $0 quick|full OUT_DIR [--device cuda|cpu] [--kit KIT_DIR]" >&2
  exit 2
}
[ $# -ge 2 ] || usage
budget=$1
out=$2
shift 2
device=cuda
repo=$(cd "$(dirname "$0")/../.." && pwd)
kit=$repo/gpu-kit
while [ $# -gt 0 ]; do
  case $1 in
    --device) [ $# -ge 2 ] || usage; device=$2; shift 2 ;;
    --kit) [ $# -ge 2 ] || usage; kit=$2; shift 2 ;;
    *) usage ;;
  esac
done
case $budget in
  quick) total=170 ;;
  full) total=470 ;;
  *) usage ;;
esac
case $device in cuda | cpu) ;; *) usage ;; esac
# On CPU (CI's dry run, a loaded 2-core machine, a debug build) every time limit is 5 times
# longer: the dry run checks the script, not the speed.
slow=1
[ "$device" = cuda ] || slow=5
total=$((total * slow))
[ -f "$kit/kit.tar.xz" ] || { echo "device-run: no $kit/kit.tar.xz (build it with scripts/gpu-kit.sh)" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
start=$(date +%s)
deadline=$((start + total))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
summary=$out/summary.txt
steps_log=$out/steps.log
: > "$summary"
: > "$steps_log"
failed=0

say() { echo "$*" | tee -a "$summary" >&2; }

# step NAME CAP_SECONDS LOG COMMAND [ARGS...]: runs COMMAND under a timeout of CAP_SECONDS or
# what is left of the budget, whichever is less, appending its output to LOG.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((deadline - $(date +%s)))
  if [ "$left" -lt 10 ]; then
    say "$(printf '%-34s %-24s' "$name" "SKIPPED (budget spent)")"
    failed=1
    return 1
  fi
  cap=$((cap * slow))
  [ "$cap" -le "$left" ] || cap=$left
  local t0 rc verdict offset
  offset=$(stat -c %s "$log" 2> /dev/null || echo 0)
  echo "== $name (at most ${cap} s): $*" >> "$log"
  t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) verdict=ok ;;
    124 | 137) verdict="TIMEOUT after ${cap} s" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  say "$(printf '%-34s %-24s %4d s' "$name" "$verdict" $(($(date +%s) - t0)))"
  if [ "$verdict" != ok ]; then
    failed=1
    tail -c +$((offset + 1)) "$log" | tail -n 25 | sed 's/^/    | /' >> "$summary"
    return 1
  fi
}

# 1. The kit: unpacked with Python's lzma (every machine with PyTorch has it; no xz needed).
"$PYTHON" - "$kit/kit.tar.xz" "$work/kit" <<'PY' || { echo "device-run: cannot unpack the kit" >&2; exit 2; }
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as tar:
    try:
        tar.extractall(sys.argv[2], filter="data")
    except TypeError:  # Python without extraction filters
        tar.extractall(sys.argv[2])
PY
bin=$work/kit
built_for=$(sed -n 's/^device *//p' "$bin/BUILD.txt")
if [ "$built_for" != "$device" ]; then
  echo "device-run: the kit was built for '$built_for', not for --device $device (see $kit/BUILD.txt)" >&2
  exit 2
fi
{
  echo "# candle-fit GPU kit: $budget budget, --device $device, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  cat "$bin/BUILD.txt"
  echo
  echo "host        $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
} >> "$summary"

run=()
if [ "$device" = cuda ]; then
  run=("$repo/scripts/gpu/with-cuda-libs.sh")
  # Fail instead of skipping when the GPU cannot be opened.
  export CANDLE_FIT_REQUIRE_CUDA=1
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1
  nvidia-smi -q >> "$out/nvidia-smi.txt" 2>&1
  grep -m1 'Driver Version' "$out/nvidia-smi.txt" | sed 's/^ */driver      /' >> "$summary"
  step libraries 30 "$steps_log" "${run[@]}" sh -c 'ldd "$1" "$2" > "$0"; cat "$0"; ! grep -q "not found" "$0"' \
    "$work/ldd.txt" "$bin/candle-fit" "$bin/device_matrix" \
    || say "missing libraries: PyTorch's pip nvidia-* wheels should have them (or set NV_LIBDIRS)"
fi
torch=yes
if ! "$PYTHON" -c 'import torch' 2> /dev/null; then
  torch=no
  if [ "$device" = cuda ]; then
    say "$(printf '%-34s %-24s' torch "FAILED (no torch in $PYTHON)")"
    failed=1
  else
    say "$(printf '%-34s %-24s' torch "skipped (no torch: the PyTorch steps are left out on CPU)")"
  fi
else
  step torch 60 "$steps_log" "$PYTHON" -c "
import torch
print('torch       ', torch.__version__, 'CUDA', torch.version.cuda)
if '$device' == 'cuda':
    print('gpu         ', torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory >> 20, 'MiB')
" && grep -E '^(torch|gpu)  ' "$steps_log" >> "$summary"
fi
echo >> "$summary"

# Grids: NAME -> shape flags shared by candle-fit bench and the PyTorch reference.
shape() {
  if [ "$device" = cpu ]; then
    echo "--layers 2 --width 64 --batch 4 --seq-len 32 --steps 2 --warmup 1 --eval-windows 2"
    return
  fi
  case $1 in
    smoke) echo "--layers 2 --width 64 --batch 4 --seq-len 64 --steps 3 --warmup 1 --eval-windows 4" ;;
    default) echo "--layers 4 --width 128 --batch 16 --seq-len 128 --steps 10 --warmup 3 --eval-windows 8" ;;
    gpt2-small) echo "--layers 12 --width 768 --batch 8 --seq-len 512 --steps 5 --warmup 2 --eval-windows 4" ;;
  esac
}
configs=fp32,fp32-tf32,bf16,f16,recompute-all,accum4
[ "$device" = cuda ] || configs=fp32,bf16,f16,recompute-all,accum4 # TF32 is CUDA-only

# bench_grid GRID CANDLE_CAP TORCH_CAP ATTENTION...: candle-fit, then PyTorch per attention.
bench_grid() {
  local grid=$1 ccap=$2 tcap=$3
  shift 3
  local flags
  read -r -a flags <<< "$(shape "$grid")"
  step "candle-fit $grid" "$ccap" "$steps_log" "${run[@]}" "$bin/candle-fit" bench --device "$device" \
    "${flags[@]}" --configs "$configs" --json "$work/candle-fit-$grid.json" --markdown "$work/candle-fit-$grid.md"
  [ "$torch" = yes ] || return 0
  local attention
  for attention in "$@"; do
    step "pytorch-$attention $grid" "$tcap" "$steps_log" "$PYTHON" "$repo/benches/pytorch_reference.py" \
      --device "$device" "${flags[@]}" --configs "$configs" --attention "$attention" \
      --corpus "$repo/data/austen/prideprejudice.txt" \
      --json "$work/pytorch-$attention-$grid.json" --markdown "$work/pytorch-$attention-$grid.md"
  done
}

case $budget in
  quick)
    # On CPU two quick cases stand for the matrix (cargo test runs all of it anyway).
    cases=()
    [ "$device" = cuda ] || cases=(--exact cpu::pinned_buffer_round_trips cpu::pool_counters_track_allocations)
    step "device matrix" 100 "$out/device-matrix.log" "${run[@]}" "$bin/device_matrix" --test-threads=1 --nocapture "${cases[@]}"
    bench_grid smoke 30 30 sdpa
    ;;
  full)
    bench_grid default 60 40 sdpa naive
    bench_grid gpt2-small 170 60 sdpa naive
    ;;
esac

# Results: every grid's rows in one JSON array per framework family, every table in one file.
"$PYTHON" - "$work" "$out" <<'PY'
import glob, json, os, sys
work, out = sys.argv[1:]
for family in ("candle-fit", "pytorch"):
    rows = []
    for path in sorted(glob.glob(os.path.join(work, f"{family}-*.json"))):
        with open(path) as f:
            rows.extend(json.load(f))
    if rows:
        with open(os.path.join(out, f"{family}.json"), "w") as f:
            json.dump(rows, f, indent=2)
tables = sorted(glob.glob(os.path.join(work, "*.md")))
if tables:
    with open(os.path.join(out, "tables.md"), "w") as f:
        for path in tables:
            f.write(f"## {os.path.basename(path)[:-3]}\n\n")
            with open(path) as t:
                f.write(t.read())
            f.write("\n")
PY
[ "$device" = cuda ] && nvidia-smi >> "$out/nvidia-smi.txt" 2>&1
# What the device tool returns: at most 8 plain files of at most 16 MiB, plainly named.
files=$(find "$out" -mindepth 1 | wc -l)
bad=$(find "$out" -mindepth 1 \( -not -type f -o -size +16M \) -print; find "$out" -mindepth 1 -name '*[!A-Za-z0-9._-]*' -print)
if [ "$files" -gt 8 ] || [ -n "$bad" ]; then
  say "OUT holds $files entries (at most 8 plain files of at most 16 MiB come back): ${bad:-too many}"
  failed=1
fi
echo >> "$summary"
say "$budget budget: $(($(date +%s) - start)) s of $total; $([ $failed = 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED')"
exit "$failed"
