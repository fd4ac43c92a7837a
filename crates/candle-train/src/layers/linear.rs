//! Affine layers: `nn.Linear` (weight `[out, in]`) and GPT-2's `Conv1D` (weight `[in, out]`).

use std::sync::{Arc, RwLock};

use candle::{Result, Tensor, Var};

use crate::layers::custom_grad::custom3;
use crate::layers::fused::{add_bias_owned, bias_grad};
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
    let x2 = x.reshape((rows, in_features))?;
    let y = match bias {
        Some(b) => affine(x, &x2, weight, b, layout)?,
        None => matmul_weight(&x2, weight, layout)?,
    };
    let out_features = y.dim(1)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out_features);
    y.reshape(out_dims)
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
            WeightLayout::InOut => g2.matmul(&weight.t()?)?,
            WeightLayout::OutIn => g2.matmul(&weight)?,
        };
        Ok(Some(grad_x.reshape(x.shape())?))
    })
}

/// `x Wᵀ` for a `[rows, in]` input and a weight handle `[out, in]` (a tied embedding table as
/// the output head): Candle's matmul, or [`frozen_linear`] when the parameter is frozen, so a
/// frozen table gets no gradient computed.
///
/// # Errors
/// On a shape or dtype mismatch; a released parameter.
pub fn matmul_transposed(x: &Tensor, weight: &Parameter) -> Result<Tensor> {
    let w = weight.tensor()?;
    if weight.is_frozen() {
        return frozen_linear(x, &w, None, WeightLayout::OutIn);
    }
    x.matmul(&w.t()?)
}

/// `x W` for a weight in either layout, differentiable through Candle's matmul.
fn matmul_weight(x: &Tensor, w: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    match layout {
        WeightLayout::InOut => x.matmul(w),
        WeightLayout::OutIn => x.matmul(&w.t()?),
    }
}

/// `x W + b` (`x2` is `x` seen as `[rows, in]`) as one op: only `x` and the result stay in the
/// graph (not the product before the bias), and the bias gradient is reduced in F32.
///
/// The op takes `x` itself, not its reshaped view: when `x` tracks no gradient (a segment's
/// detached input in candle-ckpt's engine), Candle records no reshape op, and a gradient that
/// reached only the view would never reach `x`; the input would get its other paths' gradient
/// (a residual) and silently miss this one.
fn affine(x: &Tensor, x2: &Tensor, w: &Tensor, b: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    let value = add_bias_owned(matmul_weight(&x2.detach(), &w.detach(), layout)?, &b.detach())?;
    let rows = x2.dim(0)?;
    custom3("affine", x, w, b, value, move |x_full, w, b, _, g| {
        let x = x_full.reshape((rows, x_full.elem_count() / rows.max(1)))?;
        let grad_x = match layout {
            WeightLayout::InOut => g.matmul(&w.t()?)?,
            WeightLayout::OutIn => g.matmul(w)?,
        };
        let grad_w = match layout {
            WeightLayout::InOut => x.t()?.matmul(g)?,
            WeightLayout::OutIn => g.t()?.matmul(&x)?,
        };
        let grad_b = bias_grad(g, b.dtype())?;
        Ok((Some(grad_x.reshape(x_full.shape())?), Some(grad_w), Some(grad_b)))
    })
}
