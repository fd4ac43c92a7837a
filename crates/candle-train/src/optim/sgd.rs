//! SGD with momentum, as `torch.optim.SGD` (L2 weight decay added to the gradient, momentum
//! buffer initialised to the first gradient, optional dampening and Nesterov).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{check_len, Optimizer, OptimizerState, PARALLEL_CHUNK};
use crate::error::{check_non_negative, Error, Result};

/// SGD's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Momentum factor (0 disables the buffer).
    pub momentum: f64,
    /// Dampening of the gradient added to the buffer.
    pub dampening: f64,
    /// L2 penalty added to the gradient, for parameters marked for decay.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for SgdConfig {
    /// Momentum 0.9, no dampening, no weight decay, no Nesterov.
    fn default() -> Self {
        Self { momentum: 0.9, dampening: 0.0, weight_decay: 0.0, nesterov: false }
    }
}

/// SGD with momentum over FP32 buffers we own.
#[derive(Debug, Clone)]
pub struct Sgd {
    config: SgdConfig,
    step: u64,
    momentum: Vec<Vec<f32>>,
}

impl Sgd {
    /// SGD for parameters of the given lengths.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for negative factors or Nesterov without momentum.
    pub fn new(config: SgdConfig, sizes: &[usize]) -> Result<Self> {
        for (field, v) in [
            ("momentum", config.momentum),
            ("dampening", config.dampening),
            ("weight_decay", config.weight_decay),
        ] {
            check_non_negative(field, v)?;
        }
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(Error::config("nesterov", "needs a positive momentum and zero dampening"));
        }
        let momentum =
            if config.momentum > 0.0 { sizes.iter().map(|&n| vec![0.0; n]).collect() } else { Vec::new() };
        Ok(Self { config, step: 0, momentum })
    }
}

/// One step's scalars.
struct Rule {
    weight_decay: f32,
    neg_lr: f32,
    momentum: f32,
    keep: f32,
    nesterov: bool,
    /// The first step initialises the momentum buffer to the gradient.
    first: bool,
}

impl Rule {
    /// The gradient with L2 decay added. ATen's `add(self, other, alpha)` is
    /// `fma(other, alpha, self)` in its vector kernels; every `add` here follows it so results
    /// equal PyTorch's bit for bit.
    #[inline(always)]
    fn decayed(&self, g: f32, p: f32) -> f32 {
        if self.weight_decay != 0.0 {
            p.mul_add(self.weight_decay, g)
        } else {
            g
        }
    }
}

fn plain_step(rule: &Rule, param: &mut [f32], grad: &[f32]) {
    for (p, &g) in param.iter_mut().zip(grad) {
        *p = rule.decayed(g, *p).mul_add(rule.neg_lr, *p);
    }
}

fn momentum_step(rule: &Rule, param: &mut [f32], grad: &[f32], buf: &mut [f32]) {
    for ((p, &g), b) in param.iter_mut().zip(grad).zip(buf.iter_mut()) {
        let d = rule.decayed(g, *p);
        *b = if rule.first { d } else { d.mul_add(rule.keep, *b * rule.momentum) };
        let step = if rule.nesterov { b.mul_add(rule.momentum, d) } else { *b };
        *p = step.mul_add(rule.neg_lr, *p);
    }
}

impl Sgd {
    fn rule(&self, lr: f64, decay: bool) -> Rule {
        Rule {
            weight_decay: if decay { self.config.weight_decay as f32 } else { 0.0 },
            neg_lr: -lr as f32,
            momentum: self.config.momentum as f32,
            keep: (1.0 - self.config.dampening) as f32,
            nesterov: self.config.nesterov,
            first: self.step <= 1,
        }
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
        let rule = self.rule(lr, decay);
        let c = PARALLEL_CHUNK;
        match (self.buffer(index, param, grad)?, parallel) {
            (None, false) => plain_step(&rule, param, grad),
            (Some(buf), false) => momentum_step(&rule, param, grad, buf),
            (None, true) => {
                param.par_chunks_mut(c).zip(grad.par_chunks(c)).for_each(|(p, g)| plain_step(&rule, p, g))
            }
            (Some(buf), true) => param
                .par_chunks_mut(c)
                .zip(grad.par_chunks(c))
                .zip(buf.par_chunks_mut(c))
                .for_each(|((p, g), b)| momentum_step(&rule, p, g, b)),
        }
        Ok(())
    }

    /// Parameter `index`'s momentum buffer (`None` without momentum), after checking the
    /// slices' lengths.
    fn buffer(&mut self, index: usize, param: &[f32], grad: &[f32]) -> Result<Option<&mut [f32]>> {
        if self.momentum.is_empty() {
            check_len(index, param.len(), param, grad)?;
            return Ok(None);
        }
        let buf = self.momentum.get_mut(index).ok_or_else(|| Error::StateMismatch {
            name: format!("parameter {index}"),
            expected: "a known parameter".into(),
            found: index.to_string(),
        })?;
        check_len(index, buf.len(), param, grad)?;
        Ok(Some(buf))
    }
}

impl Optimizer for Sgd {
    step_counter!("sgd");

    host_updates!();

    fn state_bytes(&self) -> usize {
        self.momentum.iter().map(|b| b.len() * 4).sum()
    }

    fn state(&self) -> Result<OptimizerState> {
        let buffers =
            self.momentum.iter().enumerate().map(|(i, b)| (format!("momentum.{i}"), b.clone())).collect();
        Ok(OptimizerState {
            kind: self.name().into(),
            step: self.step,
            buffers,
            quantized: Default::default(),
        })
    }

    fn config(&self) -> Option<super::OptimizerConfig> {
        Some(super::OptimizerConfig::Sgd(self.config))
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.check_kind(self.name())?;
        let loaded = self
            .momentum
            .iter()
            .enumerate()
            .map(|(i, b)| Ok(state.buffer(&format!("momentum.{i}"), b.len())?.to_vec()))
            .collect::<Result<Vec<_>>>()?;
        self.momentum = loaded;
        self.step = state.step;
        Ok(())
    }
}
