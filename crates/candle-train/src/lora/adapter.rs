//! One LoRA adapter: the low-rank update `s B A dropout(x)` a [`Linear`](crate::layers::Linear)
//! adds to its frozen output.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle::{Result, Tensor};
use candle_ckpt::Rng;

use crate::layers::linear::{frozen_linear, linear};
use crate::layers::{Dropout, WeightLayout};
use crate::params::Parameter;
use crate::quant::{quantized_linear, QuantizedWeight};

/// The randomness and the forward mode a [`LoraModel`](super::LoraModel) shares with its
/// adapters: the current segment's dropout generator (set for the segment's forward or
/// recompute, so a recompute replays the same masks) and whether layers compute through the
/// merged weight (the reference path of the tests).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) draws: Mutex<Option<Rng>>,
    pub(crate) merged_reference: AtomicBool,
}

/// A LoRA adapter of one affine layer: `lora_A` (`[r, in]`), `lora_B` (`[out, r]`), the
/// scale `alpha / r` (or `alpha / sqrt(r)` under rsLoRA) and the dropout on its input.
#[derive(Debug)]
pub struct LoraAdapter {
    a: Parameter,
    b: Parameter,
    scale: f64,
    dropout: Dropout,
    shared: Arc<Shared>,
}

impl LoraAdapter {
    pub(crate) fn new(a: Parameter, b: Parameter, scale: f64, dropout: Dropout, shared: Arc<Shared>) -> Self {
        Self { a, b, scale, dropout, shared }
    }

    /// `lora_A`, `[rank, in_features]`.
    pub fn a(&self) -> &Parameter {
        &self.a
    }

    /// `lora_B`, `[out_features, rank]`.
    pub fn b(&self) -> &Parameter {
        &self.b
    }

    /// The factor the update is multiplied by.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `s B A`, the update of the weight in `[out, in]` (in F64 for F64 weights, else F32).
    ///
    /// # Errors
    /// On a released parameter or a tensor error.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let a = self.a.tensor()?;
        let dtype = if a.dtype() == candle::DType::F64 { a.dtype() } else { candle::DType::F32 };
        self.b.tensor()?.to_dtype(dtype)?.matmul(&a.to_dtype(dtype)?)?.affine(self.scale, 0.0)
    }

    /// The adapted layer's output: `x W (+ b) + s B A dropout(x)`, the base through
    /// [`frozen_linear`] when `frozen` (no gradient for the weight).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        layout: WeightLayout,
        frozen: bool,
    ) -> Result<Tensor> {
        let (a, b) = (self.a.tensor()?, self.b.tensor()?);
        let mut draws = self.shared.draws.lock().map_err(|_| {
            candle::Error::wrap(crate::Error::Poisoned { what: "the LoRA dropout generator" })
        })?;
        let dropping = draws.is_some() && self.dropout.p() > 0.0;
        if self.shared.merged_reference.load(Ordering::Acquire) {
            if dropping {
                candle::bail!(
                    "the merged LoRA reference path has no dropout: use lora_dropout 0 or evaluation"
                );
            }
            // x (W + s B A) as one weight, differentiable in A and B.
            let delta = b.matmul(&a)?.affine(self.scale, 0.0)?;
            let delta = match layout {
                WeightLayout::OutIn => delta,
                WeightLayout::InOut => delta.t()?,
            };
            return linear(x, &weight.add(&delta)?, bias, layout);
        }
        let base =
            if frozen { frozen_linear(x, weight, bias, layout)? } else { linear(x, weight, bias, layout)? };
        let x = match draws.as_mut() {
            Some(rng) if dropping => self.dropout.forward(x, rng, true)?,
            _ => x.clone(),
        };
        drop(draws);
        let update = linear(&linear(&x, &a, None, WeightLayout::OutIn)?, &b, None, WeightLayout::OutIn)?;
        base.add(&update.affine(self.scale, 0.0)?)
    }

    /// The adapted layer's output over a quantized frozen base: `x Wᵀ (+ b)` through
    /// [`quantized_linear`] (no gradient for the base) plus `s B A dropout(x)`.
    pub(crate) fn forward_quantized(
        &self,
        x: &Tensor,
        weight: &Arc<QuantizedWeight>,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (a, b) = (self.a.tensor()?, self.b.tensor()?);
        if self.shared.merged_reference.load(Ordering::Acquire) {
            candle::bail!(
                "`{}`: the merged LoRA reference path needs a dense base, and this one is quantized ({})",
                weight.name(),
                weight.format()
            );
        }
        let base = quantized_linear(x, weight, bias)?;
        let mut draws = self.shared.draws.lock().map_err(|_| {
            candle::Error::wrap(crate::Error::Poisoned { what: "the LoRA dropout generator" })
        })?;
        let x = match draws.as_mut() {
            Some(rng) if self.dropout.p() > 0.0 => self.dropout.forward(x, rng, true)?,
            _ => x.clone(),
        };
        drop(draws);
        let update = linear(&linear(&x, &a, None, WeightLayout::OutIn)?, &b, None, WeightLayout::OutIn)?;
        base.add(&update.affine(self.scale, 0.0)?)
    }
}
