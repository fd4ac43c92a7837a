//! Where gradients and optimizer state live: the [`Updater`] trait the Trainer talks to, and
//! [`LocalUpdater`], its implementation for one device. (candle-shard implements it for N
//! ranks.)

use std::collections::{BTreeMap, HashMap};

use candle::{DType, Tensor, TensorId, Var};
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

/// Bytes moved between the host and an accelerator, by cause (both directions together).
///
/// On the CPU device nothing moves: every field is zero by construction. With state on the
/// device ([`LocalUpdater`]'s default off CPU) a step reads back only scalars (found-inf and
/// the gradient norm); an optimizer kept on the host (offloaded, or 8-bit AdamW) moves every
/// gradient down and every parameter up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfers {
    /// Gradients copied to the host.
    pub gradients: u64,
    /// Parameters read to or written from the host.
    pub parameters: u64,
    /// Master weights and optimizer state copied either way (checkpoints, offload).
    pub state: u64,
    /// Bytes staged through the host for collectives.
    pub collectives: u64,
    /// Scalars read back (found-inf, gradient norm, loss).
    pub scalars: u64,
}

impl Transfers {
    /// All bytes moved.
    pub fn total(&self) -> u64 {
        self.gradients + self.parameters + self.state + self.collectives + self.scalars
    }

    /// Adds `other` into these counts.
    pub fn add(&mut self, other: &Transfers) {
        self.gradients += other.gradients;
        self.parameters += other.parameters;
        self.state += other.state;
        self.collectives += other.collectives;
        self.scalars += other.scalars;
    }
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

    /// The bytes moved between the host and the device since the last call, by cause (zero on
    /// the CPU device and for an updater that does not count). The Trainer takes them once per
    /// step.
    fn take_transfers(&mut self) -> Transfers {
        Transfers::default()
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

/// The single-device [`Updater`]. Where its state lives follows its optimizer
/// ([`crate::optim::Optimizer::device`]):
///
/// - **on the parameters' device** (a device-resident optimizer; what
///   [`LocalUpdater::from_config`] builds for parameters off the CPU): FP32 gradient
///   accumulators, FP32 master weights for half-precision parameters and the optimizer state
///   are tensors there; found-inf and the gradient norm are device reductions of which only
///   the scalar result is read back.
/// - **on the host** (a host optimizer: the CPU's flat-slice fast path, an offloaded optimizer,
///   8-bit AdamW): FP32 accumulators and master weights in host vectors, the optimizer over
///   host slices; on a GPU every micro-batch's gradients come down and every step's parameters
///   go up, which [`Updater::take_transfers`] counts.
pub struct LocalUpdater {
    params: Vec<Parameter>,
    index: HashMap<TensorId, usize>,
    decay: Vec<bool>,
    store: Store,
    transfers: Transfers,
}

enum Store {
    Host(HostStore),
    Device(DeviceStore),
}

struct HostStore {
    grads: Vec<Vec<f32>>,
    master: Vec<Option<Vec<f32>>>,
    optimizer: Box<dyn Optimizer>,
    offload: Option<Offload>,
}

struct DeviceStore {
    /// FP32 accumulators, allocated by the first gradient of a step (that gradient itself when
    /// it is already F32) and released by `zero_grad`.
    grads: Vec<Option<Tensor>>,
    master: Vec<Option<Tensor>>,
    optimizer: Box<dyn Optimizer>,
}

impl std::fmt::Debug for LocalUpdater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalUpdater")
            .field("params", &self.params.len())
            .field("optimizer", &self.optimizer().name())
            .field("state", &if self.is_device_resident() { "device" } else { "host" })
            .field("offload", &self.is_offloaded())
            .finish()
    }
}

/// The factor that clips gradients of global norm `grad_norm` to `max_grad_norm`, as torch's
/// `clip_grad_norm_` (`max / (norm + 1e-6)`), or `None` when no clipping applies (no maximum,
/// or a factor of 1 or more). Every updater clips with it.
pub fn clip_factor(grad_norm: f64, max_grad_norm: Option<f64>) -> Option<f64> {
    let coef = max_grad_norm? / (grad_norm + 1e-6);
    (coef < 1.0).then_some(coef)
}

/// The sum of the squares of a tensor's elements in FP64, as a scalar tensor on its device:
/// on CUDA one fused pass; elsewhere over chunks of 4 Mi elements, so the FP64 temporary stays
/// small.
///
/// # Errors
/// A device error.
pub fn sum_of_squares_f64(t: &Tensor) -> candle::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() && t.dtype() == DType::F32 {
        // One pass reading 4 bytes per element (the chunked path below reads 20).
        return crate::optim::fused_cuda::sum_of_squares_f64(t);
    }
    const CHUNK: usize = 1 << 22;
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let mut total = Tensor::zeros((), DType::F64, t.device())?;
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        total = (total + flat.narrow(0, start, len)?.to_dtype(DType::F64)?.sqr()?.sum_all()?)?;
        start += len;
    }
    Ok(total)
}

/// The sum over `tensors` of `f(t)` (a scalar tensor each) in FP64, on their device (`None`
/// for no tensors): one value to read back for a global norm or an inf/NaN probe.
///
/// # Errors
/// A device error.
pub fn sum_scalars_f64<'a>(
    tensors: impl IntoIterator<Item = &'a Tensor>,
    f: impl Fn(&Tensor) -> candle::Result<Tensor>,
) -> candle::Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for t in tensors {
        let part = f(t)?.to_dtype(DType::F64)?;
        total = Some(match total {
            Some(sum) => (sum + part)?,
            None => part,
        });
    }
    Ok(total)
}

/// Reads a device scalar (0 for none) back, counting its bytes in `transfers` off the CPU.
///
/// # Errors
/// A device error.
pub fn read_scalar(t: Option<&Tensor>, transfers: &mut Transfers) -> Result<f64> {
    let Some(t) = t else { return Ok(0.0) };
    if !t.device().is_cpu() {
        transfers.scalars += bytes_of(t);
    }
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn bytes_of(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

fn f32_bytes(len: usize) -> u64 {
    len as u64 * 4
}

impl LocalUpdater {
    /// An updater for `params`, stepping them with `optimizer` (built for their sizes, in
    /// order). Weight decay applies to parameters of two or more dimensions. A
    /// device-resident optimizer keeps the whole state on its device (the parameters must be
    /// there); a host optimizer keeps it in host memory.
    ///
    /// # Errors
    /// Parameters off a device-resident optimizer's device; a device error reading the
    /// initial values of half-precision parameters.
    pub fn new(params: &Parameters, optimizer: Box<dyn Optimizer>) -> Result<Self> {
        let params: Vec<Parameter> = params.iter().cloned().collect();
        let index = params.iter().enumerate().map(|(i, p)| (p.id(), i)).collect();
        let decay = params.iter().map(|p| p.rank() >= 2).collect();
        let mut transfers = Transfers::default();
        let store = match optimizer.device() {
            Some(device) => {
                if let Some(p) = params.iter().find(|p| !p.device().same_device(&device)) {
                    return Err(Error::config(
                        "optimizer",
                        format!(
                            "the optimizer keeps its state on {:?} but parameter {} is on {:?}",
                            device.location(),
                            p.name,
                            p.device().location()
                        ),
                    ));
                }
                let master = params
                    .iter()
                    .map(|p| match p.dtype() {
                        DType::F32 => Ok(None),
                        _ => Ok(Some(p.var()?.as_tensor().detach().to_dtype(DType::F32)?)),
                    })
                    .collect::<Result<_>>()?;
                Store::Device(DeviceStore { grads: vec![None; params.len()], master, optimizer })
            }
            None => {
                let grads = params.iter().map(|p| vec![0.0; p.elem_count()]).collect();
                let master = params
                    .iter()
                    .map(|p| {
                        if p.dtype() == DType::F32 {
                            Ok(None)
                        } else {
                            if !p.device().is_cpu() {
                                transfers.parameters += bytes_of(p.var()?.as_tensor());
                            }
                            to_f32_vec(p.var()?.as_tensor()).map(Some)
                        }
                    })
                    .collect::<Result<_>>()?;
                Store::Host(HostStore { grads, master, optimizer, offload: None })
            }
        };
        Ok(Self { params, index, decay, store, transfers })
    }

    /// Offloads the optimizer (`--offload-optimizer`): master weights, accumulators and
    /// optimizer state move to host memory (a device-resident optimizer is rebuilt on the host
    /// from its configuration, its state carried over) and the step runs on the host's cores
    /// with rayon; on a GPU the FP32 parameters get host-resident copies and every transfer
    /// goes through pinned buffers (see [`crate::offload`]). Parameters end bit-identical to
    /// the host step without offloading.
    ///
    /// Between steps, the host copies of a GPU model's F32 parameters are authoritative: after
    /// writing such parameters by other means than a checkpoint restore, call
    /// [`LocalUpdater::reload_parameters`].
    ///
    /// # Errors
    /// A device-resident optimizer that cannot say its configuration (not one of ours), or a
    /// device error copying its state to the host.
    pub fn offloaded(mut self) -> Result<Self> {
        if let Store::Device(store) = &self.store {
            let Some(config) = store.optimizer.config() else {
                return Err(Error::config(
                    "offload",
                    format!(
                        "optimizer `{}` keeps its state on a device and cannot be rebuilt on the host",
                        store.optimizer.name()
                    ),
                ));
            };
            let sizes: Vec<usize> = self.params.iter().map(|p| p.elem_count()).collect();
            let mut optimizer = config.build(&sizes)?;
            let state = store.optimizer.state()?;
            self.transfers.state += state.buffers.values().map(|b| f32_bytes(b.len())).sum::<u64>();
            optimizer.load_state(&state)?;
            let master = store
                .master
                .iter()
                .map(|m| m.as_ref().map(to_f32_vec).transpose())
                .collect::<Result<Vec<_>>>()?;
            self.transfers.state += master.iter().flatten().map(|m| f32_bytes(m.len())).sum::<u64>();
            let grads = self.params.iter().map(|p| vec![0.0; p.elem_count()]).collect();
            self.store = Store::Host(HostStore { grads, master, optimizer, offload: None });
        }
        if let Store::Host(store) = &mut self.store {
            store.offload = Some(Offload::new(self.params.len()));
        }
        Ok(self)
    }

    /// Whether the optimizer is offloaded.
    pub fn is_offloaded(&self) -> bool {
        matches!(&self.store, Store::Host(HostStore { offload: Some(_), .. }))
    }

    /// Whether gradients, master weights and optimizer state live on the parameters' device
    /// (as tensors) rather than in host memory.
    pub fn is_device_resident(&self) -> bool {
        matches!(self.store, Store::Device(_))
    }

    /// Makes an offloaded updater read the parameters from the model again at the next step
    /// (nothing to do otherwise).
    pub fn reload_parameters(&mut self) {
        if let Store::Host(HostStore { offload: Some(offload), .. }) = &mut self.store {
            offload.invalidate();
        }
    }

    /// An updater for `params` with an optimizer built from `optimizer` where they live
    /// ([`OptimizerConfig::build_for`]): state in host memory for CPU parameters, on the
    /// device for GPU parameters (8-bit AdamW excepted).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bad optimizer hyper-parameters, or as [`LocalUpdater::new`].
    pub fn from_config(params: &Parameters, optimizer: &OptimizerConfig) -> Result<Self> {
        let tensors = params.iter().map(|p| p.var().map(Var::as_tensor)).collect::<Result<Vec<_>>>()?;
        Self::new(params, optimizer.build_for(&tensors)?)
    }

    /// An updater whose state lives on the parameters' device whatever it is, through
    /// [`OptimizerConfig::build_on_device`] (on the CPU: the tensor-op optimizers, which the
    /// tests compare with the flat-slice path).
    ///
    /// # Errors
    /// As [`OptimizerConfig::build_on_device`] and [`LocalUpdater::new`].
    pub fn on_device(params: &Parameters, optimizer: &OptimizerConfig) -> Result<Self> {
        let tensors = params.iter().map(|p| p.var().map(Var::as_tensor)).collect::<Result<Vec<_>>>()?;
        Self::new(params, optimizer.build_on_device(&tensors)?)
    }

    /// The accumulated FP32 gradient of parameter `name` (copied to the host), `None` for an
    /// unknown name.
    ///
    /// # Errors
    /// A device error reading it back.
    pub fn gradient(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(i) = self.params.iter().position(|p| p.name == name) else { return Ok(None) };
        match &self.store {
            Store::Host(store) => Ok(Some(store.grads[i].clone())),
            Store::Device(store) => match &store.grads[i] {
                Some(g) => Ok(Some(to_f32_vec(g)?)),
                None => Ok(Some(vec![0.0; self.params[i].elem_count()])),
            },
        }
    }

    fn position(&self, g: &candle_ckpt::ParameterGradient) -> Result<usize> {
        self.index.get(&g.id).copied().ok_or_else(|| Error::StateMismatch {
            name: g.name.clone(),
            expected: "a parameter known to the updater".into(),
            found: "an unknown variable".into(),
        })
    }

    fn device_sum(&mut self, f: impl Fn(&Tensor) -> candle::Result<Tensor>) -> Result<f64> {
        let Store::Device(store) = &self.store else { return Ok(0.0) };
        let total = sum_scalars_f64(store.grads.iter().flatten(), f)?;
        read_scalar(total.as_ref(), &mut self.transfers)
    }

    fn step_device(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<StepReport> {
        // Squares summed in FP64 on the device, as the host store sums them: the norm and the
        // clipping factor do not depend on how the elements are split or ordered.
        let grad_norm = self.device_sum(sum_of_squares_f64)?.sqrt();
        if !grad_norm.is_finite() {
            self.zero_grad();
            return Ok(StepReport { grad_norm, stepped: false, clip_coef: 1.0 });
        }
        let Store::Device(store) = &mut self.store else { unreachable!("step_device on a host store") };
        let clip = clip_factor(grad_norm, max_grad_norm);
        if let Some(coef) = clip {
            let c = f64::from(coef as f32);
            for g in store.grads.iter_mut().flatten() {
                *g = g.affine(c, 0.0)?;
            }
        }
        let clip_coef = clip.unwrap_or(1.0);
        store.optimizer.begin_step();
        for (i, p) in self.params.iter().enumerate() {
            let grad = match &store.grads[i] {
                Some(g) => g.clone(),
                // A parameter no segment sent a gradient to steps on zeros, as on the host.
                None => Tensor::zeros(p.shape(), DType::F32, p.device())?,
            };
            let decay = self.decay[i];
            match &store.master[i] {
                Some(master) => {
                    let new = store.optimizer.update_master(i, master, &grad, p.var()?, lr, decay)?;
                    if let Some(new) = new {
                        store.master[i] = Some(new);
                    }
                }
                None => {
                    // The variable's storage without its gradient tracking: a fused kernel
                    // updates it in place, the tensor-op path returns new values.
                    let param = p.var()?.as_tensor().detach();
                    if let Some(new) = store.optimizer.update_tensor(i, &param, &grad, lr, decay)? {
                        p.var()?.set(&new)?;
                    }
                }
            }
        }
        self.zero_grad();
        Ok(StepReport { grad_norm, stepped: true, clip_coef })
    }

    fn step_host(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<StepReport> {
        let Store::Host(store) = &mut self.store else { unreachable!("step_host on a device store") };
        let sum_sq: f64 = store.grads.iter().flatten().map(|&g| (g as f64) * (g as f64)).sum();
        let grad_norm = sum_sq.sqrt();
        if !grad_norm.is_finite() {
            self.zero_grad();
            return Ok(StepReport { grad_norm, stepped: false, clip_coef: 1.0 });
        }
        let clip = clip_factor(grad_norm, max_grad_norm);
        if let Some(coef) = clip {
            let c = coef as f32;
            store.grads.iter_mut().flatten().for_each(|g| *g *= c);
        }
        let clip_coef = clip.unwrap_or(1.0);
        store.optimizer.begin_step();
        let transfers = &mut self.transfers;
        for (i, p) in self.params.iter().enumerate() {
            let (grad, decay) = (&store.grads[i], self.decay[i]);
            let optimizer = &mut store.optimizer;
            let on_host = p.device().is_cpu();
            match (&mut store.master[i], &mut store.offload) {
                (Some(master), None) => {
                    optimizer.update(i, master, grad, lr, decay)?;
                    write_f32_values(p.var()?, master)?;
                    if !on_host {
                        transfers.parameters += bytes_of(p.var()?.as_tensor());
                    }
                }
                (Some(master), Some(offload)) => {
                    optimizer.update_parallel(i, master, grad, lr, decay)?;
                    offload.write_back(i, p.var()?, master)?;
                    if !on_host {
                        transfers.parameters += f32_bytes(master.len());
                    }
                }
                (None, Some(offload)) if !on_host => {
                    transfers.parameters += offload.update_resident(i, p.var()?, |values| {
                        optimizer.update_parallel(i, values, grad, lr, decay)
                    })?;
                }
                (None, offload) => {
                    let parallel = offload.is_some();
                    let mut outcome = Ok(());
                    update_f32_in_place(p.var()?, |values| {
                        outcome = if parallel {
                            optimizer.update_parallel(i, values, grad, lr, decay)
                        } else {
                            optimizer.update(i, values, grad, lr, decay)
                        }
                    })?;
                    outcome?;
                    if !on_host {
                        // Read down, written back up.
                        transfers.parameters += 2 * f32_bytes(grad.len());
                    }
                }
            }
        }
        self.zero_grad();
        Ok(StepReport { grad_norm, stepped: true, clip_coef })
    }
}

impl Updater for LocalUpdater {
    fn accumulate(&mut self, gradients: &SegmentGradients) -> Result<()> {
        for g in &gradients.gradients {
            let i = self.position(g)?;
            match &mut self.store {
                Store::Device(store) => {
                    let grad = g.grad.to_dtype(DType::F32)?;
                    store.grads[i] = Some(match store.grads[i].take() {
                        Some(acc) => (acc + grad)?,
                        None => grad,
                    });
                }
                Store::Host(store) => {
                    let acc = &mut store.grads[i];
                    if !g.grad.device().is_cpu() {
                        self.transfers.gradients += f32_bytes(acc.len());
                    }
                    match &mut store.offload {
                        Some(offload) => offload.accumulate(i, &g.grad, acc)?,
                        None => with_f32_values(&g.grad, |values| {
                            acc.iter_mut().zip(values).for_each(|(a, &v)| *a += v);
                        })?,
                    }
                }
            }
        }
        Ok(())
    }

    fn step(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<StepReport> {
        match self.store {
            Store::Device(_) => self.step_device(lr, max_grad_norm),
            Store::Host(_) => self.step_host(lr, max_grad_norm),
        }
    }

    fn unscale(&mut self, inv_scale: f32) -> Result<bool> {
        match &mut self.store {
            Store::Host(store) => {
                let mut found_inf = false;
                for g in &mut store.grads {
                    found_inf |= unscale_slice(g, inv_scale);
                }
                Ok(found_inf)
            }
            Store::Device(store) => {
                for g in store.grads.iter_mut().flatten() {
                    *g = g.affine(f64::from(inv_scale), 0.0)?;
                }
                // `x * 0` is 0 for every finite x and NaN for inf or NaN: the sum is NaN
                // exactly when some element is not finite (no overflow, unlike a sum of
                // squares).
                let probe = self.device_sum(|g| g.affine(0.0, 0.0)?.sum_all())?;
                Ok(!probe.is_finite())
            }
        }
    }

    fn zero_grad(&mut self) {
        match &mut self.store {
            Store::Host(store) => store.grads.iter_mut().for_each(|g| g.fill(0.0)),
            Store::Device(store) => store.grads.iter_mut().for_each(|g| *g = None),
        }
    }

    fn optimizer(&self) -> &dyn Optimizer {
        match &self.store {
            Store::Host(store) => store.optimizer.as_ref(),
            Store::Device(store) => store.optimizer.as_ref(),
        }
    }

    fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        match &mut self.store {
            Store::Host(store) => store.optimizer.as_mut(),
            Store::Device(store) => store.optimizer.as_mut(),
        }
    }

    fn take_transfers(&mut self) -> Transfers {
        std::mem::take(&mut self.transfers)
    }

    fn save_state(&self) -> Result<UpdaterState> {
        let masters: Vec<Option<Vec<f32>>> = match &self.store {
            Store::Host(store) => store.master.clone(),
            Store::Device(store) => {
                store.master.iter().map(|m| m.as_ref().map(to_f32_vec).transpose()).collect::<Result<_>>()?
            }
        };
        let master_weights =
            self.params.iter().zip(masters).filter_map(|(p, m)| m.map(|m| (p.name.clone(), m))).collect();
        Ok(UpdaterState { master_weights, optimizer: self.optimizer().state()? })
    }

    fn load_state(&mut self, state: UpdaterState) -> Result<()> {
        let UpdaterState { mut master_weights, optimizer } = state;
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let half = p.dtype() != DType::F32;
            let len = p.elem_count();
            match (half, master_weights.remove(&p.name)) {
                (true, Some(saved)) if saved.len() == len => restored.push(Some(saved)),
                (true, saved) => {
                    return Err(Error::StateMismatch {
                        name: format!("master weights of {}", p.name),
                        expected: format!("{len} FP32 values"),
                        found: saved.map_or("nothing".into(), |s| format!("{} values", s.len())),
                    })
                }
                (false, Some(_)) => {
                    return Err(Error::StateMismatch {
                        name: format!("master weights of {}", p.name),
                        expected: format!("none ({} is an FP32 parameter)", p.name),
                        found: "FP32 master weights".into(),
                    })
                }
                (false, None) => restored.push(None),
            }
        }
        if let Some(name) = master_weights.keys().next() {
            return Err(Error::StateMismatch {
                name: format!("master weights of {name}"),
                expected: "a parameter of this model".into(),
                found: "an unknown name".into(),
            });
        }
        match &mut self.store {
            Store::Host(store) => {
                // The optimizer checks its own state and changes nothing on error.
                store.optimizer.load_state(&optimizer)?;
                store.master = restored;
            }
            Store::Device(store) => {
                let masters = self
                    .params
                    .iter()
                    .zip(restored)
                    .map(|(p, m)| m.map(|m| Tensor::from_vec(m, p.shape(), p.device())).transpose())
                    .collect::<candle::Result<Vec<_>>>()?;
                store.optimizer.load_state(&optimizer)?;
                store.master = masters;
            }
        }
        // The checkpoint writes the parameters next: read them again at the next step.
        self.reload_parameters();
        self.zero_grad();
        Ok(())
    }

    fn state_bytes(&self) -> StateBytes {
        // Accumulators are counted at their full size (what a step holds once every
        // parameter's gradient has arrived), wherever they live.
        let gradients = self.params.iter().map(|p| p.elem_count() * 4).sum();
        match &self.store {
            Store::Host(store) => StateBytes {
                gradients,
                // An offloaded updater's host copies of device parameters (and, on CUDA, its
                // pinned staging buffers) are counted with the master weights.
                master_weights: store.master.iter().flatten().map(|m| m.len() * 4).sum::<usize>()
                    + store.offload.as_ref().map_or(0, Offload::bytes),
                optimizer_state: store.optimizer.state_bytes(),
            },
            Store::Device(store) => StateBytes {
                gradients,
                master_weights: store.master.iter().flatten().map(|m| m.elem_count() * 4).sum(),
                optimizer_state: store.optimizer.state_bytes(),
            },
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

    /// Both stores: state in host vectors (the CPU default) and state as tensors on the
    /// parameters' device (what a GPU gets; the tensor-op optimizers on the CPU).
    const STORES: [bool; 2] = [false, true];

    fn setup(dtype: DType, on_device: bool) -> Result<(Parameters, LocalUpdater)> {
        let mut pb = ParamBuilder::new(dtype, Device::Cpu, 0);
        pb.constant("w", (2, 2), 1.0)?;
        pb.constant("b", 2, 0.5)?;
        let params = pb.finish();
        let sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.0, ..Default::default() });
        let updater = if on_device {
            LocalUpdater::on_device(&params, &sgd)?
        } else {
            LocalUpdater::from_config(&params, &sgd)?
        };
        assert_eq!(updater.is_device_resident(), on_device);
        Ok((params, updater))
    }

    fn grads(params: &Parameters, w: &[f32], b: &[f32]) -> Result<SegmentGradients> {
        let entry = |name: &str, values: &[f32]| -> Result<ParameterGradient> {
            let p = params.get(name).ok_or_else(|| Error::config("test", "missing"))?;
            let grad = Tensor::from_slice(values, p.shape(), &Device::Cpu)?.to_dtype(p.dtype())?;
            Ok(ParameterGradient { name: name.into(), id: p.id(), grad, is_final: true })
        };
        Ok(SegmentGradients { segment: 0, gradients: vec![entry("w", w)?, entry("b", b)?] })
    }

    fn values(params: &Parameters, name: &str) -> Result<Vec<f32>> {
        to_f32_vec(params.get(name).ok_or_else(|| Error::config("test", "missing"))?.var()?.as_tensor())
    }

    #[test]
    fn gradients_accumulate_and_the_global_norm_clips_them() -> Result<()> {
        for on_device in STORES {
            gradients_accumulate_and_clip(on_device)?;
        }
        Ok(())
    }

    fn gradients_accumulate_and_clip(on_device: bool) -> Result<()> {
        let (params, mut updater) = setup(DType::F32, on_device)?;
        updater.accumulate(&grads(&params, &[1.0, 0.0, 0.0, 0.0], &[0.0, 1.0])?)?;
        updater.accumulate(&grads(&params, &[2.0, 0.0, 0.0, 0.0], &[0.0, 3.0])?)?;
        assert_eq!(updater.gradient("w")?, Some(vec![3.0, 0.0, 0.0, 0.0]));
        // Global norm sqrt(3² + 4²) = 5, clipped to 1: gradients scale by 1 / (5 + 1e-6).
        let report = updater.step(0.1, Some(1.0))?;
        assert!((report.grad_norm - 5.0).abs() < 1e-12);
        assert!((report.clip_coef - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        let w = values(&params, "w")?;
        assert!((w[0] - (1.0 - 0.1 * 3.0 / 5.0)).abs() < 1e-6, "{w:?}");
        assert_eq!(&w[1..], &[1.0, 1.0, 1.0]);
        assert_eq!(updater.gradient("w")?, Some(vec![0.0; 4]), "accumulators are zeroed after a step");
        Ok(())
    }

    #[test]
    fn a_non_finite_gradient_skips_the_step_and_never_reaches_the_weights() -> Result<()> {
        for (bad, on_device) in [f32::INFINITY, f32::NAN].into_iter().flat_map(|b| STORES.map(|s| (b, s))) {
            let (params, mut updater) = setup(DType::F32, on_device)?;
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
        for on_device in STORES {
            master_weights(on_device)?;
        }
        Ok(())
    }

    fn master_weights(on_device: bool) -> Result<()> {
        let (params, mut updater) = setup(DType::BF16, on_device)?;
        assert_eq!(updater.state_bytes().master_weights, 6 * 4);
        // 1e-3 steps are below bf16's resolution at 1.0 (2^-7), but accumulate in the master.
        for _ in 0..8 {
            updater.accumulate(&grads(&params, &[1.0, 0.0, 0.0, 0.0], &[0.0, 0.0])?)?;
            updater.step(1e-3, None)?;
        }
        let w = values(&params, "w")?;
        assert_eq!(params.get("w").map(|p| p.dtype()), Some(DType::BF16));
        assert!((w[0] - 0.9921875).abs() < 1e-7, "{w:?}: 1 - 8e-3 rounded to bf16");
        Ok(())
    }

    #[test]
    fn unscaling_finds_inf_and_nan_in_both_stores_and_nothing_moves_on_the_cpu() -> Result<()> {
        for on_device in STORES {
            let (params, mut updater) = setup(DType::F32, on_device)?;
            updater.accumulate(&grads(&params, &[4.0, 0.0, 0.0, 0.0], &[0.0, 2.0])?)?;
            assert!(!updater.unscale(0.5)?, "finite gradients");
            assert_eq!(updater.gradient("w")?, Some(vec![2.0, 0.0, 0.0, 0.0]));
            for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
                updater.zero_grad();
                updater.accumulate(&grads(&params, &[1.0, 0.0, 0.0, 0.0], &[bad, 2.0])?)?;
                assert!(updater.unscale(0.5)?, "{bad} in the device store {on_device}");
            }
            // Huge but finite gradients are not reported as overflow.
            updater.zero_grad();
            updater.accumulate(&grads(&params, &[3e38, 3e38, 0.0, 0.0], &[0.0, 0.0])?)?;
            assert!(!updater.unscale(1.0)?);
            updater.step(0.0, None)?;
            assert_eq!(updater.take_transfers(), Transfers::default(), "the CPU device moves nothing");
        }
        Ok(())
    }

    #[test]
    fn the_state_round_trips_between_the_stores_and_offloading_brings_it_to_the_host() -> Result<()> {
        let mut pb = ParamBuilder::new(DType::BF16, Device::Cpu, 0);
        pb.constant("w", (2, 2), 1.0)?;
        pb.constant("b", 2, 0.5)?;
        let params = pb.finish();
        let adamw = OptimizerConfig::AdamW(crate::optim::AdamWConfig::default());
        let mut device = LocalUpdater::on_device(&params, &adamw)?;
        for _ in 0..3 {
            device.accumulate(&grads(&params, &[1.0, -2.0, 0.5, 0.0], &[0.25, 1.0])?)?;
            device.step(1e-2, None)?;
        }
        let saved = device.save_state()?;
        assert_eq!(saved.optimizer.step, 3);
        assert_eq!(saved.master_weights.len(), 2, "BF16 parameters have FP32 masters");
        let mut host = LocalUpdater::from_config(&params, &adamw)?;
        host.load_state(saved.clone())?;
        assert_eq!(host.save_state()?, saved, "the host store takes the device store's state as it is");
        let offloaded = device.offloaded()?;
        assert!(offloaded.is_offloaded() && !offloaded.is_device_resident());
        assert_eq!(offloaded.save_state()?, saved, "offloading carries the state over unchanged");
        let mut back = LocalUpdater::on_device(&params, &adamw)?;
        back.load_state(saved.clone())?;
        assert_eq!(back.save_state()?, saved);
        // A wrong master length is refused by either store, and nothing changes.
        let mut torn = saved.clone();
        torn.master_weights.values_mut().for_each(|m| m.push(0.0));
        assert!(matches!(back.load_state(torn), Err(Error::StateMismatch { .. })));
        assert_eq!(back.save_state()?, saved);
        Ok(())
    }
}
