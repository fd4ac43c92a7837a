#!/usr/bin/env bash
# Builds a link-time-only CUDA_HOME for candle-core 0.11 / cudarc 0.19 (feature dynamic-linking):
#   lib/libcuda.so     soname libcuda.so.1      (driver API, unversioned like the real driver)
#   lib/libcublas.so   soname libcublas.so.13   version node libcublas.so.13 (as the real wheel)
#   lib/libcublasLt.so soname libcublasLt.so.13 version node libcublasLt.so.13
#   lib/libcurand.so   soname libcurand.so.10   version node libcurand.so.10
#   lib/libnvrtc.so    soname libnvrtc.so.13    version node libnvrtc.so.13
#   lib/libnccl.so     soname libnccl.so.2      (unversioned, as the real wheel)
#   lib/libcudart.so   the real one from the nvidia-cuda-runtime wheel (candle-kernels needs it)
# Every stand-in function returns an error code and is never executed: at run time the loader
# uses the real libraries of the GPU machine, found by soname.
# usage: make-link-stubs.sh SITE_PACKAGES CUDARC_VERSION OUT   (run `cargo fetch` first)
set -euo pipefail
sp=$1; version=$2; out=$3
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$version" 2>/dev/null | head -1)
[ -n "$src" ] || { echo "no cudarc-$version sources in the cargo registry: run cargo fetch" >&2; exit 1; }
mkdir -p "$out/lib" "$out/stubsrc"
stub() { # name soname cudarc_module version_node(or -)
  local name=$1 soname=$2 module=$3 node=$4 c="$out/stubsrc/$1.c"
  grep -oP '^pub unsafe fn \K\w+' "$src/src/$module/sys/mod.rs" | sort -u \
    | sed 's/.*/int &(void) { return 999; }/' > "$c"
  [ -s "$c" ] || { echo "no symbols found for $name in $src/src/$module/sys/mod.rs" >&2; exit 1; }
  local script=()
  if [ "$node" != - ]; then
    echo "$node { global: *; };" > "$out/stubsrc/$name.map"
    script=(-Wl,--version-script="$out/stubsrc/$name.map")
  fi
  gcc -shared -fPIC -Wl,-soname,"$soname" "${script[@]}" -o "$out/lib/lib$name.so" "$c"
}
stub cuda     libcuda.so.1      driver   -
stub cublas   libcublas.so.13   cublas   libcublas.so.13
stub cublasLt libcublasLt.so.13 cublaslt libcublasLt.so.13
stub curand   libcurand.so.10   curand   libcurand.so.10
stub nvrtc    libnvrtc.so.13    nvrtc    libnvrtc.so.13
stub nccl     libnccl.so.2      nccl     -
ln -sf "$sp/nvidia/cu13/lib/libcudart.so.13" "$out/lib/libcudart.so"
ls -l "$out/lib"
