#!/usr/bin/env bash
# Builds the GPU run kit on this machine (no GPU needed): the release `candle-fit` binary and
# the device-matrix test binary with `--features nccl` for H100/H200 (sm_90a, CUDA 13.0 /
# driver 580), stripped, plus the PyTorch reference script, the corpus, libcurand.so.10 and the
# scripts that run everything there, in one folder (default gpu-kit/, ignored by git) and a tarball beside it.
#
# usage: scripts/gpu-kit.sh [KIT_DIR]
# then:  scp -r gpu-kit gpu-host:   and there:   gpu-kit/run.sh OUT_DIR
#
# Builds go through scripts/cuda-env.sh (its cache and target folder under
# $HOME/.cache/candle-fit-cuda), in the release profile CI's CUDA lint also uses, so the
# kernels CI compiled are reused.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
kit=$(realpath -m "${1:-gpu-kit}")
env=(nice -n 10 scripts/cuda-env.sh)

echo "== building candle-fit (release, --features nccl)" >&2
"${env[@]}" cargo build --release --features nccl --bin candle-fit
echo "== building the device-matrix tests (release, --features nccl)" >&2
tests=$("${env[@]}" cargo test --release --features nccl --test device_matrix --no-run --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "device_matrix":
        print(m["executable"])')
[ -n "$tests" ] || { echo "gpu-kit: no device_matrix test binary was reported" >&2; exit 1; }
target=$(scripts/cuda-env.sh sh -c 'echo "$CARGO_TARGET_DIR"')

rm -rf "$kit"
mkdir -p "$kit"
strip -o "$kit/candle-fit" "$target/release/candle-fit"
strip -o "$kit/device_matrix" "$tests"
# libcurand.so.10 from the pinned CUDA 13.0 wheel, as a fallback for machines whose PyTorch
# lacks it (with-cuda-libs.sh puts lib/ last on the library path).
mkdir -p "$kit/lib"
scripts/cuda-env.sh sh -c 'cp "$(dirname "$(command -v nvcc)")/../lib/libcurand.so.10" "$0"' "$kit/lib/"
cp benches/pytorch_reference.py data/austen/prideprejudice.txt scripts/gpu/run.sh scripts/gpu/with-cuda-libs.sh "$kit/"
cat > "$kit/BUILD.txt" <<INFO
commit      $(git rev-parse HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo " (with uncommitted changes)")
built       $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -m), $(rustc --version)
features    nccl (implies cuda); release profile
cuda        13.0 (nvcc 13.0.88, CUDARC_CUDA_VERSION=13000), CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
needs       NVIDIA driver >= 580, libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10
            libcudart.so.13, and libnccl.so.2 for device_matrix (PyTorch's pip nvidia-* wheels have them), glibc >= 2.34
run         ./run.sh OUT_DIR
INFO
tar -C "$(dirname "$kit")" -czf "$kit.tar.gz" "$(basename "$kit")"
ls -l "$kit" "$kit.tar.gz" >&2
echo "$kit"
