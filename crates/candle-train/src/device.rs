//! Parsing the names users give for devices and dtypes, and the device of a launched rank
//! (`LOCAL_RANK`, as torchrun and Slurm wrappers set it).

use candle::{DType, Device};

use crate::error::{Error, Result};

/// Parses `f32`, `bf16`, `f16` or `f64` (case-insensitive).
///
/// # Errors
/// [`Error::UnknownDType`] for anything else.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "f64" | "fp64" | "float64" => Ok(DType::F64),
        _ => Err(Error::UnknownDType(name.to_string())),
    }
}

/// A device name resolved to what it opens, before anything is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

/// Resolves `cpu`, `cuda` or `cuda:N` (case-insensitive). A bare `cuda` means the process's
/// local rank when a launcher set one (`local_rank`, the value of `LOCAL_RANK`), so that one
/// process per GPU each takes its own; otherwise device 0. An explicit `cuda:N` always wins.
///
/// # Errors
/// [`Error::UnknownDevice`] for another name; [`Error::InvalidConfig`] for a `LOCAL_RANK`
/// that is not a non-negative integer.
pub fn resolve_device(name: &str, local_rank: Option<&str>) -> Result<DeviceChoice> {
    let lower = name.to_ascii_lowercase();
    if lower == "cpu" {
        return Ok(DeviceChoice::Cpu);
    }
    match lower.strip_prefix("cuda") {
        Some("") => {
            match local_rank {
                None => Ok(DeviceChoice::Cuda(0)),
                Some(rank) => rank.trim().parse::<usize>().map(DeviceChoice::Cuda).map_err(|_| {
                    Error::config("LOCAL_RANK", format!("`{rank}` is not a non-negative integer"))
                }),
            }
        }
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Ok(DeviceChoice::Cuda(n)),
            None => Err(Error::UnknownDevice(name.to_string())),
        },
        None => Err(Error::UnknownDevice(name.to_string())),
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` and opens the device; a bare `cuda` takes the GPU of the
/// environment's `LOCAL_RANK` (see [`resolve_device`]).
///
/// # Errors
/// As [`resolve_device`], and [`Error::UnknownDevice`] for CUDA in a build without the `cuda`
/// feature or on a machine without that GPU.
pub fn parse_device(name: &str) -> Result<Device> {
    let local_rank = std::env::var("LOCAL_RANK").ok();
    match resolve_device(name, local_rank.as_deref())? {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(ordinal) => Device::new_cuda(ordinal).map_err(|_| {
            let name = if name.contains(':') { name.to_string() } else { format!("{name}:{ordinal}") };
            Error::UnknownDevice(name)
        }),
    }
}

/// The dtype reductions, norms, softmax and losses run in for inputs of `dtype`: F64 stays
/// F64 (for finite-difference checks), everything else is F32. Candle's CPU half-precision
/// sums accumulate in the half type, so no reduction may run in it.
pub fn reduction_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_and_device_names_parse_or_fail_clearly() {
        assert_eq!(parse_dtype("BF16").ok(), Some(DType::BF16));
        assert_eq!(parse_dtype("f16").ok(), Some(DType::F16));
        let err = parse_dtype("int7").err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("unknown dtype `int7`: expected one of f32, bf16, f16, f64"));
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(parse_device("tpu"), Err(Error::UnknownDevice(_))));
        assert!(matches!(parse_device("cuda:x"), Err(Error::UnknownDevice(_))));
    }

    #[test]
    fn bare_cuda_follows_local_rank_and_explicit_ordinals_win() {
        assert_eq!(resolve_device("CPU", Some("3")).ok(), Some(DeviceChoice::Cpu));
        assert_eq!(resolve_device("cuda", None).ok(), Some(DeviceChoice::Cuda(0)));
        assert_eq!(resolve_device("cuda", Some("3")).ok(), Some(DeviceChoice::Cuda(3)));
        assert_eq!(resolve_device("cuda", Some(" 1\n")).ok(), Some(DeviceChoice::Cuda(1)));
        assert_eq!(resolve_device("cuda:2", Some("3")).ok(), Some(DeviceChoice::Cuda(2)));
        let err = resolve_device("cuda", Some("-1")).err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("invalid `LOCAL_RANK`: `-1` is not a non-negative integer"));
        assert!(matches!(resolve_device("cuda:", None), Err(Error::UnknownDevice(_))));
        assert!(matches!(resolve_device("gpu", Some("0")), Err(Error::UnknownDevice(_))));
    }
}
