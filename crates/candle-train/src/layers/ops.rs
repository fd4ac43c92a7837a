//! Differentiable building blocks that run in F32 (F64 for F64 inputs) whatever the input
//! dtype. Candle's fused `softmax_last_dim` has no backward rule; these are built from ops
//! that have one.

use candle::{Result, Tensor, D};

use crate::device::reduction_dtype;

/// Softmax over the last dimension, computed in F32 (F64 for F64 input) and returned in
/// that dtype. The row maximum is subtracted detached: softmax is invariant to the shift, so
/// the gradient is exact and the max needs no backward.
///
/// # Errors
/// On a tensor error.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(reduction_dtype(x.dtype()))?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&sum)
}

/// Log-softmax over the last dimension, in F32 (F64 for F64 input).
///
/// # Errors
/// On a tensor error.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(reduction_dtype(x.dtype()))?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// The mean over the last dimension, keeping it, computed in the input's dtype (callers cast
/// first).
pub(crate) fn mean_last_dim(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? as f64;
    x.sum_keepdim(D::Minus1)? / n
}
