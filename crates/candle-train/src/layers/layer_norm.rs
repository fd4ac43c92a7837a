//! Layer normalisation computed in F32 (Candle's fused `layer_norm` has no backward rule).

use candle::{Result, Tensor, Var};

use crate::device::reduction_dtype;
use crate::layers::ops::mean_last_dim;
use crate::params::ParamBuilder;

/// `y = (x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Var,
    bias: Var,
    eps: f64,
}

impl LayerNorm {
    /// Creates `{prefix}.weight` = 1 and `{prefix}.bias` = 0.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn new(pb: &mut ParamBuilder, prefix: &str, dim: usize, eps: f64) -> crate::Result<Self> {
        let weight = pb.constant(format!("{prefix}.weight"), dim, 1.0)?;
        let bias = pb.constant(format!("{prefix}.bias"), dim, 0.0)?;
        Ok(Self { weight, bias, eps })
    }

    /// Normalises `x` over its last dimension; statistics in F32 (F64 for F64 input), the
    /// result cast back to `x`'s dtype.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let rd = reduction_dtype(dtype);
        let x = x.to_dtype(rd)?;
        let centered = x.broadcast_sub(&mean_last_dim(&x)?)?;
        let var = mean_last_dim(&centered.sqr()?)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight.as_tensor().to_dtype(rd)?)?
            .broadcast_add(&self.bias.as_tensor().to_dtype(rd)?)?
            .to_dtype(dtype)
    }
}
