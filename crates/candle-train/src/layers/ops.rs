//! Differentiable building blocks that run in F32 (F64 for F64 inputs) whatever the input
//! dtype. Candle's fused `softmax_last_dim` has no backward rule; these are built from ops
//! that have one.

use candle::{DType, Device, Result, Tensor, D};

use crate::device::reduction_dtype;
use crate::layers::custom_grad::{custom1, custom2};

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

/// The additive causal mask `[t, t]`: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(values, (t, t), device)?.to_dtype(dtype)
}

/// `softmax(scores * scale + causal_mask)` over the last dimension of `scores`
/// (`[..., t, t]`), computed in F32 (F64 for F64 input) and returned in `scores`' dtype. Only the
/// result stays in the graph; the backward, `scale * y * (g - sum(g * y))`, runs in F32.
///
/// # Errors
/// When `scores` is not square in its last two dimensions.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = scores.dtype();
    let rd = reduction_dtype(dtype);
    let (t, t2) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    if t != t2 {
        candle::bail!("causal_softmax: scores of shape {:?} are not square", scores.dims());
    }
    let mask = causal_mask(t, rd, scores.device())?;
    let shifted = (scores.detach().to_dtype(rd)? * scale)?.broadcast_add(&mask)?;
    let value = softmax_last_dim(&shifted)?.to_dtype(dtype)?;
    custom1("causal-softmax", scores, value, move |_, y, g| {
        let (y, g) = (y.to_dtype(rd)?, g.to_dtype(rd)?);
        let dot = (&g * &y)?.sum_keepdim(D::Minus1)?;
        let grad = ((g.broadcast_sub(&dot)? * y)? * scale)?;
        Ok(Some(grad.to_dtype(dtype)?))
    })
}

/// `x + branch` where the residual stream `x` may be in a wider dtype than `branch` (an F32
/// stream and a BF16 block output): the sum is in `x`'s dtype, and the graph keeps no widened
/// copy of `branch`.
///
/// # Errors
/// On a shape mismatch.
pub fn residual_add(x: &Tensor, branch: &Tensor) -> Result<Tensor> {
    if x.dtype() == branch.dtype() {
        return x + branch;
    }
    let value = (x.detach() + branch.detach().to_dtype(x.dtype())?)?;
    custom2("residual-add", x, branch, value, |_, branch, _, g| {
        Ok((Some(g.clone()), Some(g.to_dtype(branch.dtype())?)))
    })
}

/// The additive key-padding bias `[batch, 1, 1, t]` for a `[batch, t]` mask of 1 (attend) and
/// 0 (padding): 0 where the mask is 1 and `f32::MIN` where it is 0, as Hugging Face BERT and
/// candle-transformers' `BertModel` build it. Large and finite: a row never becomes NaN.
///
/// # Errors
/// When `mask` is not two-dimensional.
pub fn padding_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?;
    let bias = ((keep.ones_like()? - keep)? * f64::from(f32::MIN))?;
    bias.reshape((b, 1, 1, t))?.to_dtype(dtype)
}

/// `softmax(scores * scale + bias)` over the last dimension of `scores` (`[batch, heads, t, s]`)
/// with `bias` broadcast to it (a key-padding bias from [`padding_bias`]), computed in F32 (F64
/// for F64 input) and returned in `scores`' dtype. The bias is a constant (it gets no
/// gradient). Only the result stays in the graph; the backward, `scale * y * (g - sum(g * y))`,
/// runs in F32.
///
/// # Errors
/// When `bias` does not broadcast to `scores`.
pub fn masked_softmax(scores: &Tensor, scale: f64, bias: &Tensor) -> Result<Tensor> {
    let dtype = scores.dtype();
    let rd = reduction_dtype(dtype);
    let shifted = (scores.detach().to_dtype(rd)? * scale)?.broadcast_add(&bias.detach().to_dtype(rd)?)?;
    let value = softmax_last_dim(&shifted)?.to_dtype(dtype)?;
    drop(shifted);
    custom1("masked-softmax", scores, value, move |_, y, g| {
        let (y, g) = (y.to_dtype(rd)?, g.to_dtype(rd)?);
        let dot = (&g * &y)?.sum_keepdim(D::Minus1)?;
        let grad = ((g.broadcast_sub(&dot)? * y)? * scale)?;
        Ok(Some(grad.to_dtype(dtype)?))
    })
}
