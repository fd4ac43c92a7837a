//! With feature `cuda`: compiles `kernels/optim.cu` (the fused optimizer steps) to PTX with
//! the `nvcc` on `PATH` (scripts/cuda-env.sh provides one), for compute capability
//! `CUDA_COMPUTE_CAP` (default 80; PTX is JIT-compiled for newer GPUs by the driver). Without
//! the feature, nothing happens.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels/optim.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("optim.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "--fmad=false", "-prec-div=true", "-prec-sqrt=true"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("kernels/optim.cu")
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("candle-train: `{nvcc} --ptx kernels/optim.cu` failed ({s}); the `cuda` feature needs nvcc"),
        Err(e) => panic!(
            "candle-train: could not run `{nvcc}` to compile kernels/optim.cu ({e}); the `cuda` feature needs \
             nvcc on PATH (or NVCC=...; scripts/cuda-env.sh sets one up)"
        ),
    }
}
