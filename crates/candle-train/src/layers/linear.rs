//! Affine layers: `nn.Linear` (weight `[out, in]`) and GPT-2's `Conv1D` (weight `[in, out]`).

use std::sync::{Arc, RwLock};

use candle::{Result, Tensor, Var};

use crate::layers::custom_grad::{custom2, custom3};
use crate::layers::fused::{add_bias_owned, bias_grad, gelu_tanh, gelu_tanh_grad, matmul as mm};
use crate::module::ModuleBuilder;
use crate::params::{ParamBuilder, Parameter};
use crate::quant::{quantized_linear, QuantizedWeight};

/// How the weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out_features, in_features]`, as `torch.nn.Linear` (BERT, LLaMA).
    OutIn,
    /// `[in_features, out_features]`, as Hugging Face GPT-2's `Conv1D`.
    InOut,
}

/// `y = x W (+ b)` over the last dimension of `x`, plus a LoRA adapter's `s B A x` when one is
/// attached ([`crate::lora`]).
///
/// Clones share the weights and the adapter slot: an adapter attached through one clone is seen
/// by every clone (the model's blocks and a wrapper's list of adapted layers).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Parameter,
    bias: Option<Parameter>,
    layout: WeightLayout,
    adapter: Arc<RwLock<Option<Arc<crate::lora::LoraAdapter>>>>,
    /// The frozen weight held quantized ([`crate::quant`]); `weight` is then an empty frozen
    /// placeholder that carries the name, dtype and device.
    quantized: Option<Arc<QuantizedWeight>>,
}

impl crate::module::Module for Linear {
    /// The weight, the bias, then an attached adapter's `lora_A` and `lora_B`.
    fn visit_parameters(&self, f: &mut dyn FnMut(&Parameter)) {
        f(&self.weight);
        if let Some(b) = &self.bias {
            f(b);
        }
        if let Ok(Some(adapter)) = self.adapter() {
            f(adapter.a());
            f(adapter.b());
        }
    }

    fn visit_linears(&self, f: &mut dyn FnMut(&Linear)) {
        f(self);
    }
}

fn weight_shape(in_features: usize, out_features: usize, layout: WeightLayout) -> (usize, usize) {
    match layout {
        WeightLayout::OutIn => (out_features, in_features),
        WeightLayout::InOut => (in_features, out_features),
    }
}

impl Linear {
    /// Creates `{prefix}.weight` ~ N(0, std²) and `{prefix}.bias` = 0.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        layout: WeightLayout,
        std: f64,
    ) -> crate::Result<Self> {
        let mut layer = Self::no_bias(pb, prefix, in_features, out_features, layout, std)?;
        layer.bias = Some(pb.constant_param(format!("{prefix}.bias"), out_features, 0.0)?);
        Ok(layer)
    }

    /// Creates `{prefix}.weight` ~ N(0, std²) and no bias.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn no_bias(
        pb: &mut ParamBuilder,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        layout: WeightLayout,
        std: f64,
    ) -> crate::Result<Self> {
        let shape = weight_shape(in_features, out_features, layout);
        let weight = pb.normal_param(format!("{prefix}.weight"), shape, std)?;
        Ok(Self { weight, bias: None, layout, adapter: Arc::default(), quantized: None })
    }

    /// Creates `weight` ~ N(0, std²) and `bias` = 0 under `b`'s path.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn build(
        b: &ModuleBuilder,
        in_features: usize,
        out_features: usize,
        layout: WeightLayout,
        std: f64,
    ) -> crate::Result<Self> {
        let mut layer = Self::build_no_bias(b, in_features, out_features, layout, std)?;
        layer.bias = Some(b.constant("bias", out_features, 0.0)?);
        Ok(layer)
    }

    /// Creates `weight` ~ N(0, std²) under `b`'s path, and no bias. When the builder was
    /// given a quantized weight of that name ([`ParamBuilder::with_quantized`]), the layer
    /// holds it instead (frozen; `weight` is then an empty placeholder).
    ///
    /// # Errors
    /// On allocation failure; [`crate::Error::StateMismatch`] for a quantized weight of another
    /// shape, [`crate::Error::InvalidConfig`] for one in GPT-2's `[in, out]` layout.
    pub fn build_no_bias(
        b: &ModuleBuilder,
        in_features: usize,
        out_features: usize,
        layout: WeightLayout,
        std: f64,
    ) -> crate::Result<Self> {
        if let Some(q) = b.take_quantized("weight") {
            let name = q.name().to_string();
            if layout != WeightLayout::OutIn {
                return Err(crate::Error::config(
                    "quantize_base",
                    format!("`{name}`: a quantized weight must be in the [out, in] layout"),
                ));
            }
            if q.dims() != (out_features, in_features) {
                return Err(crate::Error::StateMismatch {
                    name,
                    expected: format!("shape {:?}", [out_features, in_features]),
                    found: format!("quantized shape {:?}", q.dims()),
                });
            }
            let placeholder = candle::Tensor::zeros(0, b.dtype(), &b.device())?;
            let weight = Parameter::new(name, Var::from_tensor(&placeholder)?);
            weight.set_frozen(true);
            return Ok(Self { weight, bias: None, layout, adapter: Arc::default(), quantized: Some(q) });
        }
        let weight = b.normal("weight", weight_shape(in_features, out_features, layout), std)?;
        Ok(Self { weight, bias: None, layout, adapter: Arc::default(), quantized: None })
    }

    /// A layer over existing variables (shared, not copied), named `weight` and `bias`.
    pub fn from_vars(weight: Var, bias: Option<Var>, layout: WeightLayout) -> Self {
        let bias = bias.map(|b| Parameter::new("bias", b));
        Self {
            weight: Parameter::new("weight", weight),
            bias,
            layout,
            adapter: Arc::default(),
            quantized: None,
        }
    }

    /// The weight's handle (an empty frozen placeholder when the weight is quantized).
    pub fn weight(&self) -> &Parameter {
        &self.weight
    }

    /// The quantized weight, when the layer holds one ([`crate::quant`]).
    pub fn quantized(&self) -> Option<&Arc<QuantizedWeight>> {
        self.quantized.as_ref()
    }

    /// The bias's handle, if the layer has one.
    pub fn bias(&self) -> Option<&Parameter> {
        self.bias.as_ref()
    }

    /// How the weight is stored.
    pub fn layout(&self) -> WeightLayout {
        self.layout
    }

    /// `[in_features, out_features]`.
    pub fn features(&self) -> (usize, usize) {
        if let Some(q) = &self.quantized {
            let (out_features, in_features) = q.dims();
            return (in_features, out_features);
        }
        let dims = self.weight.dims();
        let (rows, cols) = (dims.first().copied().unwrap_or(0), dims.get(1).copied().unwrap_or(0));
        match self.layout {
            WeightLayout::OutIn => (cols, rows),
            WeightLayout::InOut => (rows, cols),
        }
    }

    /// The module path: the weight's name without `.weight` (`model.layers.0.self_attn.q_proj`).
    pub fn path(&self) -> &str {
        let name = self.weight.name.as_str();
        name.strip_suffix(".weight").unwrap_or(if name == "weight" { "" } else { name })
    }

    /// The attached LoRA adapter, if any.
    ///
    /// # Errors
    /// When a thread panicked while attaching or detaching an adapter (the slot's lock is
    /// poisoned).
    pub fn adapter(&self) -> crate::Result<Option<Arc<crate::lora::LoraAdapter>>> {
        let slot = self
            .adapter
            .read()
            .map_err(|_| crate::Error::Poisoned { what: "a linear layer's adapter slot" })?;
        Ok(slot.clone())
    }

    /// Attaches `adapter` (or detaches with `None`), returning the one attached before. Every
    /// clone of this layer sees the change.
    ///
    /// # Errors
    /// As [`Linear::adapter`].
    pub fn set_adapter(
        &self,
        adapter: Option<Arc<crate::lora::LoraAdapter>>,
    ) -> crate::Result<Option<Arc<crate::lora::LoraAdapter>>> {
        let mut slot = self
            .adapter
            .write()
            .map_err(|_| crate::Error::Poisoned { what: "a linear layer's adapter slot" })?;
        Ok(std::mem::replace(&mut *slot, adapter))
    }

    /// `gelu_tanh(self.forward(x))`, as one op ([`linear_gelu`]) for a trainable layer with a
    /// bias and no adapter (the same values and gradients), else the two calls.
    ///
    /// # Errors
    /// On a shape or dtype mismatch.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        match self.plain_affine(x)? {
            Some((w, b, layout)) => linear_gelu(x, &w, &b, layout),
            None => crate::layers::fused::gelu_tanh(&self.forward(x)?),
        }
    }

    /// The weight, bias and layout of a layer that [`Linear::forward`] computes as the plain
    /// `x W + b` (a trainable dense weight, a bias, no adapter) for a CPU input: what a fused
    /// op taking the layer's place needs. `None` otherwise.
    ///
    /// # Errors
    /// A released parameter; a poisoned adapter slot.
    pub(crate) fn plain_affine(&self, x: &Tensor) -> Result<Option<(Tensor, Tensor, WeightLayout)>> {
        let plain = x.device().is_cpu()
            && self.quantized.is_none()
            && !self.weight.is_frozen()
            && self.adapter().map_err(candle::Error::wrap)?.is_none();
        match (&self.bias, plain) {
            (Some(bias), true) => Ok(Some((self.weight.tensor()?, bias.tensor()?, self.layout))),
            _ => Ok(None),
        }
    }

    /// Applies the layer to `x` of shape `[..., in_features]`.
    ///
    /// # Errors
    /// On a shape or dtype mismatch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(Parameter::tensor).transpose()?;
        if let Some(q) = &self.quantized {
            if let Some(adapter) = self.adapter().map_err(candle::Error::wrap)? {
                return adapter.forward_quantized(x, q, bias.as_ref());
            }
            return quantized_linear(x, q, bias.as_ref());
        }
        let weight = self.weight.tensor()?;
        if let Some(adapter) = self.adapter().map_err(candle::Error::wrap)? {
            return adapter.forward(x, &weight, bias.as_ref(), self.layout, self.weight.is_frozen());
        }
        if self.weight.is_frozen() {
            return frozen_linear(x, &weight, bias.as_ref(), self.layout);
        }
        linear(x, &weight, bias.as_ref(), self.layout)
    }
}

/// `gelu_tanh(x W + b)` for a weight in `layout` as one op (see `affine`): the values and
/// gradients of [`linear`] followed by [`gelu_tanh`], bit for
/// bit.
///
/// # Errors
/// On a shape or dtype mismatch.
pub fn linear_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else {
        candle::bail!("linear_gelu: input must have at least one dimension");
    };
    let rows: usize = lead.iter().product();
    affine(x, &x.reshape((rows, in_features))?, weight, Some(bias), layout, true)
}

/// `x W (+ b)` over the last dimension of `x` for a weight in `layout` (the function behind
/// [`Linear`], for weights held as tensors).
///
/// # Errors
/// On a shape or dtype mismatch.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, layout: WeightLayout) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else {
        candle::bail!("linear: input must have at least one dimension");
    };
    let rows: usize = lead.iter().product();
    // Already in `x`'s leading shape: no reshape op in the graph, whose backward would add the
    // gradient to a zero tensor once more.
    affine(x, &x.reshape((rows, in_features))?, weight, bias, layout, false)
}

/// `x W (+ b)` for a constant (frozen) weight and bias: one op whose backward computes only
/// the input's gradient (`g Wᵀ`), never a gradient for the weight or the bias.
///
/// # Errors
/// On a shape or dtype mismatch.
pub fn frozen_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    layout: WeightLayout,
) -> Result<Tensor> {
    let (weight, bias) = (weight.detach(), bias.map(Tensor::detach));
    let value = linear(&x.detach(), &weight, bias.as_ref(), layout)?;
    crate::layers::custom_grad::custom1("frozen_linear", x, value, move |x, _, g| {
        let out_features = g.dim(candle::D::Minus1)?;
        let g2 = g.reshape((g.elem_count() / out_features.max(1), out_features))?;
        let grad_x = match layout {
            WeightLayout::InOut => mm(&g2, &weight.t()?)?,
            WeightLayout::OutIn => mm(&g2, &weight)?,
        };
        Ok(Some(grad_x.reshape(x.shape())?))
    })
}

/// `x Wᵀ` for a `[rows, in]` input and a weight handle `[out, in]` (a tied embedding table as
/// the output head): [`linear`] without a bias, or [`frozen_linear`] when the parameter is
/// frozen, so a frozen table gets no gradient computed.
///
/// # Errors
/// On a shape or dtype mismatch; a released parameter.
pub fn matmul_transposed(x: &Tensor, weight: &Parameter) -> Result<Tensor> {
    let w = weight.tensor()?;
    if weight.is_frozen() {
        return frozen_linear(x, &w, None, WeightLayout::OutIn);
    }
    linear(x, &w, None, WeightLayout::OutIn)
}

/// `x W (+ b)` for `x` `[rows, in]`, computed outside the graph (the value of [`affine`]'s op
/// and of fused ops that start with a linear layer).
///
/// # Errors
/// On a shape or dtype mismatch.
pub(crate) fn affine_value(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    layout: WeightLayout,
) -> Result<Tensor> {
    let (xd, wd) = (x.detach(), w.detach());
    let product = match layout {
        WeightLayout::InOut => mm(&xd, &wd)?,
        WeightLayout::OutIn => mm(&xd, &wd.t()?)?,
    };
    match b {
        Some(b) => add_bias_owned(product, &b.detach()),
        None => Ok(product),
    }
}

/// The input and weight gradients of `x W (+ b)` for `x` `[rows, in]` and the output's gradient
/// `g` `[rows, out]`: `g Wᵀ` and `xᵀ g` (in the weight's layout), outside the graph.
///
/// # Errors
/// On a shape or dtype mismatch.
pub(crate) fn affine_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    layout: WeightLayout,
) -> Result<(Tensor, Tensor)> {
    let grad_x = match layout {
        WeightLayout::InOut => mm(g, &w.t()?)?,
        WeightLayout::OutIn => mm(g, w)?,
    };
    Ok((grad_x, weight_grad(x, g, layout)?))
}

/// The gradients of `x W + b` (`x` `[rows, in]`, `g` `[rows, out]`): the input's and the
/// weight's ([`affine_grads`]) and the bias's (in `bias_dtype`, reduced in F32).
///
/// # Errors
/// On a shape or dtype mismatch.
pub(crate) fn biased_affine_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    layout: WeightLayout,
    bias_dtype: candle::DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (grad_x, grad_w) = affine_grads(x, w, g, layout)?;
    Ok((grad_x, grad_w, bias_grad(g, bias_dtype)?))
}

/// The weight gradient of `x W (+ b)` in the weight's layout: `xᵀ g` (`InOut`) or `gᵀ x`.
///
/// # Errors
/// On a shape or dtype mismatch.
pub(crate) fn weight_grad(x: &Tensor, g: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    match layout {
        WeightLayout::InOut => mm(&x.t()?, g),
        WeightLayout::OutIn => mm(&g.t()?, x),
    }
}

/// `x W (+ b)` (`x2` is `x` seen as `[rows, in]`) as one op, the result in `x`'s leading shape
/// (`[..., out]`): only `x` and the result stay in the graph (not the product before the bias,
/// nor a reshape of it), the products are [`mm`]'s (on the CPU: no zero fill, BF16 through the
/// BF16 kernel where the CPU has one), and the bias gradient is reduced in F32.
///
/// The op takes `x` itself, not its reshaped view: when `x` tracks no gradient (a segment's
/// detached input in candle-ckpt's engine), Candle records no reshape op, and a gradient that
/// reached only the view would never reach `x`; the input would get its other paths' gradient
/// (a residual) and silently miss this one.
///
/// With `gelu`, the op is `gelu_tanh(x W + b)`: the pre-activation is kept by the op (as the
/// unfused GELU's input was) and only the activation is in the graph; the backward applies
/// GELU's derivative (`fused::gelu_tanh_grad`) first. The same values and gradients as the two
/// ops bit for bit, one zero-tensor-plus-gradient add fewer in Candle's backward.
fn affine(
    x: &Tensor,
    x2: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    layout: WeightLayout,
    gelu: bool,
) -> Result<Tensor> {
    let value = affine_value(x2, w, b, layout)?;
    let (value, pre) = if gelu { (gelu_tanh(&value)?, Some(value)) } else { (value, None) };
    let rows = x2.dim(0)?;
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = value.dim(1)?;
    }
    let value = value.reshape(out_dims)?;
    // The input and weight gradients, and the output gradient as `[rows, out]` (for the bias).
    let grads = move |x_full: &Tensor, w: &Tensor, g: &Tensor| -> Result<(Tensor, Tensor, Tensor)> {
        let x = x_full.reshape((rows, x_full.elem_count() / rows.max(1)))?;
        let g = g.reshape((rows, g.elem_count() / rows.max(1)))?;
        let g = match &pre {
            Some(pre) => gelu_tanh_grad(pre, &g)?,
            None => g,
        };
        let (grad_x, grad_w) = affine_grads(&x, w, &g, layout)?;
        Ok((grad_x.reshape(x_full.shape())?, grad_w, g))
    };
    match b {
        Some(b) => custom3("affine", x, w, b, value, move |x_full, w, b, _, g| {
            let (grad_x, grad_w, g) = grads(x_full, w, g)?;
            Ok((Some(grad_x), Some(grad_w), Some(bias_grad(&g, b.dtype())?)))
        }),
        None => custom2("linear", x, w, value, move |x_full, w, _, g| {
            let (grad_x, grad_w, _) = grads(x_full, w, g)?;
            Ok((Some(grad_x), Some(grad_w)))
        }),
    }
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Var};

    use super::*;
    use crate::layers::fused::gelu_tanh;

    fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut rng = candle_ckpt::Rng::seeded(seed);
        let values: Vec<f64> = (0..shape.iter().product()).map(|_| rng.normal_f64()).collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
    }

    /// Values and the gradients of `x`, `w` and `b` under `sum(y * r)`.
    fn run(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        vars: &[Var; 3],
        r: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let y = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor())?;
        let grads = (y.to_dtype(DType::F64)? * r)?.sum_all()?.backward()?;
        let grads = vars
            .iter()
            .map(|v| {
                grads.get(v.as_tensor()).cloned().ok_or_else(|| candle::Error::Msg("no gradient".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((y, grads))
    }

    /// `linear_gelu` (one op) against `linear` then `gelu_tanh` (two ops): the same values and
    /// gradients bit for bit in F64, F32 and BF16, in both weight layouts, for a 3-D input; and in
    /// F64 its gradients agree with central differences of the loss.
    #[test]
    fn linear_gelu_equals_linear_then_gelu() -> Result<()> {
        let (lead, i, o) = ([2, 3], 5, 7);
        let r = random(&[2, 3, o], 1)?;
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let (rows, cols) = weight_shape(i, o, layout);
            for dtype in [DType::F64, DType::F32, DType::BF16] {
                let vars = [
                    Var::from_tensor(&random(&[lead[0], lead[1], i], 2)?.to_dtype(dtype)?)?,
                    Var::from_tensor(&random(&[rows, cols], 3)?.to_dtype(dtype)?)?,
                    Var::from_tensor(&random(&[o], 4)?.to_dtype(dtype)?)?,
                ];
                let (fused, gf) = run(|x, w, b| linear_gelu(x, w, b, layout), &vars, &r)?;
                let (reference, gu) = run(|x, w, b| gelu_tanh(&linear(x, w, Some(b), layout)?), &vars, &r)?;
                let bits =
                    |t: &Tensor| -> Result<Vec<f64>> { t.to_dtype(DType::F64)?.flatten_all()?.to_vec1() };
                assert_eq!(fused.dims(), [2, 3, o]);
                assert_eq!(bits(&fused)?, bits(&reference)?, "{layout:?} {dtype:?} values");
                for (k, (f, u)) in gf.iter().zip(&gu).enumerate() {
                    assert_eq!(f.dtype(), dtype);
                    assert_eq!(bits(f)?, bits(u)?, "{layout:?} {dtype:?} gradient {k}");
                    assert!(bits(f)?.iter().any(|v| v.abs() > 1e-3));
                }
            }
        }
        // Central differences in F64 at every coordinate.
        let base = [random(&[2, 3, i], 5)?, random(&[i, o], 6)?, random(&[o], 7)?];
        let vars = [Var::from_tensor(&base[0])?, Var::from_tensor(&base[1])?, Var::from_tensor(&base[2])?];
        let (_, grads) = run(|x, w, b| linear_gelu(x, w, b, WeightLayout::InOut), &vars, &r)?;
        crate::layers::assert_finite_differences(&base, &grads, |args| {
            let y = linear_gelu(&args[0], &args[1], &args[2], WeightLayout::InOut)?;
            (y * &r)?.sum_all()?.to_scalar::<f64>()
        })?;
        Ok(())
    }
}
