//! AdamW with decoupled weight decay, bit-for-bit equal to `torch.optim.AdamW` (its default
//! single-tensor CPU path) in F32 given a correctly rounded square root. (PyTorch's MKL-backed
//! CPU `sqrt` is 1 ulp off IEEE for some inputs; against it we agree within a few ulps. See
//! `scripts/reference/torch_optimizers.py`.)
//!
//! Per element, with scalars computed in f64 and rounded to f32 as PyTorch does:
//! `p *= 1 - lr*wd`; `m = lerp(m, g, 1 - beta1)` (a fused multiply-add, as ATen's vectorised
//! lerp); `v = fma((1 - beta2)*g, g, v*beta2)` (ATen's addcmul); `denom = sqrt(v) / sqrt(1 - beta2^t) + eps`;
//! `p += ((-lr / (1 - beta1^t)) * m) / denom`.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{check_len, Optimizer, OptimizerState, PARALLEL_CHUNK};
use crate::error::{check_non_negative, Error, Result};

/// AdamW's hyper-parameters (PyTorch's defaults except `lr`, which the schedule supplies).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay, applied to parameters marked for decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamWConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(field, format!("{v} is not in [0, 1)")));
            }
        }
        check_non_negative("eps", self.eps)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        Ok(())
    }
}

/// AdamW over FP32 moments we own.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    exp_avg: Vec<Vec<f32>>,
    exp_avg_sq: Vec<Vec<f32>>,
}

impl AdamW {
    /// AdamW for parameters of the given lengths, moments at zero.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bad hyper-parameters.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            step: 0,
            exp_avg: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            exp_avg_sq: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        })
    }

    /// Steps parameter `index`: [`Optimizer::update`], or with `parallel` its
    /// [`Optimizer::update_parallel`].
    fn step_parameter(
        &mut self,
        index: usize,
        param: &mut [f32],
        grad: &[f32],
        lr: f64,
        decay: bool,
        parallel: bool,
    ) -> Result<()> {
        let s = Scalars::new(&self.config, self.step.max(1), lr, decay);
        let (m, v) = self.moments(index)?;
        check_len(index, m.len(), param, grad)?;
        if parallel {
            update_slice_parallel(&s, param, grad, m, v);
        } else {
            update_slice(&s, param, grad, m, v);
        }
        Ok(())
    }

    /// Parameter `index`'s two moments.
    fn moments(&mut self, index: usize) -> Result<(&mut [f32], &mut [f32])> {
        let count = self.exp_avg.len();
        match (self.exp_avg.get_mut(index), self.exp_avg_sq.get_mut(index)) {
            (Some(m), Some(v)) => Ok((m, v)),
            _ => Err(Error::StateMismatch {
                name: format!("parameter {index}"),
                expected: format!("an index below {count}"),
                found: index.to_string(),
            }),
        }
    }
}

/// The per-step scalars, computed in f64 and rounded to f32 where PyTorch rounds them: what
/// every AdamW kernel (flat, tensor-op, fused CUDA) takes, in this order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scalars {
    /// `1 - lr * weight_decay` (1 without decay).
    pub decay_factor: f32,
    /// `1 - beta1`, the lerp weight of the first moment.
    pub lerp_weight: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f32,
    /// `eps`.
    pub eps: f32,
    /// `-lr / (1 - beta1^t)`.
    pub neg_step_size: f32,
}

impl Scalars {
    /// The scalars of step `step` (1-based) with learning rate `lr`; `decay` says whether
    /// weight decay applies to the parameter.
    pub fn new(c: &AdamWConfig, step: u64, lr: f64, decay: bool) -> Self {
        let t = step as f64;
        let wd = if decay { c.weight_decay } else { 0.0 };
        let bias_correction1 = 1.0 - c.beta1.powf(t);
        let bias_correction2 = 1.0 - c.beta2.powf(t);
        Self {
            decay_factor: (1.0 - lr * wd) as f32,
            lerp_weight: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            // Python's `bias_correction2 ** 0.5`.
            bias_correction2_sqrt: bias_correction2.powf(0.5) as f32,
            eps: c.eps as f32,
            neg_step_size: (-(lr / bias_correction1)) as f32,
        }
    }
}

/// ATen's lerp for weights below 0.5: `start + weight * (end - start)`, fused.
#[inline(always)]
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    weight.mul_add(end - start, start)
}

#[inline(always)]
fn update_body(s: &Scalars, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p *= s.decay_factor;
        *m = lerp(*m, g, s.lerp_weight);
        // ATen's addcmul: fma(value * t1, t2, self).
        *v = (s.one_minus_beta2 * g).mul_add(g, *v * s.beta2);
        let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
        // ATen's addcdiv: self + (value * t1) / t2.
        *p += s.neg_step_size * *m / denom;
    }
}

/// [`update_body`] compiled with hardware FMA, so `mul_add` is one instruction.
///
/// # Safety
/// The CPU must support FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn update_body_fma(s: &Scalars, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    update_body(s, param, grad, m, v)
}

pub(crate) fn update_slice(s: &Scalars, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA, checked just above.
        unsafe { update_body_fma(s, param, grad, m, v) };
        return;
    }
    update_body(s, param, grad, m, v)
}

/// [`update_slice`] over rayon's threads, in chunks of [`PARALLEL_CHUNK`] elements.
pub(crate) fn update_slice_parallel(
    s: &Scalars,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let c = PARALLEL_CHUNK;
    param
        .par_chunks_mut(c)
        .zip(grad.par_chunks(c))
        .zip(m.par_chunks_mut(c))
        .zip(v.par_chunks_mut(c))
        .for_each(|(((p, g), m), v)| update_slice(s, p, g, m, v));
}

impl Optimizer for AdamW {
    step_counter!("adamw");

    host_updates!();

    fn state_bytes(&self) -> usize {
        self.exp_avg.iter().chain(&self.exp_avg_sq).map(|b| b.len() * 4).sum()
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut buffers = std::collections::BTreeMap::new();
        for (i, (m, v)) in self.exp_avg.iter().zip(&self.exp_avg_sq).enumerate() {
            buffers.insert(format!("exp_avg.{i}"), m.clone());
            buffers.insert(format!("exp_avg_sq.{i}"), v.clone());
        }
        Ok(OptimizerState {
            kind: self.name().into(),
            step: self.step,
            buffers,
            quantized: Default::default(),
        })
    }

    fn config(&self) -> Option<super::OptimizerConfig> {
        Some(super::OptimizerConfig::AdamW(self.config))
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.check_kind(self.name())?;
        let mut m = Vec::with_capacity(self.exp_avg.len());
        let mut v = Vec::with_capacity(self.exp_avg.len());
        for (i, cur) in self.exp_avg.iter().enumerate() {
            m.push(state.buffer(&format!("exp_avg.{i}"), cur.len())?.to_vec());
            v.push(state.buffer(&format!("exp_avg_sq.{i}"), cur.len())?.to_vec());
        }
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.step = state.step;
        Ok(())
    }
}
