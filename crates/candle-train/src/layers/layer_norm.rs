//! Layer normalisation computed in F32 with a hand-written backward (Candle's fused
//! `layer_norm` has no backward rule; composing it from small ops would keep five F32 copies of
//! the input alive).

use candle::{Result, Tensor, Var, D};

use crate::device::reduction_dtype;
use crate::layers::custom_grad::custom3;
use crate::layers::ops::mean_last_dim;
use crate::module::ModuleBuilder;
use crate::params::{ParamBuilder, Parameter};

/// `y = (x - mean) / sqrt(var + eps) * weight + bias` over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Parameter,
    bias: Parameter,
    eps: f64,
}

crate::module_fields!(LayerNorm { weight, bias });

impl LayerNorm {
    /// Creates `{prefix}.weight` = 1 and `{prefix}.bias` = 0.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn new(pb: &mut ParamBuilder, prefix: &str, dim: usize, eps: f64) -> crate::Result<Self> {
        let weight = pb.constant_param(format!("{prefix}.weight"), dim, 1.0)?;
        let bias = pb.constant_param(format!("{prefix}.bias"), dim, 0.0)?;
        Ok(Self { weight, bias, eps })
    }

    /// Creates `weight` = 1 and `bias` = 0 under `b`'s path.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn build(b: &ModuleBuilder, dim: usize, eps: f64) -> crate::Result<Self> {
        Ok(Self { weight: b.constant("weight", dim, 1.0)?, bias: b.constant("bias", dim, 0.0)?, eps })
    }

    /// A layer over existing variables (shared, not copied), named `weight` and `bias`.
    pub fn from_vars(weight: Var, bias: Var, eps: f64) -> Self {
        Self { weight: Parameter::new("weight", weight), bias: Parameter::new("bias", bias), eps }
    }

    /// Normalises `x` over its last dimension; statistics in F32 (F64 for F64 input), the
    /// result cast back to `x`'s dtype.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_as(x, x.dtype())
    }

    /// The layer's result on `x` in `dtype` computed outside the graph, with what its backward
    /// needs, for a fused op that starts with this layer (the one-pass CPU kernel of
    /// [`layer_norm`]; the same values). `None` where that kernel does not apply, or when a
    /// parameter is frozen (the unfused layer then computes no gradient for it).
    ///
    /// # Errors
    /// A released parameter; a tensor error.
    pub(crate) fn detached(
        &self,
        x: &Tensor,
        dtype: candle::DType,
    ) -> Result<Option<(Tensor, DetachedNorm)>> {
        if self.weight.is_frozen() || self.bias.is_frozen() {
            return Ok(None);
        }
        let (weight, bias) = (self.weight.tensor()?, self.bias.tensor()?);
        let parts = crate::layers::fused::layer_norm_detached(x, &weight, &bias, self.eps, dtype)?;
        Ok(parts.map(|(value, backward)| (value, DetachedNorm::from_parts(weight, bias, backward))))
    }

    /// As [`LayerNorm::forward`], returning the result in `dtype` (a model with an F32
    /// residual stream and BF16 matmuls normalises F32 into BF16).
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward_as(&self, x: &Tensor, dtype: candle::DType) -> Result<Tensor> {
        layer_norm(x, &self.weight.tensor()?, &self.bias.tensor()?, self.eps, dtype)
    }
}

/// A layer norm computed outside the graph ([`LayerNorm::detached`]): its parameters and its
/// backward.
pub(crate) struct DetachedNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    backward: crate::layers::fused::LayerNormBackward,
}

impl DetachedNorm {
    /// The parameters a layer norm was computed with, and its backward.
    pub(crate) fn from_parts(
        weight: Tensor,
        bias: Tensor,
        backward: crate::layers::fused::LayerNormBackward,
    ) -> Self {
        Self { weight, bias, backward }
    }

    /// The gradients of the input `x`, the weight and the bias from the result's gradient `g`.
    ///
    /// # Errors
    /// On a tensor error.
    pub(crate) fn grads(&self, x: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        (self.backward)(x, &self.weight, &self.bias, g)
    }
}

/// Layer normalisation of `x` over its last dimension with `w` and `b`, statistics in F32 (F64
/// for F64 input), the result in `dtype` (the function behind [`LayerNorm`], for weights held
/// as tensors).
///
/// # Errors
/// On a shape mismatch.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64, dtype: candle::DType) -> Result<Tensor> {
    // One pass per row each way on the CPU (`fused`), the same values to the sums' rounding.
    if let Some(y) = crate::layers::fused::layer_norm(x, w, b, eps, dtype)? {
        return Ok(y);
    }
    layer_norm_unfused(x, w, b, eps, dtype)
}

/// [`layer_norm`] from Candle's tensor ops (any device and dtype; the reference of the fused
/// CPU kernel).
pub(crate) fn layer_norm_unfused(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    dtype: candle::DType,
) -> Result<Tensor> {
    let rd = reduction_dtype(x.dtype());
    let x32 = x.detach().to_dtype(rd)?;
    let mean = mean_last_dim(&x32)?;
    let centered = x32.broadcast_sub(&mean)?;
    let rstd = (mean_last_dim(&centered.sqr()?)? + eps)?.sqrt()?.recip()?;
    let value = centered
        .broadcast_mul(&rstd)?
        .broadcast_mul(&w.detach().to_dtype(rd)?)?
        .broadcast_add(&b.detach().to_dtype(rd)?)?
        .to_dtype(dtype)?;
    drop(centered);
    // The graph keeps x (Candle holds every op's inputs), the result, and the per-row mean
    // and 1/std; the backward recomputes the normalised input from them.
    custom3("layer-norm", x, w, b, value, move |x, w, b, _, g| {
        let xhat = x.to_dtype(rd)?.broadcast_sub(&mean)?.broadcast_mul(&rstd)?;
        let g = g.to_dtype(rd)?;
        let c = xhat.dim(D::Minus1)?;
        let rows = xhat.elem_count() / c.max(1);
        let grad_w = (&g * &xhat)?.reshape((rows, c))?.sum(0)?.to_dtype(w.dtype())?;
        let grad_b = g.reshape((rows, c))?.sum(0)?.to_dtype(b.dtype())?;
        let gw = g.broadcast_mul(&w.to_dtype(rd)?)?;
        let mean_gw = mean_last_dim(&gw)?;
        let mean_gw_xhat = mean_last_dim(&(&gw * &xhat)?)?;
        let grad_x = gw
            .broadcast_sub(&mean_gw)?
            .sub(&xhat.broadcast_mul(&mean_gw_xhat)?)?
            .broadcast_mul(&rstd)?
            .to_dtype(x.dtype())?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    })
}
