#!/bin/sh
# Runs a candle-fit CUDA binary on the GPU machine with the CUDA 13 libraries that pip installed
# for PyTorch (nvidia-* wheels) on the library path: the machine has the driver, but the
# binaries also need cuBLAS, cuRAND, the CUDA runtime and NCCL (the device machines' image has
# them all: nvidia-cublas, nvidia-curand, nvidia-cuda-runtime, nvidia-nccl-cu13).
# usage: ./with-cuda-libs.sh COMMAND [ARGS...]
# Set NV_LIBDIRS="dir1:dir2" when `python3` is not the interpreter that has torch.
if [ -z "${NV_LIBDIRS:-}" ]; then
  NV_LIBDIRS=$(python3 - <<'PY'
import os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = []
for root in list(nvidia.__path__):
    for sub in ("cu13/lib", "nccl/lib", "cublas/lib", "curand/lib", "cuda_runtime/lib", "cuda_nvrtc/lib"):
        d = os.path.join(root, sub)
        if os.path.isdir(d):
            dirs.append(d)
print(":".join(dirs))
PY
)
fi
[ -n "$NV_LIBDIRS" ] || echo "with-cuda-libs: no pip nvidia libraries found (set NV_LIBDIRS)" >&2
export LD_LIBRARY_PATH="$NV_LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$@"
