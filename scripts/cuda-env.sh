#!/usr/bin/env bash
# Runs a command with what a `cuda`/`nccl` build of candle-fit needs, on a Linux x86-64 machine
# with NO GPU and NO CUDA toolkit: nvcc 13.0, CUDA headers and libcudart from PyPI, and link-time
# stand-ins for the driver and the other CUDA libraries. Everything lives in a cache folder
# outside the clone, so a warm machine reuses the venv, the stand-ins and the target folder.
#
# usage: scripts/cuda-env.sh COMMAND [ARGS...]
#   e.g. scripts/cuda-env.sh cargo clippy --release --workspace --all-targets --features nccl
#
# Environment (all optional):
#   CANDLE_FIT_CUDA_CACHE  cache folder (default $HOME/.cache/candle-fit-cuda)
#   CANDLE_FIT_CUDA_TARGET the CARGO_TARGET_DIR of CUDA builds (default $CANDLE_FIT_CUDA_CACHE/target;
#                          an inherited CARGO_TARGET_DIR is ignored, so CPU and CUDA builds each
#                          keep their own warm folder)
#   CUDA_COMPUTE_CAP       default 90 (sm_90a: H100/H200 only; required without nvidia-smi)
#   CUDAFORGE_THREADS      nvcc jobs in candle-kernels' build script (default 2)
#
# Versions are pinned to CUDA 13.0, what driver 580 runs: nvcc 13.1+ is refused by cudarc and
# emits PTX a 13.0 driver cannot load, and an unpinned nvidia-cuda-nvcc==13.0.88 drags in
# nvvm/crt 13.5. The binaries this builds cannot start without libcuda.so.1: never run them here.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache="${CANDLE_FIT_CUDA_CACHE:-$HOME/.cache/candle-fit-cuda}"
mkdir -p "$cache"
venv="$cache/venv"
link="$cache/link"
# cuRAND is linked against a stand-in (step 2); the GPU machines' PyTorch install has the real one.
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96)

# 1. The CUDA 13.0 compiler, headers and libcudart, once per pin set.
if [ "$(cat "$venv/.pins" 2>/dev/null)" != "${pins[*]}" ]; then
  echo "cuda-env: installing ${pins[*]} into $venv" >&2
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
  echo "${pins[*]}" > "$venv/.pins"
fi
sp=$(echo "$venv"/lib/python3*/site-packages)
[ -x "$sp/nvidia/cu13/bin/nvcc" ] || { echo "cuda-env: no nvcc in $sp/nvidia/cu13/bin" >&2; exit 1; }

# 2. Link-time stand-ins, made from the symbol lists of the cudarc that Cargo.lock pins.
cudarc=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3 }' "$repo/Cargo.lock")
[ -n "$cudarc" ] || { echo "cuda-env: Cargo.lock has no cudarc (features not declared?)" >&2; exit 1; }
if [ "$(cat "$link/.cudarc" 2>/dev/null)" != "$cudarc" ] || [ ! -e "$link/lib/libcudart.so" ]; then
  (cd "$repo" && cargo fetch --quiet)
  "$repo/scripts/cuda/make-link-stubs.sh" "$sp" "$cudarc" "$link" >&2
  echo "$cudarc" > "$link/.cudarc"
fi

# 3. The environment candle-kernels (cudaforge) and cudarc's build scripts read.
export PATH="$sp/nvidia/cu13/bin:$PATH"
export CUDA_HOME="$link"                 # cudarc: -L $CUDA_HOME/lib for -lcuda -lcublas ... -lcudart
export CUDARC_CUDA_VERSION=13000         # bindings for CUDA 13.0 (driver 580)
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
export CARGO_TARGET_DIR="${CANDLE_FIT_CUDA_TARGET:-$cache/target}"
exec "$@"
