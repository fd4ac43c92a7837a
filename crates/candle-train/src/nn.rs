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
//!
//! LoRA: build the same model through [`Lora::build`] (a frozen base `VarMap`, PEFT-style
//! adapters on the [`linear`] layers whose `VarBuilder` path a target pattern names, such as
//! `q_proj` or `all-linear`), train [`Lora::parameters`], and save them as PEFT's adapter
//! files ([`Lora::save_peft`]); the model's code does not change.

mod lora;

use std::sync::Arc;

use candle::{Result, Tensor};
pub use candle_nn::{LayerNormConfig, Module, VarBuilder, VarMap};

pub use self::lora::Lora;
use crate::layers;
use crate::lora::LoraAdapter;

/// `y = x Wᵀ + b` with `weight` `[out, in]`, as `candle_nn::Linear`; plus `s B A x` when
/// built inside [`Lora::build`] at a targeted path.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Arc<LoraAdapter>>,
}

impl Linear {
    /// A layer over `weight` `[out, in]` and an optional `bias` `[out]` (kept as given: a
    /// variable stays the same variable), without an adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, adapter: None }
    }

    /// The layer made by [`linear`] and its kin at `vb`'s path: with the running
    /// [`Lora::build`]'s adapter when it targets the path.
    fn at(weight: Tensor, bias: Option<Tensor>, vb: &VarBuilder) -> Result<Self> {
        let adapter = lora::adapter_for(&vb.prefix(), &weight)?;
        Ok(Self { weight, bias, adapter })
    }

    /// The LoRA adapter, if the layer has one.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_deref()
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
        match &self.adapter {
            // The base is a constant (Lora::build's VarBuilder): no gradient for it.
            Some(adapter) => {
                adapter.forward(xs, &self.weight, self.bias.as_ref(), layers::WeightLayout::OutIn, true)
            }
            None => layers::linear::linear(xs, &self.weight, self.bias.as_ref(), layers::WeightLayout::OutIn),
        }
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
    Linear::at(ws, Some(bs), &vb)
}

/// As `candle_nn::linear_no_bias`.
///
/// # Errors
/// When `vb` has no such tensor or a differently shaped one.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let ws = vb.get_with_hints((out_dim, in_dim), "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
    Linear::at(ws, None, &vb)
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

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Module, Result, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::Parameters;

    /// Exact in F32 (candle-nn takes eps as `f32`).
    const EPS: f64 = 1.0 / 131072.0;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
    }

    /// Gradients of `sum(f(x) * weights)` with respect to `x` and every variable of `map`.
    fn gradients(
        map: &VarMap,
        x: &Var,
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Vec<(String, Tensor)>> {
        let y = f(x.as_tensor())?;
        let w = Tensor::arange(0f64, y.elem_count() as f64, y.device())?.reshape(y.shape())?.sin()?;
        let grads = (y.to_dtype(DType::F64)? * w)?.sum_all()?.backward()?;
        let mut out =
            vec![("x".to_string(), grads.get(x.as_tensor()).cloned().ok_or(candle::Error::Msg("x".into()))?)];
        let data = map.data().lock().map_err(|_| candle::Error::Msg("lock".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let g = grads
                .get(var.as_tensor())
                .cloned()
                .ok_or(candle::Error::Msg(format!("no gradient for {name}")))?;
            out.push((name.clone(), g));
        }
        Ok(out)
    }

    /// Our layer and candle-nn's differentiable reference over the same `VarMap`, same values,
    /// same gradients (F64 within 1e-12).
    #[test]
    fn drop_ins_match_candle_nns_differentiable_layers_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::arange(0f64, 24.0, &dev)?.reshape((2, 3, 4))?.cos()?)?;
        let ids = Tensor::new(&[[0u32, 2, 2], [1, 0, 3]], &dev)?;
        type Case = (
            &'static str,
            Box<dyn Fn(VarBuilder) -> Result<Box<dyn Module>>>,
            Box<dyn Fn(&VarMap, &Tensor) -> Result<Tensor>>,
        );
        let get = |map: &VarMap, name: &str| -> Result<Tensor> {
            let data = map.data().lock().map_err(|_| candle::Error::Msg("lock".into()))?;
            data.get(name).map(|v| v.as_tensor().clone()).ok_or(candle::Error::Msg(name.into()))
        };
        let cases: Vec<Case> = vec![
            (
                "linear",
                Box::new(|vb| Ok(Box::new(linear(4, 5, vb)?) as Box<dyn Module>)),
                Box::new(move |m, x| {
                    candle_nn::Linear::new(get(m, "weight")?, Some(get(m, "bias")?)).forward(x)
                }),
            ),
            (
                "layer_norm",
                Box::new(|vb| Ok(Box::new(layer_norm(4, EPS, vb)?) as Box<dyn Module>)),
                Box::new(move |m, x| {
                    candle_nn::ops::layer_norm_slow(x, &get(m, "weight")?, &get(m, "bias")?, EPS as f32)
                }),
            ),
            (
                "rms_norm",
                Box::new(|vb| Ok(Box::new(rms_norm(4, EPS, vb)?) as Box<dyn Module>)),
                Box::new(move |m, x| candle_nn::ops::rms_norm_slow(x, &get(m, "weight")?, EPS as f32)),
            ),
        ];
        for (name, ours, theirs) in cases {
            let map = VarMap::new();
            let layer = ours(VarBuilder::from_varmap(&map, DType::F64, &dev))?;
            // Move the norms' weights off one and biases off zero.
            for var in map.all_vars() {
                var.set(
                    &(var.as_tensor()
                        + Tensor::arange(0f64, var.elem_count() as f64, &dev)?
                            .reshape(var.shape())?
                            .sin()?)?,
                )?;
            }
            let a = gradients(&map, &x, &|x| layer.forward(x))?;
            let b = gradients(&map, &x, &|x| theirs(&map, x))?;
            let value_diff = max_diff(&layer.forward(x.as_tensor())?, &theirs(&map, x.as_tensor())?)?;
            assert!(value_diff < 1e-12, "{name}: {value_diff:e}");
            for ((n, ga), (_, gb)) in a.iter().zip(&b) {
                assert!(max_diff(ga, gb)? < 1e-12, "{name}: {n}");
            }
        }
        // Embedding: same rows, gradient scattered back.
        let map = VarMap::new();
        let table = embedding(4, 3, VarBuilder::from_varmap(&map, DType::F64, &dev))?;
        let reference = candle_nn::Embedding::new(table.embeddings().clone(), 3);
        assert_eq!(max_diff(&table.forward(&ids)?, &reference.forward(&ids)?)?, 0.0);
        let ga = table.forward(&ids)?.sqr()?.sum_all()?.backward()?;
        let gb = reference.forward(&ids)?.sqr()?.sum_all()?.backward()?;
        let (ga, gb) = (ga.get(table.embeddings()), gb.get(table.embeddings()));
        assert!(
            max_diff(
                ga.ok_or(candle::Error::Msg("ours".into()))?,
                gb.ok_or(candle::Error::Msg("theirs".into()))?
            )? < 1e-12
        );
        // Softmax over any dimension equals candle-nn's differentiable one, in value and gradient.
        for dim in [0, 1, 2] {
            let ours = |x: &Tensor| ops::softmax(x, dim);
            let theirs = |x: &Tensor| candle_nn::ops::softmax(x, dim);
            let (a, b) = (gradients(&VarMap::new(), &x, &ours)?, gradients(&VarMap::new(), &x, &theirs)?);
            assert!(max_diff(&ours(x.as_tensor())?, &theirs(x.as_tensor())?)? < 1e-15);
            assert!(max_diff(&a[0].1, &b[0].1)? < 1e-12, "softmax dim {dim}");
        }
        Ok(())
    }

    #[test]
    fn a_var_maps_variables_are_shared_and_listed_under_their_prefix() -> Result<()> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let a = linear(2, 3, vb.pp("h").pp(1))?;
        let _ = linear(2, 3, vb.pp("h").pp(10))?;
        let params = Parameters::from_var_map(&map).map_err(|e| candle::Error::Msg(e.to_string()))?;
        let names: Vec<String> = params.segment_parameters_under("h.1").into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["h.1.bias", "h.1.weight"]);
        let weight = params.get("h.1.weight").ok_or(candle::Error::Msg("h.1.weight".into()))?;
        assert_eq!(weight.id(), a.weight().id());
        // A write through the parameter is what the layer reads.
        weight.var().map_err(candle::Error::wrap)?.set(&Tensor::ones((3, 2), DType::F32, &Device::Cpu)?)?;
        assert_eq!(a.weight().to_vec2::<f32>()?, vec![vec![1.0; 2]; 3]);
        Ok(())
    }
}
