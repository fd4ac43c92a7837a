//! AdamW whose moments are tensors on the parameters' device, stepped there: on CUDA (feature
//! `cuda`) by the fused kernel of `optim::fused_cuda` (bit-equal to the flat kernel),
//! elsewhere, or with [`TensorAdamW::tensor_ops`], by Candle tensor ops (issue 16's reference
//! path, which runs on any device).
//!
//! The arithmetic is [`super::AdamW`]'s (torch's single-tensor AdamW) in the same order, with
//! the same f64-computed, f32-rounded scalars, except that tensor ops cannot fuse: ATen's lerp
//! and addcmul round once (a fused multiply-add) where this rounds twice. On the same inputs
//! one step therefore agrees with the flat-slice kernel within 2 ulp of each operation's
//! largest operand per element (`tests/tensor_optimizer.rs`; measured in ulps of the result, a
//! moment that cancels to near zero can differ by over 100). Divisions are true divisions (a scalar tensor, not Candle's
//! multiply-by-reciprocal `Tensor / f64`).

use candle::{DType, Device, Tensor};

use super::adamw::Scalars;
use super::{AdamWConfig, Optimizer, OptimizerConfig, OptimizerState};
use crate::error::{Error, Result};

/// AdamW over FP32 moments held as tensors on each parameter's device.
#[derive(Debug, Clone)]
pub struct TensorAdamW {
    config: AdamWConfig,
    device: Device,
    /// Steps through the fused CUDA kernel (a CUDA device and feature `cuda`).
    fused: bool,
    step: u64,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

impl TensorAdamW {
    /// Zero moments shaped and placed like `params` (FP32 whatever the parameters' dtype; all
    /// on one device, CPU when there are none).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bad hyper-parameters or parameters on several devices; a
    /// Candle error when the device cannot hold the state.
    pub fn new(config: AdamWConfig, params: &[&Tensor]) -> Result<Self> {
        config.validate()?;
        let device = one_device(params)?;
        let zeros = |p: &&Tensor| Tensor::zeros(p.shape(), DType::F32, p.device());
        Ok(Self {
            config,
            fused: cfg!(feature = "cuda") && device.is_cuda(),
            device,
            step: 0,
            exp_avg: params.iter().map(zeros).collect::<candle::Result<_>>()?,
            exp_avg_sq: params.iter().map(zeros).collect::<candle::Result<_>>()?,
        })
    }

    /// The same optimizer stepping through Candle tensor ops even on CUDA (the reference the
    /// device matrix holds the fused kernel to).
    pub fn tensor_ops(mut self) -> Self {
        self.fused = false;
        self
    }

    /// Whether steps run through the fused CUDA kernel.
    pub fn is_fused(&self) -> bool {
        self.fused
    }

    /// The fused kernel's step, in place (`copy`: a half-precision parameter to write too).
    #[cfg(feature = "cuda")]
    fn fused_step(
        &self,
        index: usize,
        p: &Tensor,
        g: &Tensor,
        copy: Option<&candle::Var>,
        lr: f64,
        decay: bool,
    ) -> Result<()> {
        let (m, v) = self.moments(index)?;
        let s = Scalars::new(&self.config, self.step.max(1), lr, decay);
        let device = super::fused_cuda::cuda_device(&self.device)?;
        if let Some(copy) = copy {
            super::fused_cuda::check_copy(p, copy)?;
        }
        super::fused_cuda::launch_adamw(&device, index, p, g, (m, v), copy, &s)
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
    fn step_tensor(
        &mut self,
        index: usize,
        param: &Tensor,
        grad: &Tensor,
        lr: f64,
        decay: bool,
    ) -> Result<Tensor> {
        let (m, v) = self.moments(index)?;
        check_tensors(index, m, param, grad)?;
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
}

/// Checks that `param` and `grad` are F32 tensors shaped and placed like the state `like`.
pub(crate) fn check_tensors(index: usize, like: &Tensor, param: &Tensor, grad: &Tensor) -> Result<()> {
    for (what, t) in [("parameter", param), ("gradient", grad)] {
        if t.shape() != like.shape() || t.dtype() != DType::F32 || !t.device().same_device(like.device()) {
            return Err(Error::StateMismatch {
                name: format!("parameter {index}"),
                expected: format!(
                    "an F32 {what} of shape {:?} on {:?}",
                    like.dims(),
                    like.device().location()
                ),
                found: format!("{:?} {:?} on {:?}", t.dtype(), t.dims(), t.device().location()),
            });
        }
    }
    Ok(())
}

/// Restores buffer `name` of `state` shaped and placed like `like`.
pub(crate) fn restore_buffer(state: &OptimizerState, name: String, like: &Tensor) -> Result<Tensor> {
    let values = state.buffer(&name, like.elem_count())?;
    Ok(Tensor::from_slice(values, like.shape(), like.device())?)
}

/// A tensor's values, copied to the host.
pub(crate) fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Refuses a flat-slice update for an optimizer whose state lives on a device.
pub(crate) fn refuse_slices(name: &str, device: &Device) -> Error {
    Error::config(
        "optimizer",
        format!(
            "`{name}` keeps its state on {:?}: step it with `update_tensor` (LocalUpdater does)",
            device.location()
        ),
    )
}

impl Optimizer for TensorAdamW {
    step_counter!("adamw");

    tensor_updates!();

    fn config(&self) -> Option<OptimizerConfig> {
        Some(OptimizerConfig::AdamW(self.config))
    }

    /// Bytes of state held (on the parameters' device).
    fn state_bytes(&self) -> usize {
        self.exp_avg.iter().chain(&self.exp_avg_sq).map(|t| t.elem_count() * 4).sum()
    }

    /// The state in [`super::AdamW`]'s format (`exp_avg.{i}`, `exp_avg_sq.{i}`, kind `adamw`),
    /// copied to the host.
    fn state(&self) -> Result<OptimizerState> {
        let mut buffers = std::collections::BTreeMap::new();
        for (i, (m, v)) in self.exp_avg.iter().zip(&self.exp_avg_sq).enumerate() {
            buffers.insert(format!("exp_avg.{i}"), host_values(m)?);
            buffers.insert(format!("exp_avg_sq.{i}"), host_values(v)?);
        }
        Ok(OptimizerState { kind: "adamw".into(), step: self.step, buffers, quantized: Default::default() })
    }

    /// Restores a state saved by this or [`super::AdamW`] onto the moments' device; nothing
    /// changes unless every buffer is present with the right length.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.check_kind("adamw")?;
        let restore = |prefix: &str, ts: &[Tensor]| {
            ts.iter()
                .enumerate()
                .map(|(i, t)| restore_buffer(state, format!("{prefix}.{i}"), t))
                .collect::<Result<Vec<_>>>()
        };
        let m = restore("exp_avg", &self.exp_avg)?;
        let v = restore("exp_avg_sq", &self.exp_avg_sq)?;
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.step = state.step;
        Ok(())
    }
}

/// The one device `params` are on (CPU for none).
pub(crate) fn one_device(params: &[&Tensor]) -> Result<Device> {
    let device = params.first().map_or(Device::Cpu, |p| p.device().clone());
    match params.iter().find(|p| !p.device().same_device(&device)) {
        Some(p) => Err(Error::config(
            "optimizer",
            format!(
                "a device-resident optimizer keeps its state on one device; parameters are on {:?} and {:?}",
                device.location(),
                p.device().location()
            ),
        )),
        None => Ok(device),
    }
}
