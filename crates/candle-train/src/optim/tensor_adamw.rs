//! AdamW written with Candle tensor ops, so its state and its step live on any device the
//! parameters do (issue 16's reference path: what a fused device kernel must reproduce).
//!
//! The arithmetic is [`super::AdamW`]'s (torch's single-tensor AdamW) in the same order, with
//! the same f64-computed, f32-rounded scalars, except that tensor ops cannot fuse: ATen's lerp
//! and addcmul round once (a fused multiply-add) where this rounds twice. On the same inputs
//! one step therefore agrees with the flat-slice kernel within 2 ulp of each operation's
//! largest operand per element (`tests/tensor_optimizer.rs`; measured in ulps of the result, a
//! moment that cancels to near zero can differ by over 100). Divisions are true divisions (a scalar tensor, not Candle's
//! multiply-by-reciprocal `Tensor / f64`).

use candle::{DType, Tensor};

use super::adamw::Scalars;
use super::{AdamWConfig, OptimizerState};
use crate::error::{Error, Result};

/// AdamW over FP32 moments held as tensors on each parameter's device.
#[derive(Debug, Clone)]
pub struct TensorAdamW {
    config: AdamWConfig,
    step: u64,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

impl TensorAdamW {
    /// Zero moments shaped and placed like `params` (FP32 whatever the parameters' dtype).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bad hyper-parameters; a Candle error when the device
    /// cannot hold the state.
    pub fn new(config: AdamWConfig, params: &[&Tensor]) -> Result<Self> {
        config.validate()?;
        let zeros = |p: &&Tensor| Tensor::zeros(p.shape(), DType::F32, p.device());
        Ok(Self {
            config,
            step: 0,
            exp_avg: params.iter().map(zeros).collect::<candle::Result<_>>()?,
            exp_avg_sq: params.iter().map(zeros).collect::<candle::Result<_>>()?,
        })
    }

    /// Starts an optimizer step (advances the count bias correction uses).
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// The number of steps begun.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Bytes of state held (on the parameters' devices).
    pub fn state_bytes(&self) -> usize {
        self.exp_avg.iter().chain(&self.exp_avg_sq).map(|t| t.elem_count() * 4).sum()
    }

    /// Parameter `index`'s moments (first, second).
    ///
    /// # Errors
    /// [`Error::StateMismatch`] for an index out of range.
    pub fn moments(&self, index: usize) -> Result<(&Tensor, &Tensor)> {
        match (self.exp_avg.get(index), self.exp_avg_sq.get(index)) {
            (Some(m), Some(v)) => Ok((m, v)),
            _ => Err(self.bad_index(index)),
        }
    }

    fn bad_index(&self, index: usize) -> Error {
        Error::StateMismatch {
            name: format!("parameter {index}"),
            expected: format!("an index below {}", self.exp_avg.len()),
            found: index.to_string(),
        }
    }

    /// One AdamW update of FP32 parameter `index` from its FP32 gradient: returns the new
    /// parameter and replaces the moments. `decay` says whether weight decay applies.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] for an index out of range or a parameter or gradient whose
    /// shape differs from the state's; a Candle error from the device.
    pub fn update(
        &mut self,
        index: usize,
        param: &Tensor,
        grad: &Tensor,
        lr: f64,
        decay: bool,
    ) -> Result<Tensor> {
        let (m, v) = self.moments(index)?;
        for (what, t) in [("parameter", param), ("gradient", grad)] {
            if t.shape() != m.shape() || t.dtype() != DType::F32 {
                return Err(Error::StateMismatch {
                    name: format!("parameter {index}"),
                    expected: format!("an F32 {what} of shape {:?}", m.dims()),
                    found: format!("{:?} {:?}", t.dtype(), t.dims()),
                });
            }
        }
        let s = Scalars::new(&self.config, self.step.max(1), lr, decay);
        // Multiplications and the eps add go through `affine` (x * a + b with b = 0, or a = 1:
        // the same single rounding, and no host-to-device copy of a scalar); the division by
        // the bias correction must be a true division, so its divisor is a scalar tensor.
        let f = |x: f32| f64::from(x);
        // p *= 1 - lr * wd
        let p = param.affine(f(s.decay_factor), 0.0)?;
        // m = m + w * (g - m)   (ATen: fma(w, g - m, m))
        let m = (grad - m)?.affine(f(s.lerp_weight), 0.0)?.add(m)?;
        // v = v * beta2 + ((1 - beta2) * g) * g   (ATen: fma((1 - beta2) * g, g, v * beta2))
        let v = grad.affine(f(s.one_minus_beta2), 0.0)?.mul(grad)?.add(&v.affine(f(s.beta2), 0.0)?)?;
        // denom = sqrt(v) / sqrt(1 - beta2^t) + eps
        let bias_correction = Tensor::new(s.bias_correction2_sqrt, param.device())?;
        let denom = v.sqrt()?.broadcast_div(&bias_correction)?.affine(1.0, f(s.eps))?;
        // p += (-lr / (1 - beta1^t)) * m / denom
        let p = p.add(&m.affine(f(s.neg_step_size), 0.0)?.div(&denom)?)?;
        self.exp_avg[index] = m;
        self.exp_avg_sq[index] = v;
        Ok(p)
    }

    /// The state in [`super::AdamW`]'s format (`exp_avg.{i}`, `exp_avg_sq.{i}`, kind `adamw`),
    /// copied to the host: checkpoints do not depend on where the step ran.
    ///
    /// # Errors
    /// A Candle error when a moment cannot be read back.
    pub fn state(&self) -> Result<OptimizerState> {
        let mut buffers = std::collections::BTreeMap::new();
        for (i, (m, v)) in self.exp_avg.iter().zip(&self.exp_avg_sq).enumerate() {
            buffers.insert(format!("exp_avg.{i}"), m.flatten_all()?.to_vec1::<f32>()?);
            buffers.insert(format!("exp_avg_sq.{i}"), v.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(OptimizerState { kind: "adamw".into(), step: self.step, buffers, quantized: Default::default() })
    }

    /// Restores a state saved by [`TensorAdamW::state`] or [`super::AdamW`] onto the moments'
    /// devices; nothing changes unless every buffer is present with the right length.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] naming the first missing or mis-sized buffer, or another
    /// optimizer's state.
    pub fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.check_kind("adamw")?;
        let restore = |name: String, like: &Tensor| -> Result<Tensor> {
            let values = state.buffer(&name, like.elem_count())?;
            Ok(Tensor::from_slice(values, like.shape(), like.device())?)
        };
        let m = self
            .exp_avg
            .iter()
            .enumerate()
            .map(|(i, t)| restore(format!("exp_avg.{i}"), t))
            .collect::<Result<Vec<_>>>()?;
        let v = self
            .exp_avg_sq
            .iter()
            .enumerate()
            .map(|(i, t)| restore(format!("exp_avg_sq.{i}"), t))
            .collect::<Result<Vec<_>>>()?;
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.step = state.step;
        Ok(())
    }
}
