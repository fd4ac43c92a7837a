//! Optimizers over flat FP32 slices whose state we own (so it can be saved, sharded and
//! quantized), with the same code stepping a whole model or one rank's shard.

/// `name`, `begin_step`, `step_count` and `settings` of an [`Optimizer`] with a `step: u64`
/// counter and a serializable `config`, named `$name` (its state's kind and settings' key).
macro_rules! step_counter {
    ($name:literal) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn begin_step(&mut self) {
            self.step += 1;
        }

        fn step_count(&self) -> u64 {
            self.step
        }

        fn settings(&self) -> String {
            crate::trainer::canonical_json($name, &self.config)
        }
    };
}

/// `update` and `update_parallel` of a host [`Optimizer`] through its
/// `step_parameter(index, param, grad, lr, decay, parallel)`.
macro_rules! host_updates {
    () => {
        fn update(
            &mut self,
            index: usize,
            param: &mut [f32],
            grad: &[f32],
            lr: f64,
            decay: bool,
        ) -> Result<()> {
            self.step_parameter(index, param, grad, lr, decay, false)
        }

        fn update_parallel(
            &mut self,
            index: usize,
            param: &mut [f32],
            grad: &[f32],
            lr: f64,
            decay: bool,
        ) -> Result<()> {
            self.step_parameter(index, param, grad, lr, decay, true)
        }
    };
}

/// `update` (refused: the state is on the device), `update_tensor`, `update_master` and
/// `device` of a tensor-op [`Optimizer`] with a `device`, a `fused` flag (CUDA), and its
/// `step_tensor(index, param, grad, lr, decay)` / `fused_step(index, param, grad, copy, lr,
/// decay)`.
macro_rules! tensor_updates {
    () => {
        fn update(&mut self, _: usize, _: &mut [f32], _: &[f32], _: f64, _: bool) -> Result<()> {
            Err(refuse_slices(self.name(), &self.device))
        }

        fn update_tensor(
            &mut self,
            index: usize,
            param: &Tensor,
            grad: &Tensor,
            lr: f64,
            decay: bool,
        ) -> Result<Option<Tensor>> {
            #[cfg(feature = "cuda")]
            if self.fused {
                self.fused_step(index, param, grad, None, lr, decay)?;
                return Ok(None);
            }
            self.step_tensor(index, param, grad, lr, decay).map(Some)
        }

        fn update_master(
            &mut self,
            index: usize,
            master: &Tensor,
            grad: &Tensor,
            model: &candle::Var,
            lr: f64,
            decay: bool,
        ) -> Result<Option<Tensor>> {
            #[cfg(feature = "cuda")]
            if self.fused {
                // The master and the model's rounded copy in one pass.
                self.fused_step(index, master, grad, Some(model), lr, decay)?;
                return Ok(None);
            }
            let new = self.step_tensor(index, master, grad, lr, decay)?;
            model.set(&new.to_dtype(model.dtype())?)?;
            Ok(Some(new))
        }

        fn device(&self) -> Option<Device> {
            Some(self.device.clone())
        }
    };
}

pub mod adamw;
pub mod adamw8bit;
#[cfg(feature = "cuda")]
pub mod fused_cuda;
pub mod quant;
pub mod sgd;
pub mod tensor_adamw;
pub mod tensor_sgd;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

pub use adamw::{AdamW, AdamWConfig};
pub use adamw8bit::AdamW8bit;
pub use sgd::{Sgd, SgdConfig};
pub use tensor_adamw::TensorAdamW;
pub use tensor_sgd::TensorSgd;

use crate::error::{Error, Result};
use crate::io::write_atomic;

/// An optimizer: where its state lives decides how it steps.
///
/// - A **host** optimizer ([`AdamW`], [`Sgd`], [`AdamW8bit`]) keeps its state in host
///   vectors and steps flat FP32 slices with [`Optimizer::update`] (on CPU, the fast path:
///   bit-equal to torch, rayon-parallel in [`Optimizer::update_parallel`]).
/// - A **device-resident** optimizer ([`TensorAdamW`], [`TensorSgd`]: fused CUDA kernels on
///   CUDA, tensor ops elsewhere; `FusedAdamW8bit` on CUDA, feature `cuda`) keeps its state as
///   tensors on the parameters' device
///   ([`Optimizer::device`] says which) and steps FP32 tensors there with
///   [`Optimizer::update_tensor`]; nothing crosses to the host.
///
/// [`OptimizerConfig::build_for`] picks the right one for where the parameters are.
///
/// Per optimizer step: one [`Optimizer::begin_step`], then one update per parameter. A skipped
/// step (inf/NaN gradients) calls neither, so the step count used for bias correction does not
/// advance.
pub trait Optimizer: Send {
    /// A short name (`adamw`, `sgd`).
    fn name(&self) -> &'static str;

    /// Starts an optimizer step: advances the step count.
    fn begin_step(&mut self);

    /// The number of steps begun so far.
    fn step_count(&self) -> u64;

    /// Its hyper-parameters (all of them: betas, eps, weight decay, momentum, ...) as canonical
    /// JSON; a checkpoint resumes only into an optimizer whose settings are equal.
    fn settings(&self) -> String;

    /// Updates parameter `index` (as numbered at construction) in place. `decay` says whether
    /// weight decay applies to it.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] when the slices do not have the parameter's length.
    fn update(&mut self, index: usize, param: &mut [f32], grad: &[f32], lr: f64, decay: bool) -> Result<()>;

    /// [`Optimizer::update`] with the work split over rayon's threads in chunks of
    /// [`PARALLEL_CHUNK`] elements: the CPU step of an offloaded optimizer. The result is
    /// bit-identical to `update` (every element's arithmetic is the same; only the thread that
    /// does it differs). The default runs `update` on the calling thread.
    ///
    /// # Errors
    /// As [`Optimizer::update`].
    fn update_parallel(
        &mut self,
        index: usize,
        param: &mut [f32],
        grad: &[f32],
        lr: f64,
        decay: bool,
    ) -> Result<()> {
        self.update(index, param, grad, lr, decay)
    }

    /// Bytes of optimizer state held.
    fn state_bytes(&self) -> usize;

    /// The state as named FP32 buffers plus the step count, on the host (a device-resident
    /// optimizer copies it back: checkpoints do not depend on where the step ran).
    ///
    /// # Errors
    /// A device error reading device-resident state back.
    fn state(&self) -> Result<OptimizerState>;

    /// The device this optimizer keeps its state on, for a device-resident optimizer (`None`,
    /// the default: state in host vectors, stepped through [`Optimizer::update`]).
    fn device(&self) -> Option<Device> {
        None
    }

    /// Updates parameter `index`, an FP32 tensor on [`Optimizer::device`], from its FP32
    /// gradient there. Returns the new values, or `None` when `param`'s own storage was updated
    /// in place (a fused kernel stepping a contiguous tensor).
    ///
    /// # Errors
    /// [`Error::StateMismatch`] for a parameter or gradient of another shape, dtype or
    /// device; the default (a host optimizer) refuses, naming the optimizer.
    fn update_tensor(
        &mut self,
        index: usize,
        param: &Tensor,
        grad: &Tensor,
        lr: f64,
        decay: bool,
    ) -> Result<Option<Tensor>> {
        let _ = (index, param, grad, lr, decay);
        Err(Error::config(
            "optimizer",
            format!("`{}` keeps its state on the host: step it with `update` on FP32 slices", self.name()),
        ))
    }

    /// [`Optimizer::update_tensor`] for a half-precision parameter `model` whose FP32 master
    /// weights are `master`: steps the master and writes the new values, rounded to nearest
    /// even, into `model`. The default casts and copies after the step; a fused kernel writes
    /// both in one pass. Returns as `update_tensor` (the new master, or `None` when updated in
    /// place).
    ///
    /// # Errors
    /// As [`Optimizer::update_tensor`]; a `model` of another shape or device.
    fn update_master(
        &mut self,
        index: usize,
        master: &Tensor,
        grad: &Tensor,
        model: &Var,
        lr: f64,
        decay: bool,
    ) -> Result<Option<Tensor>> {
        let new = self.update_tensor(index, master, grad, lr, decay)?;
        let value = new.as_ref().unwrap_or(master);
        model.set(&value.to_dtype(model.dtype())?)?;
        Ok(new)
    }

    /// The configuration this optimizer was built from, for the built-in optimizers (lets an
    /// updater move the optimizer between the host and a device: [`OptimizerConfig::build`]
    /// then [`Optimizer::load_state`]). `None` by default.
    fn config(&self) -> Option<OptimizerConfig> {
        None
    }

    /// Restores the state saved by [`Optimizer::state`].
    ///
    /// # Errors
    /// [`Error::StateMismatch`] naming the first buffer that is missing or has the wrong
    /// length, or when the state belongs to another optimizer; nothing is changed then.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
}

/// Elements per rayon task in [`Optimizer::update_parallel`]: 64 Ki values (256 KiB of each
/// FP32 stream, about 1.8 MiB of AdamW traffic) amortise the scheduling and still balance the
/// threads. A multiple of the 8-bit block ([`quant::BLOCK`]), so no block is split.
pub const PARALLEL_CHUNK: usize = 1 << 16;

const _: () = assert!(PARALLEL_CHUNK % quant::BLOCK == 0);

/// Which optimizer, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// AdamW with decoupled weight decay.
    AdamW(AdamWConfig),
    /// AdamW with both moments blockwise-quantized to 8 bits (parameters of 4096 elements or
    /// more; smaller ones keep FP32 moments).
    #[serde(rename = "adamw8bit")]
    AdamW8bit(AdamWConfig),
    /// SGD with momentum.
    Sgd(SgdConfig),
}

impl OptimizerConfig {
    /// Validates the hyper-parameters and creates the optimizer for parameters of the given
    /// lengths.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the bad hyper-parameter.
    pub fn build(&self, sizes: &[usize]) -> Result<Box<dyn Optimizer>> {
        Ok(match self {
            OptimizerConfig::AdamW(c) => Box::new(AdamW::new(*c, sizes)?),
            OptimizerConfig::AdamW8bit(c) => Box::new(AdamW8bit::new(*c, sizes)?),
            OptimizerConfig::Sgd(c) => Box::new(Sgd::new(*c, sizes)?),
        })
    }

    /// The optimizer for `params` where they live: on CPU, the host optimizer of
    /// [`OptimizerConfig::build`] (the flat-slice fast path); on another device, a
    /// device-resident optimizer with its state there: on CUDA, the fused kernels for AdamW and
    /// SGD and 8-bit AdamW ([`TensorAdamW`] and [`TensorSgd`] step through them there; feature
    /// `cuda`), elsewhere their tensor-op paths. 8-bit AdamW off CUDA stays on the host (and
    /// the updater stages its gradients and parameters, counted in its transfers).
    ///
    /// # Errors
    /// As [`OptimizerConfig::build`]; a device that cannot hold the state.
    pub fn build_for(&self, params: &[&Tensor]) -> Result<Box<dyn Optimizer>> {
        let device = params.first().map(|p| p.device().clone()).unwrap_or(Device::Cpu);
        // 8-bit AdamW has a device-resident form on CUDA only (its fused kernel).
        if device.is_cpu() || !self.has_device_form(&device) {
            return self.build(&params.iter().map(|p| p.elem_count()).collect::<Vec<_>>());
        }
        self.build_on_device(params)
    }

    /// A device-resident optimizer for `params` on their device, whatever it is (CPU
    /// included: the tensor-op path, which tests compare with the flat-slice one).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for 8-bit AdamW (no device-resident form) or bad
    /// hyper-parameters; a device that cannot hold the state.
    pub fn build_on_device(&self, params: &[&Tensor]) -> Result<Box<dyn Optimizer>> {
        // On CUDA, TensorAdamW and TensorSgd step through the fused kernels.
        match self {
            OptimizerConfig::AdamW(c) => Ok(Box::new(TensorAdamW::new(*c, params)?)),
            OptimizerConfig::Sgd(c) => Ok(Box::new(TensorSgd::new(*c, params)?)),
            #[cfg(feature = "cuda")]
            OptimizerConfig::AdamW8bit(c) if params.first().is_some_and(|p| p.device().is_cuda()) => {
                Ok(Box::new(fused_cuda::FusedAdamW8bit::new(*c, params)?))
            }
            OptimizerConfig::AdamW8bit(_) => Err(Error::config(
                "optimizer",
                "8-bit AdamW is device-resident on CUDA only (its fused kernel): build it on the host (`build`)",
            )),
        }
    }

    /// [`OptimizerConfig::build_on_device`] for pieces of parameters (a ZeRO rank's slices, as
    /// tensors on its device): `originals[i]` is the length of the parameter `params[i]` is a
    /// piece of; only 8-bit AdamW (on CUDA) looks at it.
    ///
    /// # Errors
    /// As [`OptimizerConfig::build_on_device`]; `originals` of another length than `params`.
    pub fn build_pieces_on_device(
        &self,
        params: &[&Tensor],
        originals: &[usize],
    ) -> Result<Box<dyn Optimizer>> {
        if originals.len() != params.len() {
            return Err(Error::config(
                "pieces",
                format!("{} original lengths for {} pieces", originals.len(), params.len()),
            ));
        }
        match self {
            #[cfg(feature = "cuda")]
            OptimizerConfig::AdamW8bit(c) if params.first().is_some_and(|p| p.device().is_cuda()) => {
                Ok(Box::new(fused_cuda::FusedAdamW8bit::for_pieces(*c, params, originals)?))
            }
            other => other.build_on_device(params),
        }
    }

    /// Whether [`OptimizerConfig::build_on_device`] has a form for `device` (every optimizer
    /// but 8-bit AdamW everywhere; 8-bit AdamW on CUDA under the `cuda` feature).
    pub fn has_device_form(&self, device: &Device) -> bool {
        !matches!(self, OptimizerConfig::AdamW8bit(_)) || (cfg!(feature = "cuda") && device.is_cuda())
    }

    /// [`OptimizerConfig::build`] for pieces of parameters (a ZeRO rank's slices): `(len,
    /// original)` per piece. Only 8-bit AdamW looks at `original` (its 8-bit-or-32-bit choice
    /// is per original parameter); the others see the lengths.
    ///
    /// # Errors
    /// As [`OptimizerConfig::build`]; a piece longer than its parameter.
    pub fn build_pieces(&self, pieces: &[(usize, usize)]) -> Result<Box<dyn Optimizer>> {
        match self {
            OptimizerConfig::AdamW8bit(c) => Ok(Box::new(AdamW8bit::for_pieces(*c, pieces)?)),
            other => other.build(&pieces.iter().map(|&(len, _)| len).collect::<Vec<_>>()),
        }
    }
}

/// An optimizer's state: its kind, step count and named FP32 buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// The optimizer's name.
    pub kind: String,
    /// Steps taken.
    pub step: u64,
    /// Named buffers (`exp_avg.3`, `momentum.0`).
    pub buffers: BTreeMap<String, Vec<f32>>,
    /// Named byte buffers (8-bit codes: `exp_avg.3.codes`), saved as U8 tensors.
    pub quantized: BTreeMap<String, Vec<u8>>,
}

impl OptimizerState {
    /// Writes the state to a safetensors file (kind and step in its metadata), atomically.
    ///
    /// # Errors
    /// On serialization or I/O failure.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self
            .buffers
            .iter()
            .map(|(name, data)| Ok((name.clone(), Tensor::from_slice(data, data.len(), &Device::Cpu)?)))
            .collect::<Result<Vec<_>>>()?;
        for (name, data) in &self.quantized {
            if self.buffers.contains_key(name) {
                return Err(Error::MalformedState {
                    path: path.to_path_buf(),
                    reason: format!("`{name}` is both an FP32 and a byte buffer"),
                });
            }
            tensors.push((name.clone(), Tensor::from_slice(data, data.len(), &Device::Cpu)?));
        }
        let metadata = HashMap::from([
            ("kind".to_string(), self.kind.clone()),
            ("step".to_string(), self.step.to_string()),
        ]);
        let bytes = safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| Error::MalformedState { path: path.to_path_buf(), reason: e.to_string() })?;
        write_atomic(path, &bytes)
    }

    /// Reads a state written by [`OptimizerState::save`].
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::MalformedState`] saying what is wrong with the file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::io::read_bounded(path, crate::io::MAX_STATE_BYTES)?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses the bytes of a file written by [`OptimizerState::save`] (`path` names it in
    /// errors).
    ///
    /// # Errors
    /// [`Error::MalformedState`] saying what is wrong.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let malformed = |reason: String| Error::MalformedState { path: path.to_path_buf(), reason };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| malformed(e.to_string()))?;
        let extra = meta.metadata().clone().unwrap_or_default();
        let kind = extra.get("kind").cloned().ok_or_else(|| malformed("no `kind` in metadata".into()))?;
        let step = extra
            .get("step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed("no valid `step` in metadata".into()))?;
        let tensors =
            candle::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| malformed(e.to_string()))?;
        let (mut buffers, mut quantized) = (BTreeMap::new(), BTreeMap::new());
        for (name, t) in tensors {
            if t.dtype() == candle::DType::U8 {
                quantized.insert(name, t.flatten_all()?.to_vec1::<u8>()?);
            } else {
                buffers.insert(name, t.to_dtype(candle::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(Self { kind, step, buffers, quantized })
    }

    /// Takes buffer `name` of length `len` out of a lookup, or names what is wrong.
    pub(crate) fn buffer(&self, name: &str, len: usize) -> Result<&[f32]> {
        match self.buffers.get(name) {
            Some(data) if data.len() == len => Ok(data),
            Some(data) => Err(Error::StateMismatch {
                name: name.into(),
                expected: format!("{len} values"),
                found: format!("{} values", data.len()),
            }),
            None => Err(Error::StateMismatch {
                name: name.into(),
                expected: format!("{len} values"),
                found: "nothing".into(),
            }),
        }
    }

    /// Takes byte buffer `name` of length `len`, or names what is wrong.
    pub(crate) fn bytes(&self, name: &str, len: usize) -> Result<&[u8]> {
        match self.quantized.get(name) {
            Some(data) if data.len() == len => Ok(data),
            Some(data) => Err(Error::StateMismatch {
                name: name.into(),
                expected: format!("{len} bytes"),
                found: format!("{} bytes", data.len()),
            }),
            None => Err(Error::StateMismatch {
                name: name.into(),
                expected: format!("{len} bytes"),
                found: "nothing".into(),
            }),
        }
    }

    pub(crate) fn check_kind(&self, kind: &str) -> Result<()> {
        if self.kind == kind {
            Ok(())
        } else {
            Err(Error::StateMismatch {
                name: "optimizer".into(),
                expected: kind.into(),
                found: self.kind.clone(),
            })
        }
    }
}

pub(crate) fn check_len(index: usize, expected: usize, param: &[f32], grad: &[f32]) -> Result<()> {
    if param.len() != expected || grad.len() != expected {
        return Err(Error::StateMismatch {
            name: format!("parameter {index}"),
            expected: format!("{expected} values"),
            found: format!("parameter of {} and gradient of {}", param.len(), grad.len()),
        });
    }
    Ok(())
}
