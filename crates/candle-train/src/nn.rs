//! Drop-in replacements for candle-nn's layers with a real backward: the same constructor
//! signatures (`linear(in, out, vb)`, `layer_norm(size, config, vb)`, ...), the same
//! `VarBuilder` paths and initialisations, layers that implement `candle_nn::Module`, but
//! every forward is differentiable (candle-nn's fused `LayerNorm`, `RmsNorm` and
//! `softmax_last_dim` record no backward, so the parameters before them silently get no or
//! a zero gradient). A candle-nn model trains correctly by changing its imports:
//!
//! ```text
//! use candle_nn::{embedding, layer_norm, linear, ops::softmax_last_dim, VarBuilder};
//! // becomes
//! use candle_nn::VarBuilder;
//! use candle_train::nn::{embedding, layer_norm, linear, ops::softmax_last_dim};
//! ```
//!
//! A `VarBuilder` over a `VarMap` hands out the map's variables; these layers keep them as
//! given (no copy), so [`crate::Parameters::from_var_map`] and the updater write the same
//! storage the map holds. (A builder over fixed tensors gives constants, as in candle-nn.)

use candle::{Result, Tensor};
pub use candle_nn::{LayerNormConfig, Module, VarBuilder, VarMap};

use crate::layers;

/// `y = x Wᵀ + b` with `weight` `[out, in]`, as `candle_nn::Linear`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer over `weight` `[out, in]` and an optional `bias` `[out]` (kept as given: a
    /// variable stays the same variable).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        layers::linear::linear(xs, &self.weight, self.bias.as_ref(), layers::WeightLayout::OutIn)
    }
}

/// As `candle_nn::linear`: `weight` (Kaiming normal) and `bias` (uniform ±1/√in) under `vb`.
///
/// # Errors
/// When `vb` has no such tensor or a differently shaped one.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let ws = vb.get_with_hints((out_dim, in_dim), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    let bound = 1. / (in_dim as f64).sqrt();
    let bs = vb.get_with_hints(out_dim, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?;
    Ok(Linear::new(ws, Some(bs)))
}

/// As `candle_nn::linear_no_bias`.
///
/// # Errors
/// When `vb` has no such tensor or a differently shaped one.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let ws = vb.get_with_hints((out_dim, in_dim), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    Ok(Linear::new(ws, None))
}

/// As `candle_nn::linear_b`.
///
/// # Errors
/// When `vb` has no such tensor or a differently shaped one.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    if bias {
        linear(in_dim, out_dim, vb)
    } else {
        linear_no_bias(in_dim, out_dim, vb)
    }
}

/// A lookup table `[in_size, out_size]`, as `candle_nn::Embedding`; its backward scatters
/// rows back in F32.
#[derive(Debug, Clone)]
pub struct Embedding {
    embeddings: Tensor,
}

impl Embedding {
    /// A table over `embeddings` (kept as given).
    pub fn new(embeddings: Tensor) -> Self {
        Self { embeddings }
    }

    /// The table.
    pub fn embeddings(&self) -> &Tensor {
        &self.embeddings
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        layers::embedding::embedding(&self.embeddings, ids)
    }
}

/// As `candle_nn::embedding`: `weight` ~ N(0, 1) under `vb`.
///
/// # Errors
/// When `vb` has no such tensor or a differently shaped one.
pub fn embedding(in_size: usize, out_size: usize, vb: VarBuilder) -> Result<Embedding> {
    let embeddings =
        vb.get_with_hints((in_size, out_size), "weight", candle_nn::Init::Randn { mean: 0., stdev: 1. })?;
    Ok(Embedding::new(embeddings))
}

/// Layer or RMS normalisation over the last dimension, as `candle_nn::LayerNorm`, with a
/// hand-written backward (statistics in F32, F64 for F64 input).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    remove_mean: bool,
    eps: f64,
}

impl LayerNorm {
    /// Layer normalisation with `weight` and `bias`.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias: Some(bias), remove_mean: true, eps }
    }

    /// Layer normalisation without a bias.
    pub fn new_no_bias(weight: Tensor, eps: f64) -> Self {
        Self { weight, bias: None, remove_mean: true, eps }
    }

    /// RMS normalisation, as `candle_nn::LayerNorm::rms_norm`.
    pub fn rms_norm(weight: Tensor, eps: f64) -> Self {
        Self { weight, bias: None, remove_mean: false, eps }
    }

    /// The weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        match (self.remove_mean, &self.bias) {
            (true, Some(bias)) => layers::layer_norm::layer_norm(xs, &self.weight, bias, self.eps, dtype),
            (true, None) => {
                let zero = self.weight.zeros_like()?;
                layers::layer_norm::layer_norm(xs, &self.weight, &zero, self.eps, dtype)
            }
            (false, None) => layers::rms_norm::rms_norm(xs, &self.weight, self.eps, dtype),
            (false, Some(bias)) => {
                layers::rms_norm::rms_norm(xs, &self.weight, self.eps, dtype)?.broadcast_add(bias)
            }
        }
    }
}

/// As `candle_nn::layer_norm`: `weight` = 1 (or `gamma`) and, when `config.affine`, `bias` = 0
/// (or `beta`) under `vb`; `remove_mean == false` gives RMS normalisation.
///
/// # Errors
/// When `vb` has no such tensor or a differently shaped one.
pub fn layer_norm<C: Into<LayerNormConfig>>(size: usize, config: C, vb: VarBuilder) -> Result<LayerNorm> {
    let config = config.into();
    let name =
        |names: [&'static str; 2]| names.into_iter().find(|n| vb.contains_tensor(n)).unwrap_or(names[0]);
    let weight = vb.get_with_hints(size, name(["weight", "gamma"]), candle_nn::Init::Const(1.))?;
    let bias = if config.affine {
        Some(vb.get_with_hints(size, name(["bias", "beta"]), candle_nn::Init::Const(0.))?)
    } else {
        None
    };
    Ok(LayerNorm { weight, bias, remove_mean: config.remove_mean, eps: config.eps })
}

/// As `candle_nn::layer_norm_no_bias`.
///
/// # Errors
/// When `vb` has no such tensor or a differently shaped one.
pub fn layer_norm_no_bias(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    layer_norm(size, LayerNormConfig { eps, remove_mean: true, affine: false }, vb)
}

/// RMS normalisation, as `candle_nn::RmsNorm`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// A layer over `weight`.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// The weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        layers::rms_norm::rms_norm(xs, &self.weight, self.eps, xs.dtype())
    }
}

/// As `candle_nn::rms_norm`: `weight` = 1 under `vb`.
///
/// # Errors
/// When `vb` has no such tensor or a differently shaped one.
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    let name = ["weight", "gamma"].into_iter().find(|n| vb.contains_tensor(n)).unwrap_or("weight");
    Ok(RmsNorm::new(vb.get_with_hints(size, name, candle_nn::Init::Const(1.))?, eps))
}

/// Drop-ins for `candle_nn::ops`, differentiable.
pub mod ops {
    use candle::{Result, Tensor};

    use crate::layers;

    /// As `candle_nn::ops::softmax` (differentiable there too), computed in F32 for half
    /// types.
    ///
    /// # Errors
    /// On a bad dimension.
    pub fn softmax<Dim: candle::shape::Dim>(xs: &Tensor, dim: Dim) -> Result<Tensor> {
        let dim = dim.to_index(xs.shape(), "softmax")?;
        let last = xs.rank().saturating_sub(1);
        if dim == last {
            return softmax_last_dim(xs);
        }
        softmax_last_dim(&xs.transpose(dim, last)?)?.transpose(dim, last)
    }

    /// As `candle_nn::ops::softmax_last_dim`, with a backward; returns `xs`'s dtype.
    ///
    /// # Errors
    /// On a tensor error.
    pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
        layers::ops::softmax_last_dim(xs)?.to_dtype(xs.dtype())
    }

    /// As `candle_nn::ops::layer_norm` (fused, no backward there), with a backward.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn layer_norm(xs: &Tensor, alpha: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        layers::layer_norm::layer_norm(xs, alpha, beta, eps as f64, xs.dtype())
    }

    /// As `candle_nn::ops::rms_norm` (fused, no backward there), with a backward.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn rms_norm(xs: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
        layers::rms_norm::rms_norm(xs, alpha, eps as f64, xs.dtype())
    }

    /// GELU in its exact erf form with an exact backward (Candle's `gelu_erf` backward rounds
    /// 1/√(2π)); see [`crate::layers::ops::gelu_erf`].
    ///
    /// # Errors
    /// On a tensor error.
    pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
        layers::ops::gelu_erf(xs)
    }

    /// Softmax over the last dimension in log space, differentiable.
    ///
    /// # Errors
    /// On a tensor error.
    pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
        layers::ops::log_softmax_last_dim(xs)?.to_dtype(xs.dtype())
    }
}
