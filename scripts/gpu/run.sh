#!/bin/sh
# The one command to run on the GPU machine, from the kit that scripts/gpu-kit.sh built: the
# CUDA device-matrix tests, then candle-fit's benchmark matrix and the PyTorch reference on the
# same GPT configurations (with fused attention, and with the score matrix materialised as
# candle-fit does), then nvidia-smi. Every step runs even if an earlier one fails; each
# step's exit status goes to OUT_DIR/status.txt.
#
# usage: ./run.sh OUT_DIR
# env:   GRIDS   which grids to run (default "default gpt2-small"; "smoke" for a 1-minute check)
#        PYTHON  the interpreter that has torch with CUDA (default python3)
set -u
kit=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
mkdir -p "$1" && out=$(cd "$1" && pwd)
PYTHON=${PYTHON:-python3}
GRIDS=${GRIDS:-default gpt2-small}
libs="$kit/with-cuda-libs.sh"
: > "$out/status.txt"

step() { # name command...
  name=$1; shift
  echo "== $name" >&2
  start=$(date +%s)
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$out/status.txt" >&2
  tail -n 5 "$out/$name.log" >&2
}

cp "$kit/BUILD.txt" "$out/"
step nvidia-smi nvidia-smi
step ldd sh -c "'$libs' ldd '$kit/candle-fit' && '$libs' ldd '$kit/device_matrix'"
if grep -q "not found" "$out/ldd.log"; then
  echo "missing libraries (see $out/ldd.log): install the pip nvidia-* wheels or set NV_LIBDIRS" >&2
  exit 1
fi
step torch-version "$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"

# 1. The device matrix on CUDA (and on CPU, as the same binary carries both).
step device-matrix "$libs" "$kit/device_matrix" --test-threads=1 --nocapture

# 2. + 3. candle-fit and PyTorch on the same grids and configurations.
for grid in $GRIDS; do
  case $grid in
    smoke)      shape="--layers 2 --width 64 --batch 4 --seq-len 64 --steps 3 --warmup 1" ;;
    default)    shape="--layers 4 --width 128 --batch 16 --seq-len 128 --steps 10 --warmup 3" ;;
    gpt2-small) shape="--layers 12 --width 768 --batch 8 --seq-len 512 --steps 10 --warmup 3" ;;
    *) echo "unknown grid $grid" >&2; continue ;;
  esac
  # shellcheck disable=SC2086
  step "candle-fit-$grid" "$libs" "$kit/candle-fit" bench --device cuda $shape --configs all \
    --json "$out/candle-fit-$grid.json" --markdown "$out/candle-fit-$grid.md"
  for attention in sdpa naive; do
    # shellcheck disable=SC2086
    step "pytorch-$attention-$grid" "$PYTHON" "$kit/pytorch_reference.py" --device cuda $shape --configs all \
      --attention "$attention" --corpus "$kit/prideprejudice.txt" \
      --json "$out/pytorch-$attention-$grid.json" --markdown "$out/pytorch-$attention-$grid.md"
  done
done
step nvidia-smi-after nvidia-smi
echo "results in $out:" >&2
cat "$out/status.txt" >&2
