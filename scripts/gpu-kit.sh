#!/usr/bin/env bash
# Builds the GPU run kit: the stripped `candle-fit` binary and the device-matrix test binary,
# with their build record, in one xz archive, KIT_DIR/kit.tar.xz (default gpu-kit/, ignored by
# git). scripts/gpu/device-run.sh unpacks and runs it; the device tool carries it:
#
#   scripts/gpu-kit.sh                       # here: the CUDA kit (--features nccl, release, sm_90a)
#   device run, carry ["gpu-kit"]:  scripts/gpu/device-run.sh quick "$OUT"   (then full)
#
#   scripts/gpu-kit.sh --cpu --profile dev DIR   # the CPU kit of CI's dry run (reuses the test build)
#
# The CUDA kit targets H100/H200 (sm_90a, CUDA 13.0 / driver 580) and is built through
# scripts/cuda-env.sh (cache and target folder under $HOME/.cache/candle-fit-cuda), in the
# release profile CI's CUDA lint also uses. It carries no CUDA library: on the GPU machine
# scripts/gpu/with-cuda-libs.sh takes cuBLAS, cuRAND, the runtime and NCCL from PyTorch's pip
# install. The two binaries hold the same GPU code (candle-kernels' PTX, about 33 MB each):
# one xz stream with a dictionary larger than a binary stores it about once.
#
# Limits it checks, and refuses above (the device tool sends at most 64 MiB: the working tree
# and the carried folders together): the kit at most 60 MiB, the kit plus the files git would
# send at most 64 MiB.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
device=cuda
profile=release
kit=
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) device=cpu; shift ;;
    --profile) profile=${2:?--profile needs release or dev}; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "gpu-kit: unknown option $1" >&2; exit 2 ;;
    *) kit=$1; shift ;;
  esac
done
case $profile in release) profile_flag=(--release); profile_dir=release ;; dev) profile_flag=(); profile_dir=debug ;;
  *) echo "gpu-kit: --profile must be release or dev" >&2; exit 2 ;; esac
kit=$(realpath -m "${kit:-gpu-kit}")
kit_limit=$((60 << 20))
travel_limit=$((64 << 20))

if [ "$device" = cuda ]; then
  env=(nice -n 10 scripts/cuda-env.sh)
  features=(--features nccl)
  features_note="nccl (implies cuda)"
else
  env=(env CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/candle-fit-target}")
  features=()
  features_note="none (CPU only)"
fi

# Building an integration test builds the package's binaries too, with the same (dev-
# dependency-unified) features: `cargo test` builds exactly these, so CI's dry run rebuilds nothing.
echo "== building candle-fit and the device-matrix tests ($profile, device $device)" >&2
tests=$("${env[@]}" cargo test "${profile_flag[@]}" "${features[@]}" --test device_matrix --no-run --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "device_matrix":
        print(m["executable"])')
[ -n "$tests" ] || { echo "gpu-kit: no device_matrix test binary was reported" >&2; exit 1; }
target=$("${env[@]}" sh -c 'echo "$CARGO_TARGET_DIR"')

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
strip -o "$staging/candle-fit" "$target/$profile_dir/candle-fit"
strip -o "$staging/device_matrix" "$tests"
cat > "$staging/BUILD.txt" <<INFO
commit      $(git rev-parse HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo " (with uncommitted changes)")
built       $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -m), $(rustc --version)
device      $device
features    ${features_note}; $profile profile
INFO
if [ "$device" = cuda ]; then
  cat >> "$staging/BUILD.txt" <<INFO
cuda        13.0 (nvcc 13.0.88, CUDARC_CUDA_VERSION=13000), CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
needs       NVIDIA driver >= 580, libcuda.so.1, and from PyTorch's pip wheels libcublas.so.13
            libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnccl.so.2; glibc >= 2.34
INFO
fi

rm -rf "$kit"
mkdir -p "$kit"
# A 128 MiB dictionary spans both binaries, so their shared GPU code is stored about once.
tar -C "$staging" -cf - BUILD.txt candle-fit device_matrix \
  | xz -T1 -9 --lzma2=preset=9,dict=128MiB > "$kit/kit.tar.xz.part"
mv "$kit/kit.tar.xz.part" "$kit/kit.tar.xz"
cp "$staging/BUILD.txt" "$kit/BUILD.txt"

size=$(stat -c %s "$kit/kit.tar.xz")
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "gpu-kit: $kit/kit.tar.xz is $(mib "$size") ($(mib "$(stat -c %s "$staging/candle-fit")") + $(mib "$(stat -c %s "$staging/device_matrix")") unpacked); the working tree sends $(mib "$tree")" >&2
if [ "$size" -gt "$kit_limit" ]; then
  echo "gpu-kit: the kit is over its limit of $(mib "$kit_limit"): refused" >&2
  rm -rf "$kit"
  exit 1
fi
if [ $((size + tree)) -gt "$travel_limit" ]; then
  echo "gpu-kit: the kit and the working tree are over the device tool's $(mib "$travel_limit"): refused" >&2
  rm -rf "$kit"
  exit 1
fi
echo "$kit"
