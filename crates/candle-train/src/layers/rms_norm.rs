//! RMS normalisation computed in F32 with a hand-written backward (Candle's fused `rms_norm`
//! has no backward rule).

use candle::{Result, Tensor, Var, D};

use crate::device::reduction_dtype;
use crate::layers::custom_grad::custom2;
use crate::layers::ops::mean_last_dim;
use crate::module::ModuleBuilder;
use crate::params::{ParamBuilder, Parameter};

/// `y = x / sqrt(mean(x²) + eps) * weight` over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Parameter,
    eps: f64,
}

crate::module_fields!(RmsNorm { weight });

impl RmsNorm {
    /// Creates `{prefix}.weight` = 1.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn new(pb: &mut ParamBuilder, prefix: &str, dim: usize, eps: f64) -> crate::Result<Self> {
        Ok(Self { weight: pb.constant_param(format!("{prefix}.weight"), dim, 1.0)?, eps })
    }

    /// Creates `weight` = 1 under `b`'s path.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn build(b: &ModuleBuilder, dim: usize, eps: f64) -> crate::Result<Self> {
        Ok(Self { weight: b.constant("weight", dim, 1.0)?, eps })
    }

    /// A layer over an existing variable (shared, not copied), named `weight`.
    pub fn from_var(weight: Var, eps: f64) -> Self {
        Self { weight: Parameter::new("weight", weight), eps }
    }

    /// Normalises `x` over its last dimension in F32 (F64 for F64 input), returning `x`'s dtype.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_as(x, x.dtype())
    }

    /// As [`RmsNorm::forward`], returning the result in `dtype` (a model with an F32 residual
    /// stream and BF16 matmuls normalises F32 into BF16, keeping no widened copy in the graph).
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward_as(&self, x: &Tensor, dtype: candle::DType) -> Result<Tensor> {
        rms_norm(x, &self.weight.tensor()?, self.eps, dtype)
    }
}

/// RMS normalisation of `x` over its last dimension with `w`, in F32 (F64 for F64 input), the
/// result in `dtype` (the function behind [`RmsNorm`], for weights held as tensors).
///
/// # Errors
/// On a shape mismatch.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, dtype: candle::DType) -> Result<Tensor> {
    let rd = reduction_dtype(x.dtype());
    let x32 = x.detach().to_dtype(rd)?;
    let rstd = (mean_last_dim(&x32.sqr()?)? + eps)?.sqrt()?.recip()?;
    let value = x32.broadcast_mul(&rstd)?.broadcast_mul(&w.detach().to_dtype(rd)?)?.to_dtype(dtype)?;
    custom2("rms-norm", x, w, value, move |x, w, _, g| {
        let xhat = x.to_dtype(rd)?.broadcast_mul(&rstd)?;
        let g = g.to_dtype(rd)?;
        let c = xhat.dim(D::Minus1)?;
        let rows = xhat.elem_count() / c.max(1);
        let grad_w = (&g * &xhat)?.reshape((rows, c))?.sum(0)?.to_dtype(w.dtype())?;
        let gw = g.broadcast_mul(&w.to_dtype(rd)?)?;
        let mean_gw_xhat = mean_last_dim(&(&gw * &xhat)?)?;
        let grad_x =
            gw.sub(&xhat.broadcast_mul(&mean_gw_xhat)?)?.broadcast_mul(&rstd)?.to_dtype(x.dtype())?;
        Ok((Some(grad_x), Some(grad_w)))
    })
}
