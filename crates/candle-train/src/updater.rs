//! Where gradients and optimizer state live: the [`Updater`] trait the Trainer talks to, and
//! [`LocalUpdater`], its implementation for one device. (candle-shard implements it for N
//! ranks.)

use std::collections::{BTreeMap, HashMap};

use candle::{DType, TensorId};
use candle_ckpt::SegmentGradients;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::host::{to_f32_vec, update_f32_in_place, with_f32_values, write_f32_values};
use crate::loss_scale::unscale_slice;
use crate::offload::Offload;
use crate::optim::{Optimizer, OptimizerConfig, OptimizerState};
use crate::params::{Parameter, Parameters};

/// What one optimizer step saw and did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The global L2 norm of the accumulated gradient, before clipping (inf or NaN when a
    /// gradient was not finite).
    pub grad_norm: f64,
    /// Whether the optimizer stepped (false when a gradient was inf or NaN).
    pub stepped: bool,
    /// The factor gradients were multiplied by to clip them (1 when not clipped).
    pub clip_coef: f64,
}

/// Bytes of model state other than the parameters themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateBytes {
    /// Gradient accumulators.
    pub gradients: usize,
    /// FP32 master weights.
    pub master_weights: usize,
    /// Optimizer state.
    pub optimizer_state: usize,
}

/// What an [`Updater`] holds between steps besides the parameters: FP32 master weights (by
/// parameter name, only for parameters kept in a half type) and the optimizer state. The
/// gradient accumulators are zero between steps and are not part of it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdaterState {
    /// FP32 master weights by parameter name.
    pub master_weights: BTreeMap<String, Vec<f32>>,
    /// The optimizer's state.
    pub optimizer: OptimizerState,
}

/// Accumulates gradients and steps the optimizer, wherever the state lives.
pub trait Updater {
    /// Adds one segment's gradients (from the engine's hook) into the FP32 accumulators.
    ///
    /// # Errors
    /// When a gradient belongs to no known parameter, or on a device error.
    fn accumulate(&mut self, gradients: &SegmentGradients) -> Result<()>;

    /// After the last micro-batch: computes the global gradient norm, skips the step if it is
    /// not finite, clips to `max_grad_norm`, steps the optimizer with `lr`, writes the new
    /// values into the parameters, and zeroes the accumulators.
    ///
    /// # Errors
    /// On an optimizer or device error.
    fn step(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<StepReport>;

    /// Multiplies every accumulated FP32 gradient by `inv_scale` (a loss scaler's reciprocal)
    /// and returns whether any element is inf or NaN. On N ranks, the answer is the same on
    /// every rank.
    ///
    /// # Errors
    /// On a communication or device error.
    fn unscale(&mut self, inv_scale: f32) -> Result<bool>;

    /// Zeroes the gradient accumulators.
    fn zero_grad(&mut self);

    /// The optimizer.
    fn optimizer(&self) -> &dyn Optimizer;

    /// The optimizer, mutably (to load state).
    fn optimizer_mut(&mut self) -> &mut dyn Optimizer;

    /// Bytes held besides the parameters.
    fn state_bytes(&self) -> StateBytes;

    /// The number of data-parallel ranks this updater's state is spread over (1 for one
    /// device). A checkpoint records it.
    fn world_size(&self) -> usize {
        1
    }

    /// The state to checkpoint between steps.
    ///
    /// # Errors
    /// When this updater cannot export its state (the default: a sharded updater without
    /// checkpoint support says so).
    fn save_state(&self) -> Result<UpdaterState> {
        Err(Error::config("checkpoint", "this updater cannot save its state"))
    }

    /// Restores state saved by [`Updater::save_state`]. Everything is checked before anything
    /// changes: on error the updater is as it was.
    ///
    /// # Errors
    /// [`Error::StateMismatch`] naming the first missing or misshapen buffer, or when this
    /// updater cannot load state (the default).
    fn load_state(&mut self, state: UpdaterState) -> Result<()> {
        let _ = state;
        Err(Error::config("checkpoint", "this updater cannot load saved state"))
    }

    /// Whether this updater writes sharded checkpoints (one file per rank, through
    /// [`Updater::save_sharded`]) instead of [`crate::checkpoint::save`]'s whole state. By
    /// default, false.
    fn sharded_checkpoints(&self) -> bool {
        false
    }

    /// Writes a sharded checkpoint of `params` and this updater's state at `progress` into
    /// `run_dir` (every rank calls it: it communicates), keeping the newest `keep`; returns
    /// its directory.
    ///
    /// # Errors
    /// An I/O or communication error (on any rank: every rank fails alike and the partial
    /// checkpoint is removed), or when this updater does not write sharded checkpoints (the
    /// default).
    fn save_sharded(
        &mut self,
        run_dir: &std::path::Path,
        keep: usize,
        params: &Parameters,
        progress: crate::checkpoint::Progress,
        run: crate::checkpoint::RunIdentity,
    ) -> Result<std::path::PathBuf> {
        let _ = (run_dir, keep, params, progress, run);
        Err(Error::config("checkpoint", "this updater does not write sharded checkpoints"))
    }

    /// Restores `params` and this updater's state from the sharded checkpoint `checkpoint`
    /// (written on any number of ranks; its manifest is checked, its parameter list matches
    /// `params`). Everything is read and checked before anything changes.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] or [`Error::StateMismatch`] naming the problem, or when this
    /// updater does not read sharded checkpoints (the default).
    fn restore_sharded(
        &mut self,
        checkpoint: &crate::checkpoint::Checkpoint,
        params: &Parameters,
    ) -> Result<()> {
        let _ = (checkpoint, params);
        Err(Error::config("checkpoint", "this updater does not read sharded checkpoints"))
    }

    /// The sum of `value` over the data-parallel ranks, the same on every rank (the value
    /// itself on one device). The Trainer reports the loss of the whole global batch with it.
    ///
    /// # Errors
    /// On a communication error.
    fn sum_over_ranks(&mut self, value: f64) -> Result<f64> {
        Ok(value)
    }
}

/// The single-device [`Updater`]: FP32 gradient accumulators, FP32 master weights for
/// parameters held in a half type (none for FP32 parameters: they are the FP32 state), and
/// the optimizer over host slices.
pub struct LocalUpdater {
    params: Vec<Parameter>,
    index: HashMap<TensorId, usize>,
    decay: Vec<bool>,
    grads: Vec<Vec<f32>>,
    master: Vec<Option<Vec<f32>>>,
    optimizer: Box<dyn Optimizer>,
    offload: Option<Offload>,
}

impl std::fmt::Debug for LocalUpdater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalUpdater")
            .field("params", &self.params.len())
            .field("optimizer", &self.optimizer.name())
            .field("offload", &self.offload.is_some())
            .finish()
    }
}

impl LocalUpdater {
    /// An updater for `params`, stepping them with `optimizer` (built for their sizes, in
    /// order). Weight decay applies to parameters of two or more dimensions.
    ///
    /// # Errors
    /// On a device error reading the initial values of half-precision parameters.
    pub fn new(params: &Parameters, optimizer: Box<dyn Optimizer>) -> Result<Self> {
        let params: Vec<Parameter> = params.iter().cloned().collect();
        let index = params.iter().enumerate().map(|(i, p)| (p.var.as_tensor().id(), i)).collect();
        let decay = params.iter().map(|p| p.var.rank() >= 2).collect();
        let grads = params.iter().map(|p| vec![0.0; p.var.elem_count()]).collect();
        let master =
            params
                .iter()
                .map(|p| {
                    if p.var.dtype() == DType::F32 {
                        Ok(None)
                    } else {
                        to_f32_vec(p.var.as_tensor()).map(Some)
                    }
                })
                .collect::<Result<_>>()?;
        Ok(Self { params, index, decay, grads, master, optimizer, offload: None })
    }

    /// Offloads the optimizer (`--offload-optimizer`): the step runs on the host's cores with
    /// rayon, and on a GPU the FP32 parameters get host-resident copies and every transfer goes
    /// through pinned buffers (see [`crate::offload`]). Parameters end bit-identical to the
    /// step without offloading.
    ///
    /// Between steps, the host copies of a GPU model's F32 parameters are authoritative: after
    /// writing such parameters by other means than a checkpoint restore, call
    /// [`LocalUpdater::reload_parameters`].
    pub fn offloaded(mut self) -> Self {
        self.offload = Some(Offload::new(self.params.len()));
        self
    }

    /// Whether the optimizer is offloaded.
    pub fn is_offloaded(&self) -> bool {
        self.offload.is_some()
    }

    /// Makes an offloaded updater read the parameters from the model again at the next step
    /// (nothing to do otherwise).
    pub fn reload_parameters(&mut self) {
        if let Some(offload) = &mut self.offload {
            offload.invalidate();
        }
    }

    /// An updater for `params` with an optimizer built from `optimizer` for their sizes.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bad optimizer hyper-parameters, or as [`LocalUpdater::new`].
    pub fn from_config(params: &Parameters, optimizer: &OptimizerConfig) -> Result<Self> {
        let sizes: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
        Self::new(params, optimizer.build(&sizes)?)
    }

    /// The accumulated FP32 gradient of parameter `name`.
    pub fn gradient(&self, name: &str) -> Option<&[f32]> {
        self.params.iter().position(|p| p.name == name).map(|i| self.grads[i].as_slice())
    }
}

impl Updater for LocalUpdater {
    fn accumulate(&mut self, gradients: &SegmentGradients) -> Result<()> {
        for g in &gradients.gradients {
            let Some(&i) = self.index.get(&g.var.as_tensor().id()) else {
                return Err(Error::StateMismatch {
                    name: g.name.clone(),
                    expected: "a parameter known to the updater".into(),
                    found: "an unknown variable".into(),
                });
            };
            let acc = &mut self.grads[i];
            match &mut self.offload {
                Some(offload) => offload.accumulate(i, &g.grad, acc)?,
                None => with_f32_values(&g.grad, |values| {
                    acc.iter_mut().zip(values).for_each(|(a, &v)| *a += v);
                })?,
            }
        }
        Ok(())
    }

    fn step(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<StepReport> {
        let sum_sq: f64 = self.grads.iter().flatten().map(|&g| (g as f64) * (g as f64)).sum();
        let grad_norm = sum_sq.sqrt();
        if !grad_norm.is_finite() {
            self.zero_grad();
            return Ok(StepReport { grad_norm, stepped: false, clip_coef: 1.0 });
        }
        let mut clip_coef = 1.0;
        if let Some(max_norm) = max_grad_norm {
            let coef = max_norm / (grad_norm + 1e-6);
            if coef < 1.0 {
                clip_coef = coef;
                let c = coef as f32;
                self.grads.iter_mut().flatten().for_each(|g| *g *= c);
            }
        }
        self.optimizer.begin_step();
        for (i, p) in self.params.iter().enumerate() {
            let (grad, decay) = (&self.grads[i], self.decay[i]);
            let optimizer = &mut self.optimizer;
            match (&mut self.master[i], &mut self.offload) {
                (Some(master), None) => {
                    optimizer.update(i, master, grad, lr, decay)?;
                    write_f32_values(&p.var, master)?;
                }
                (Some(master), Some(offload)) => {
                    optimizer.update_parallel(i, master, grad, lr, decay)?;
                    offload.write_back(i, &p.var, master)?;
                }
                (None, Some(offload)) if !p.var.device().is_cpu() => {
                    offload.update_resident(i, &p.var, |values| {
                        optimizer.update_parallel(i, values, grad, lr, decay)
                    })?;
                }
                (None, offload) => {
                    let parallel = offload.is_some();
                    let mut outcome = Ok(());
                    update_f32_in_place(&p.var, |values| {
                        outcome = if parallel {
                            optimizer.update_parallel(i, values, grad, lr, decay)
                        } else {
                            optimizer.update(i, values, grad, lr, decay)
                        }
                    })?;
                    outcome?;
                }
            }
        }
        self.zero_grad();
        Ok(StepReport { grad_norm, stepped: true, clip_coef })
    }

    fn unscale(&mut self, inv_scale: f32) -> Result<bool> {
        let mut found_inf = false;
        for g in &mut self.grads {
            found_inf |= unscale_slice(g, inv_scale);
        }
        Ok(found_inf)
    }

    fn zero_grad(&mut self) {
        self.grads.iter_mut().for_each(|g| g.fill(0.0));
    }

    fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        self.optimizer.as_mut()
    }

    fn save_state(&self) -> Result<UpdaterState> {
        let master_weights = self
            .params
            .iter()
            .zip(&self.master)
            .filter_map(|(p, m)| m.as_ref().map(|m| (p.name.clone(), m.clone())))
            .collect();
        Ok(UpdaterState { master_weights, optimizer: self.optimizer.state() })
    }

    fn load_state(&mut self, state: UpdaterState) -> Result<()> {
        let UpdaterState { mut master_weights, optimizer } = state;
        let mut restored = Vec::with_capacity(self.params.len());
        for (p, current) in self.params.iter().zip(&self.master) {
            match (current, master_weights.remove(&p.name)) {
                (Some(current), Some(saved)) if saved.len() == current.len() => restored.push(Some(saved)),
                (Some(current), saved) => {
                    return Err(Error::StateMismatch {
                        name: format!("master weights of {}", p.name),
                        expected: format!("{} FP32 values", current.len()),
                        found: saved.map_or("nothing".into(), |s| format!("{} values", s.len())),
                    })
                }
                (None, Some(_)) => {
                    return Err(Error::StateMismatch {
                        name: format!("master weights of {}", p.name),
                        expected: format!("none ({} is an FP32 parameter)", p.name),
                        found: "FP32 master weights".into(),
                    })
                }
                (None, None) => restored.push(None),
            }
        }
        if let Some(name) = master_weights.keys().next() {
            return Err(Error::StateMismatch {
                name: format!("master weights of {name}"),
                expected: "a parameter of this model".into(),
                found: "an unknown name".into(),
            });
        }
        // The optimizer checks its own state and changes nothing on error.
        self.optimizer.load_state(&optimizer)?;
        self.master = restored;
        // The checkpoint writes the parameters next: read them again at the next step.
        self.reload_parameters();
        self.zero_grad();
        Ok(())
    }

    fn state_bytes(&self) -> StateBytes {
        StateBytes {
            gradients: self.grads.iter().map(|g| g.len() * 4).sum(),
            // An offloaded updater's host copies of device parameters (and, on CUDA, its pinned
            // staging buffers) are counted with the master weights.
            master_weights: self.master.iter().flatten().map(|m| m.len() * 4).sum::<usize>()
                + self.offload.as_ref().map_or(0, Offload::bytes),
            optimizer_state: self.optimizer.state_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Tensor};
    use candle_ckpt::{ParameterGradient, SegmentGradients};

    use super::*;
    use crate::optim::{OptimizerConfig, SgdConfig};
    use crate::params::ParamBuilder;

    fn setup(dtype: DType) -> Result<(Parameters, LocalUpdater)> {
        let mut pb = ParamBuilder::new(dtype, Device::Cpu, 0);
        pb.constant("w", (2, 2), 1.0)?;
        pb.constant("b", 2, 0.5)?;
        let params = pb.finish();
        let sgd = SgdConfig { momentum: 0.0, ..Default::default() };
        let updater = LocalUpdater::new(&params, OptimizerConfig::Sgd(sgd).build(&[4, 2])?)?;
        Ok((params, updater))
    }

    fn grads(params: &Parameters, w: &[f32], b: &[f32]) -> Result<SegmentGradients> {
        let entry = |name: &str, values: &[f32]| -> Result<ParameterGradient> {
            let p = params.get(name).ok_or_else(|| Error::config("test", "missing"))?;
            let grad = Tensor::from_slice(values, p.var.shape(), &Device::Cpu)?.to_dtype(p.var.dtype())?;
            Ok(ParameterGradient { name: name.into(), var: p.var.clone(), grad, is_final: true })
        };
        Ok(SegmentGradients { segment: 0, gradients: vec![entry("w", w)?, entry("b", b)?] })
    }

    fn values(params: &Parameters, name: &str) -> Result<Vec<f32>> {
        to_f32_vec(params.get(name).ok_or_else(|| Error::config("test", "missing"))?.var.as_tensor())
    }

    #[test]
    fn gradients_accumulate_and_the_global_norm_clips_them() -> Result<()> {
        let (params, mut updater) = setup(DType::F32)?;
        updater.accumulate(&grads(&params, &[1.0, 0.0, 0.0, 0.0], &[0.0, 1.0])?)?;
        updater.accumulate(&grads(&params, &[2.0, 0.0, 0.0, 0.0], &[0.0, 3.0])?)?;
        assert_eq!(updater.gradient("w"), Some(&[3.0, 0.0, 0.0, 0.0][..]));
        // Global norm sqrt(3² + 4²) = 5, clipped to 1: gradients scale by 1 / (5 + 1e-6).
        let report = updater.step(0.1, Some(1.0))?;
        assert!((report.grad_norm - 5.0).abs() < 1e-12);
        assert!((report.clip_coef - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        let w = values(&params, "w")?;
        assert!((w[0] - (1.0 - 0.1 * 3.0 / 5.0)).abs() < 1e-6, "{w:?}");
        assert_eq!(&w[1..], &[1.0, 1.0, 1.0]);
        assert_eq!(updater.gradient("w"), Some(&[0.0; 4][..]), "accumulators are zeroed after a step");
        Ok(())
    }

    #[test]
    fn a_non_finite_gradient_skips_the_step_and_never_reaches_the_weights() -> Result<()> {
        for bad in [f32::INFINITY, f32::NAN] {
            let (params, mut updater) = setup(DType::F32)?;
            updater.accumulate(&grads(&params, &[1.0, bad, 0.0, 0.0], &[0.0, 1.0])?)?;
            let report = updater.step(0.1, None)?;
            assert!(!report.stepped);
            assert_eq!(updater.optimizer().step_count(), 0);
            assert_eq!(values(&params, "w")?, vec![1.0; 4]);
            assert_eq!(values(&params, "b")?, vec![0.5; 2]);
        }
        Ok(())
    }

    #[test]
    fn half_precision_parameters_step_on_fp32_master_weights() -> Result<()> {
        let (params, mut updater) = setup(DType::BF16)?;
        assert_eq!(updater.state_bytes().master_weights, 6 * 4);
        // 1e-3 steps are below bf16's resolution at 1.0 (2^-7), but accumulate in the master.
        for _ in 0..8 {
            updater.accumulate(&grads(&params, &[1.0, 0.0, 0.0, 0.0], &[0.0, 0.0])?)?;
            updater.step(1e-3, None)?;
        }
        let w = values(&params, "w")?;
        assert_eq!(params.get("w").map(|p| p.var.dtype()), Some(DType::BF16));
        assert!((w[0] - 0.9921875).abs() < 1e-7, "{w:?}: 1 - 8e-3 rounded to bf16");
        Ok(())
    }
}
