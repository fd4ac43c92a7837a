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
    // One pass per row and one buffer on the CPU (`fused`), the same backward.
    if let Some(probs) = crate::layers::fused::causal_softmax(scores, scale)? {
        return Ok(probs);
    }
    let mask = causal_mask(t, rd, scores.device())?;
    let shifted = (scores.detach().to_dtype(rd)? * scale)?.broadcast_add(&mask)?;
    let value = softmax_last_dim(&shifted)?.to_dtype(dtype)?;
    custom1("causal-softmax", scores, value, move |_, y, g| softmax_backward(y, g, scale).map(Some))
}

/// Softmax's backward `scale * y * (g - sum(g * y))` over the last dimension: in one pass on
/// the CPU (`softmax_backward_cpu`), else from tensor ops in F32 (F64 for F64), returned in `y`'s
/// dtype.
pub(crate) fn softmax_backward(y: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    if let Some(grad) = softmax_backward_cpu(y, g, scale)? {
        return Ok(grad);
    }
    let (dtype, rd) = (y.dtype(), reduction_dtype(y.dtype()));
    let (y, g) = (y.to_dtype(rd)?, g.to_dtype(rd)?);
    let dot = (&g * &y)?.sum_keepdim(D::Minus1)?;
    let grad = ((g.broadcast_sub(&dot)? * y)? * scale)?;
    grad.to_dtype(dtype)
}

/// Softmax's backward `scale * y * (g - sum(g * y))` over the last dimension in one pass per
/// row, on CPU, when `y` and `g` are contiguous and of one dtype
/// ([`fused::softmax_backward`](crate::layers::fused::softmax_backward): rows in parallel;
/// F32/F64 in F64, BF16/F16 with F32 products and an F64 row sum): only the result is
/// allocated, in the input's dtype (the tensor-op path holds several F32 temporaries of the
/// full `[batch, heads, t, t]` size at once). `None` elsewhere.
fn softmax_backward_cpu(y: &Tensor, g: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    crate::layers::fused::softmax_backward(y, g, scale)
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
        if let Some(grad) = softmax_backward_cpu(y, g, scale)? {
            return Ok(Some(grad));
        }
        let (y, g) = (y.to_dtype(rd)?, g.to_dtype(rd)?);
        let dot = (&g * &y)?.sum_keepdim(D::Minus1)?;
        let grad = ((g.broadcast_sub(&dot)? * y)? * scale)?;
        Ok(Some(grad.to_dtype(dtype)?))
    })
}

/// GELU in its exact erf form, `x Φ(x)`, with the exact backward `Φ(x) + x φ(x)`, computed in
/// F32 (F64 for F64 input) and returned in `x`'s dtype. Candle's own `gelu_erf` backward rounds
/// 1/√(2π) to a few digits (2.4e-7 relative in F64); this one is exact to the dtype.
///
/// # Errors
/// On a tensor error.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let rd = reduction_dtype(x.dtype());
    let cdf = |x: &Tensor| -> Result<Tensor> { ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5 };
    let value = {
        let x = x.detach().to_dtype(rd)?;
        (&x * cdf(&x)?)?
    }
    .to_dtype(x.dtype())?;
    custom1("gelu-erf", x, value, move |x, _, g| {
        // 1/√(2π) = (2/√π) (1/√2) / 2, from two correctly rounded constants.
        let inv_sqrt_2pi = std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2 * 0.5;
        let x = x.to_dtype(rd)?;
        let pdf = ((x.sqr()? * -0.5)?.exp()? * inv_sqrt_2pi)?;
        let slope = (cdf(&x)? + (&x * pdf)?)?;
        Ok(Some((g.to_dtype(rd)? * slope)?.to_dtype(g.dtype())?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_pass_softmax_backward_equals_the_tensor_op_formula() -> Result<()> {
        let y = softmax_last_dim(&Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &Device::Cpu)?)?;
        let g = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &Device::Cpu)?;
        let scale = 0.37;
        for (dtype, tolerance) in
            [(DType::F64, 1e-6), (DType::F32, 1e-6), (DType::BF16, 2e-2), (DType::F16, 2e-3)]
        {
            let (yd, gd) = (y.to_dtype(dtype)?, g.to_dtype(dtype)?);
            let fused = softmax_backward_cpu(&yd, &gd, scale)?
                .ok_or_else(|| candle::Error::Msg("no CPU path".into()))?;
            assert_eq!(fused.dtype(), dtype);
            // Against the formula on the same (rounded) inputs.
            let (y32, g32) = (yd.to_dtype(DType::F32)?, gd.to_dtype(DType::F32)?);
            let dot = (&g32 * &y32)?.sum_keepdim(D::Minus1)?;
            let expected = ((g32.broadcast_sub(&dot)? * &y32)? * scale)?;
            let diff = (fused.to_dtype(DType::F32)? - &expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let size = expected.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= tolerance * size, "{dtype:?}: {diff} vs {size}");
        }
        // A non-contiguous gradient takes the tensor-op path.
        let strided = g.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
        assert!(softmax_backward_cpu(&y, &strided, scale)?.is_none());
        Ok(())
    }

    /// The exact GELU's derivative from Richardson-extrapolated central differences in F64
    /// (error O(h⁴) ≈ 1e-11 at h = 1e-2, rounding ≈ 1e-14).
    fn gelu_slope_by_differences(x: &Tensor) -> Result<Tensor> {
        let f = |shift: f64| -> Result<Tensor> { gelu_erf(&x.affine(1.0, shift)?) };
        let central = |h: f64| -> Result<Tensor> { (f(h)? - f(-h)?)? / (2.0 * h) };
        let (coarse, fine) = (central(1e-2)?, central(5e-3)?);
        ((fine * 4.0)? - coarse)? / 3.0
    }

    #[test]
    fn gelu_erf_backward_is_exact_in_f64_unlike_candles() -> Result<()> {
        let values: Vec<f64> = (0..161).map(|i| -8.0 + 0.1 * i as f64).collect();
        let x = candle::Var::from_vec(values, 161, &Device::Cpu)?;
        let expected = gelu_slope_by_differences(x.as_tensor())?;
        let ours = gelu_erf(x.as_tensor())?.sum_all()?.backward()?;
        let ours = ours.get(x.as_tensor()).ok_or_else(|| candle::Error::Msg("no gradient".into()))?;
        let error = |grad: &Tensor| -> Result<f64> {
            let scale = expected.abs()?.maximum(1.0)?;
            ((grad - &expected)?.abs()? / scale)?.max_all()?.to_scalar::<f64>()
        };
        assert!(error(ours)? <= 1e-10, "ours: {:e}", error(ours)?);
        // The forward equals Candle's.
        let candle_value = x.as_tensor().gelu_erf()?;
        let diff = (gelu_erf(x.as_tensor())? - &candle_value)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff <= 1e-14, "{diff:e}");
        // Candle's backward rounds 1/sqrt(2 pi) to 0.398942: off by about 1e-7 near x = ±1.
        let theirs = candle_value.sum_all()?.backward()?;
        let theirs = theirs.get(x.as_tensor()).ok_or_else(|| candle::Error::Msg("no gradient".into()))?;
        assert!(error(theirs)? > 1e-8, "candle: {:e}", error(theirs)?);
        // F32 input: computed in F32, within F32 rounding of the F64 slope.
        let x32 = candle::Var::from_tensor(&x.as_tensor().to_dtype(DType::F32)?)?;
        let grads = gelu_erf(x32.as_tensor())?.sum_all()?.backward()?;
        let g32 = grads.get(x32.as_tensor()).ok_or_else(|| candle::Error::Msg("no gradient".into()))?;
        assert_eq!(g32.dtype(), DType::F32);
        assert!(error(&g32.to_dtype(DType::F64)?)? <= 1e-6, "f32: {:e}", error(&g32.to_dtype(DType::F64)?)?);
        Ok(())
    }
}
