//! SGD with momentum, as `torch.optim.SGD` (L2 weight decay added to the gradient, momentum
//! buffer initialised to the first gradient, optional dampening and Nesterov).

use serde::{Deserialize, Serialize};

use super::{check_len, Optimizer, OptimizerState};
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

impl Optimizer for Sgd {
    fn name(&self) -> &'static str {
        "sgd"
    }

    fn begin_step(&mut self) {
        self.step += 1;
    }

    fn step_count(&self) -> u64 {
        self.step
    }

    fn update(&mut self, index: usize, param: &mut [f32], grad: &[f32], lr: f64, decay: bool) -> Result<()> {
        // ATen's `add(self, other, alpha)` is `fma(other, alpha, self)` in its vector kernels;
        // every `add` below follows it so results equal PyTorch's bit for bit.
        let wd = if decay { self.config.weight_decay as f32 } else { 0.0 };
        let with_decay = |g: f32, p: f32| if wd != 0.0 { p.mul_add(wd, g) } else { g };
        let neg_lr = -lr as f32;
        if self.momentum.is_empty() {
            check_len(index, param.len(), param, grad)?;
            for (p, &g) in param.iter_mut().zip(grad) {
                *p = with_decay(g, *p).mul_add(neg_lr, *p);
            }
            return Ok(());
        }
        let first = self.step <= 1;
        let Some(buf) = self.momentum.get_mut(index) else {
            return Err(Error::StateMismatch {
                name: format!("parameter {index}"),
                expected: "a known parameter".into(),
                found: index.to_string(),
            });
        };
        check_len(index, buf.len(), param, grad)?;
        let momentum = self.config.momentum as f32;
        let keep = (1.0 - self.config.dampening) as f32;
        for ((p, &g), b) in param.iter_mut().zip(grad).zip(buf.iter_mut()) {
            let d = with_decay(g, *p);
            *b = if first { d } else { d.mul_add(keep, *b * momentum) };
            let step = if self.config.nesterov { b.mul_add(momentum, d) } else { *b };
            *p = step.mul_add(neg_lr, *p);
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.momentum.iter().map(|b| b.len() * 4).sum()
    }

    fn state(&self) -> OptimizerState {
        let buffers =
            self.momentum.iter().enumerate().map(|(i, b)| (format!("momentum.{i}"), b.clone())).collect();
        OptimizerState { kind: self.name().into(), step: self.step, buffers, quantized: Default::default() }
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
