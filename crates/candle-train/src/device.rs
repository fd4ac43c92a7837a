//! Parsing the names users give for devices and dtypes.

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

/// Parses `cpu`, `cuda` or `cuda:N` and opens the device.
///
/// # Errors
/// [`Error::UnknownDevice`] for another name, or for CUDA in a build without the `cuda`
/// feature or on a machine without that GPU.
pub fn parse_device(name: &str) -> Result<Device> {
    let lower = name.to_ascii_lowercase();
    if lower == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match lower.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => return Err(Error::UnknownDevice(name.to_string())),
        },
        None => return Err(Error::UnknownDevice(name.to_string())),
    };
    Device::new_cuda(ordinal).map_err(|_| Error::UnknownDevice(name.to_string()))
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
}
