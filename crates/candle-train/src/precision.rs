//! The precision setting: which dtype parameters and activations use, and whether gradients
//! are loss-scaled.

use std::fmt;
use std::str::FromStr;

use candle::DType;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::loss_scale::LossScalerConfig;

/// Compute precision. Parameters live as variables in its dtype, so any model built with that
/// dtype trains in it unchanged; in BF16/F16 the optimizer owns FP32 master weights and FP32
/// gradient accumulators, and writes rounded values back after each step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// FP32 everywhere: the baseline; parameters are the FP32 state, no master copy.
    #[default]
    F32,
    /// BF16 compute with FP32 master weights; no loss scaling by default (BF16 has FP32's
    /// exponent range).
    Bf16,
    /// FP16 compute with FP32 master weights and dynamic loss scaling.
    F16,
}

impl Precision {
    /// The dtype parameters and activations use.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// The loss scaling this precision needs by default: PyTorch GradScaler's defaults for F16,
    /// none otherwise.
    pub fn default_loss_scaling(self) -> Option<LossScalerConfig> {
        match self {
            Precision::F16 => Some(LossScalerConfig::default()),
            Precision::F32 | Precision::Bf16 => None,
        }
    }

    /// The lowercase name (`f32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;

    /// Parses `f32`, `bf16` or `f16` (case-insensitive; `fp32`, `bfloat16`, `fp16` too).
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            _ => {
                Err(Error::config("precision", format!("unknown precision `{s}`: expected f32, bf16 or f16")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_pick_dtypes_and_scaling() {
        assert_eq!("BF16".parse::<Precision>().ok(), Some(Precision::Bf16));
        assert_eq!("fp16".parse::<Precision>().map(Precision::dtype).ok(), Some(DType::F16));
        assert!(Precision::F16.default_loss_scaling().is_some());
        assert!(Precision::Bf16.default_loss_scaling().is_none());
        let err = "f8".parse::<Precision>().err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, "invalid `precision`: unknown precision `f8`: expected f32, bf16 or f16");
    }
}
