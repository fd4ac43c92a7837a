//! SGD with momentum whose buffers live on the parameters' device, stepped there: on CUDA
//! (feature `cuda`) by a fused kernel bit-equal to [`super::Sgd`], elsewhere (or with
//! [`TensorSgd::tensor_ops`]) by Candle tensor ops, the reference for the fused kernel.
//!
//! The rule is [`super::Sgd`]'s (torch's): `d = g + wd * p`; `buf = d` on the first step, else
//! `buf = momentum * buf + (1 - dampening) * d`; Nesterov steps along `d + momentum * buf`;
//! `p -= lr * step`. Each `fma` of the flat kernel rounds twice here (a product, then a sum),
//! so one step agrees with it within 2 ulp of each operation's largest operand.

use candle::{Device, Tensor};

use super::tensor_adamw::{check_tensors, host_values, one_device, refuse_slices, restore_buffer};
use super::{Optimizer, OptimizerConfig, OptimizerState, Sgd, SgdConfig};
use crate::error::{Error, Result};

/// SGD whose momentum buffers are tensors on the parameters' device.
#[derive(Debug, Clone)]
pub struct TensorSgd {
    config: SgdConfig,
    device: Device,
    /// Steps through the fused CUDA kernel (a CUDA device and feature `cuda`).
    fused: bool,
    step: u64,
    /// One FP32 buffer per parameter, or none at all without momentum.
    momentum: Vec<Tensor>,
    /// The parameters' shapes (the step checks against them when there is no buffer).
    shapes: Vec<candle::Shape>,
}

impl TensorSgd {
    /// Zero momentum buffers shaped and placed like `params` (none without momentum).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bad hyper-parameters (as [`Sgd::new`]) or parameters on
    /// several devices; a Candle error when the device cannot hold the state.
    pub fn new(config: SgdConfig, params: &[&Tensor]) -> Result<Self> {
        // The same validation as the flat optimizer's, with its messages.
        Sgd::new(config, &[])?;
        let device = one_device(params)?;
        let momentum = if config.momentum > 0.0 {
            params
                .iter()
                .map(|p| Tensor::zeros(p.shape(), candle::DType::F32, p.device()))
                .collect::<candle::Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            config,
            fused: cfg!(feature = "cuda") && device.is_cuda(),
            device,
            step: 0,
            momentum,
            shapes: params.iter().map(|p| p.shape().clone()).collect(),
        })
    }

    /// The same optimizer stepping through Candle tensor ops even on CUDA.
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
        let like = self.like(index)?;
        let device = super::fused_cuda::cuda_device(&self.device)?;
        if let Some(copy) = copy {
            super::fused_cuda::check_copy(p, copy)?;
        }
        let rule = (&self.config, lr, decay, self.step <= 1);
        super::fused_cuda::launch_sgd(&device, index, &like, p, g, self.momentum.get(index), copy, rule)
    }

    /// One tensor-op step of parameter `index`: returns the new values, replaces the buffer.
    fn step_tensor(
        &mut self,
        index: usize,
        param: &Tensor,
        grad: &Tensor,
        lr: f64,
        decay: bool,
    ) -> Result<Tensor> {
        let like = self.like(index)?;
        check_tensors(index, &like, param, grad)?;
        // The flat kernel's f32 scalars, widened back exactly for `affine`.
        let c = &self.config;
        let wd = f64::from(if decay { c.weight_decay as f32 } else { 0.0 });
        let neg_lr = f64::from(-lr as f32);
        let d = if wd != 0.0 { param.affine(wd, 0.0)?.add(grad)? } else { grad.clone() };
        let step = if self.momentum.is_empty() {
            d
        } else {
            let momentum = f64::from(c.momentum as f32);
            let buf = if self.step <= 1 {
                d.clone()
            } else {
                d.affine(f64::from((1.0 - c.dampening) as f32), 0.0)?.add(&like.affine(momentum, 0.0)?)?
            };
            let step = if c.nesterov { buf.affine(momentum, 0.0)?.add(&d)? } else { buf.clone() };
            self.momentum[index] = buf;
            step
        };
        Ok(step.affine(neg_lr, 0.0)?.add(param)?)
    }

    fn like(&self, index: usize) -> Result<Tensor> {
        let shape = self.shapes.get(index).ok_or_else(|| Error::StateMismatch {
            name: format!("parameter {index}"),
            expected: format!("an index below {}", self.shapes.len()),
            found: index.to_string(),
        })?;
        match self.momentum.get(index) {
            Some(b) => Ok(b.clone()),
            None => Ok(Tensor::zeros(shape, candle::DType::F32, &self.device)?),
        }
    }
}

impl Optimizer for TensorSgd {
    step_counter!("sgd");

    tensor_updates!();

    fn config(&self) -> Option<OptimizerConfig> {
        Some(OptimizerConfig::Sgd(self.config))
    }

    fn state_bytes(&self) -> usize {
        self.momentum.iter().map(|t| t.elem_count() * 4).sum()
    }

    /// The state in [`Sgd`]'s format (`momentum.{i}`, kind `sgd`), copied to the host.
    fn state(&self) -> Result<OptimizerState> {
        let buffers = self
            .momentum
            .iter()
            .enumerate()
            .map(|(i, b)| Ok((format!("momentum.{i}"), host_values(b)?)))
            .collect::<Result<_>>()?;
        Ok(OptimizerState { kind: "sgd".into(), step: self.step, buffers, quantized: Default::default() })
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.check_kind("sgd")?;
        let loaded = self
            .momentum
            .iter()
            .enumerate()
            .map(|(i, b)| restore_buffer(state, format!("momentum.{i}"), b))
            .collect::<Result<Vec<_>>>()?;
        self.momentum = loaded;
        self.step = state.step;
        Ok(())
    }
}
