//! RMS normalisation computed in F32 (Candle's fused `rms_norm` has no backward rule).

use candle::{Result, Tensor, Var};

use crate::device::reduction_dtype;
use crate::layers::ops::mean_last_dim;
use crate::params::ParamBuilder;

/// `y = x / sqrt(mean(x²) + eps) * weight` over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Var,
    eps: f64,
}

impl RmsNorm {
    /// Creates `{prefix}.weight` = 1.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn new(pb: &mut ParamBuilder, prefix: &str, dim: usize, eps: f64) -> crate::Result<Self> {
        Ok(Self { weight: pb.constant(format!("{prefix}.weight"), dim, 1.0)?, eps })
    }

    /// Normalises `x` over its last dimension in F32 (F64 for F64 input), returning `x`'s dtype.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let rd = reduction_dtype(dtype);
        let x = x.to_dtype(rd)?;
        let rms = (mean_last_dim(&x.sqr()?)? + self.eps)?.sqrt()?;
        x.broadcast_div(&rms)?.broadcast_mul(&self.weight.as_tensor().to_dtype(rd)?)?.to_dtype(dtype)
    }
}
