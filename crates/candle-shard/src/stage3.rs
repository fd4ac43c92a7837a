//! ZeRO stage 3: parameters sharded too. Each rank keeps only its FP32 slice of every flat
//! buffer (`ShardedParameters`, shared with the rank's [`ZeroUpdater`]: host vectors the
//! flat-slice kernels step, or, by default off the CPU and with [`ShardedModel::on_device`],
//! tensors on the parameters' device that the device-resident updater steps and gathers
//! through device collectives); [`ShardedModel`]
//! wraps a model and all-gathers a segment's parameters into the model's variables just before
//! the segment's forward or recompute, and the updater releases them once the segment's
//! backward is done.
//!
//! # How a Candle variable is released
//!
//! A Candle `Var` has a fixed shape and shares its storage (`Arc<RwLock<Storage>>`) with every
//! graph that used it; no public API shrinks it. What Candle does allow is an in-place custom
//! op (`InplaceOp1`), which receives the storage mutably: it can swap the storage's buffer for
//! an empty one (release: the bytes go back to the allocator, as the counting allocator shows)
//! and later for a new buffer holding the gathered values (gather). Graphs that hold the
//! variable see the new buffer, since they share the storage.
//!
//! A released variable no longer covers its layout, which breaks an invariant Candle's kernels
//! rely on: computing with its raw storage would be undefined behaviour (the CPU matmul reads
//! through raw pointers). So release and gather go through the parameter handles
//! ([`Parameter`]), whose variable is private: a parameter is marked released before its
//! storage is swapped out and resident only after its values are back, and every read of its
//! values from safe code ([`Parameter::tensor`], which the layers read through,
//! [`Parameter::var`], the engine's [`SegmentParameter::var`]) refuses a released parameter
//! with [`candle_train::Error::ParameterReleased`] naming it. So a forward through
//! [`ShardedModel::inner`], saving or exporting its parameters, a checkpoint, or any other read
//! through a handle is an error, not a read of freed memory (tests/zero.rs). The swap itself is
//! the one user of [`Parameter::var_unchecked`] (`release_storage`, `restore_storage`).
//!
//! What no handle can see is a value taken while the parameter was resident and kept past its
//! release: a graph that used it. The protocol keeps graphs on gathered parameters, for the
//! segmented engine of candle-ckpt (segments forward in order, backward in reverse, one hook
//! call after each segment's backward, which the Trainer forwards to
//! [`Updater::accumulate`](candle_train::Updater::accumulate)):
//!
//! - before segment `i`'s forward or recompute, its parameters are gathered; the parameters
//!   gathered for the previous forward are released then (those segment `i` does not use): a
//!   segment's forward output is detached, so nothing reads them until the backward;
//! - before segment `i`'s backward the engine calls
//!   [`SegmentedModel::before_backward`], which gathers segment `i`'s parameters if they are
//!   not (a kept graph reads them in its backward), whatever the hook does;
//! - after segment `i`'s backward (its hook call, through the updater), segment `i - 1`'s
//!   parameters are gathered (so `before_backward` finds them there) and segment `i`'s
//!   released;
//! - the optimizer steps the FP32 slices; variables that happen to be gathered at that point
//!   are gathered again with the new values.
//!
//! A graph across segments (a plain whole-graph backward, [`candle_ckpt::plain_forward_backward`],
//! gradient verification's reference) would read every segment's parameters after their
//! release: [`ShardedModel`]'s forward refuses an input that carries the previous segments'
//! graph, and [`crate::driver::fit_rank`] refuses [`candle_train::BackwardMode::Plain`]. The
//! model is moved into [`ShardedModel`]; a variable the caller kept (a candle-nn `VarMap`'s,
//! a clone of one given to [`Parameter::new`]) shares the storage and is not guarded: don't
//! read it while the model is sharded. [`ShardedModel::into_inner`] gathers everything back
//! and returns the model.
//!
//! On CUDA (feature `cuda`) the buffer is swapped for a one-element allocation (compiled, not
//! run yet: no GPU), and a gather swaps in a new allocation that the gathered tensor is copied
//! into on the device (host slices: uploaded from the host, counted as parameter transfers);
//! on other devices storage is not released (the values are written with `Var::set`): the
//! semantics are stage 3's, the memory is not.
//!
//! Communication per micro-batch: the forward gathers every segment's parameters, the backward
//! gathers them again (the last segment's stay gathered from its forward; a parameter that a
//! later segment shares, GPT's tied embedding, is gathered for each user), and gradients are
//! reduce-scattered as in stage 2: about 3P in the parameters' dtype, against 2P for stages 0-2.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use candle::{CpuStorage, DType, InplaceOp1, Layout, Tensor, Var};
use candle_ckpt::{SegmentContext, SegmentParameter, SegmentedModel};
use candle_train::host::write_f32_values;
use candle_train::{OptimizerConfig, Parameter, Parameters, TrainableModel};
use half::{bf16, f16};

use crate::comm::{CommStats, Communicator};
use crate::error::{CommError, Error, Result};
use crate::partition::Partition;
use crate::zero::{exchange_in_dtype, segment_units, ZeroUpdater};

/// One communicator used by the updater and the model wrapper of one rank (the trait asks for
/// `Send` only, so it is shared behind a lock; calls never nest).
#[derive(Clone)]
pub(crate) struct SharedComm(Arc<Mutex<Box<dyn Communicator>>>);

impl SharedComm {
    pub(crate) fn new(comm: Box<dyn Communicator>) -> Self {
        Self(Arc::new(Mutex::new(comm)))
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn Communicator>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Communicator for SharedComm {
    fn rank(&self) -> usize {
        self.lock().rank()
    }
    fn world_size(&self) -> usize {
        self.lock().world_size()
    }
    fn timeout(&self) -> Duration {
        self.lock().timeout()
    }
    fn all_reduce_f32(&self, values: &mut [f32]) -> std::result::Result<(), CommError> {
        self.lock().all_reduce_f32(values)
    }
    fn all_reduce_f64(&self, values: &mut [f64]) -> std::result::Result<(), CommError> {
        self.lock().all_reduce_f64(values)
    }
    fn reduce_f32(&self, values: &mut [f32], root: usize) -> std::result::Result<(), CommError> {
        self.lock().reduce_f32(values, root)
    }
    fn reduce_scatter_f32(&self, values: &mut [f32]) -> std::result::Result<(), CommError> {
        self.lock().reduce_scatter_f32(values)
    }
    fn all_gather(&self, bytes: &mut [u8]) -> std::result::Result<(), CommError> {
        self.lock().all_gather(bytes)
    }
    fn broadcast(&self, bytes: &mut [u8], root: usize) -> std::result::Result<(), CommError> {
        self.lock().broadcast(bytes, root)
    }
    fn barrier(&self) -> std::result::Result<(), CommError> {
        self.lock().barrier()
    }
    fn stats(&self) -> CommStats {
        self.lock().stats()
    }

    fn host_staged_bytes(&self) -> u64 {
        self.lock().host_staged_bytes()
    }

    fn all_reduce_tensor(&self, t: &candle::Tensor) -> crate::Result<candle::Tensor> {
        self.lock().all_reduce_tensor(t)
    }

    fn reduce_scatter_tensor(&self, t: &candle::Tensor) -> crate::Result<candle::Tensor> {
        self.lock().reduce_scatter_tensor(t)
    }

    fn all_gather_tensor(&self, t: &candle::Tensor) -> crate::Result<candle::Tensor> {
        self.lock().all_gather_tensor(t)
    }
}

/// Swaps a variable's buffer in place: for an empty one (release) or for a new one holding
/// FP32 values rounded to the variable's dtype (restore).
enum SwapStorage<'a> {
    Release,
    Restore(&'a [f32]),
    /// A new zeroed buffer covering the layout (its values then come from `Var::set`, a copy
    /// on the device).
    Allocate,
}

fn check_layout(layout: &Layout) -> candle::Result<()> {
    if layout.start_offset() != 0 || !layout.is_contiguous() {
        candle::bail!("a sharded parameter must be a contiguous variable of its own");
    }
    Ok(())
}

impl InplaceOp1 for SwapStorage<'_> {
    fn name(&self) -> &'static str {
        "candle-shard-swap-storage"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle::Result<()> {
        check_layout(layout)?;
        *storage = match (self, &*storage) {
            (SwapStorage::Release, CpuStorage::F32(_)) => CpuStorage::F32(Vec::new()),
            (SwapStorage::Release, CpuStorage::BF16(_)) => CpuStorage::BF16(Vec::new()),
            (SwapStorage::Release, CpuStorage::F16(_)) => CpuStorage::F16(Vec::new()),
            (SwapStorage::Release, CpuStorage::F64(_)) => CpuStorage::F64(Vec::new()),
            (SwapStorage::Restore(v), CpuStorage::F32(_)) => CpuStorage::F32(v.to_vec()),
            (SwapStorage::Restore(v), CpuStorage::BF16(_)) => {
                CpuStorage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())
            }
            (SwapStorage::Restore(v), CpuStorage::F16(_)) => {
                CpuStorage::F16(v.iter().map(|&x| f16::from_f32(x)).collect())
            }
            (SwapStorage::Restore(v), CpuStorage::F64(_)) => {
                CpuStorage::F64(v.iter().map(|&x| f64::from(x)).collect())
            }
            (SwapStorage::Allocate, CpuStorage::F32(_)) => {
                CpuStorage::F32(vec![0.0; layout.shape().elem_count()])
            }
            (SwapStorage::Allocate, CpuStorage::BF16(_)) => {
                CpuStorage::BF16(vec![bf16::ZERO; layout.shape().elem_count()])
            }
            (SwapStorage::Allocate, CpuStorage::F16(_)) => {
                CpuStorage::F16(vec![f16::ZERO; layout.shape().elem_count()])
            }
            (SwapStorage::Allocate, CpuStorage::F64(_)) => {
                CpuStorage::F64(vec![0.0; layout.shape().elem_count()])
            }
            _ => candle::bail!("only float parameters can be sharded"),
        };
        Ok(())
    }

    /// On CUDA a released variable keeps a one-element allocation (the stream-ordered pool
    /// refuses empty ones); its bytes go back to the pool. Compiled, not run yet (no GPU).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &mut candle::CudaStorage, layout: &Layout) -> candle::Result<()> {
        use candle::cuda::CudaStorageSlice as Slice;
        check_layout(layout)?;
        let device = storage.device.clone();
        storage.slice = match (self, &storage.slice) {
            (SwapStorage::Release, Slice::F32(_)) => Slice::F32(device.alloc_zeros::<f32>(1)?),
            (SwapStorage::Release, Slice::BF16(_)) => Slice::BF16(device.alloc_zeros::<bf16>(1)?),
            (SwapStorage::Release, Slice::F16(_)) => Slice::F16(device.alloc_zeros::<f16>(1)?),
            (SwapStorage::Release, Slice::F64(_)) => Slice::F64(device.alloc_zeros::<f64>(1)?),
            (SwapStorage::Restore(v), Slice::F32(_)) => Slice::F32(device.clone_htod(*v)?),
            (SwapStorage::Restore(v), Slice::BF16(_)) => {
                let host: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                Slice::BF16(device.clone_htod(host.as_slice())?)
            }
            (SwapStorage::Restore(v), Slice::F16(_)) => {
                let host: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                Slice::F16(device.clone_htod(host.as_slice())?)
            }
            (SwapStorage::Restore(v), Slice::F64(_)) => {
                let host: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
                Slice::F64(device.clone_htod(host.as_slice())?)
            }
            (SwapStorage::Allocate, Slice::F32(_)) => {
                Slice::F32(device.alloc_zeros::<f32>(layout.shape().elem_count())?)
            }
            (SwapStorage::Allocate, Slice::BF16(_)) => {
                Slice::BF16(device.alloc_zeros::<bf16>(layout.shape().elem_count())?)
            }
            (SwapStorage::Allocate, Slice::F16(_)) => {
                Slice::F16(device.alloc_zeros::<f16>(layout.shape().elem_count())?)
            }
            (SwapStorage::Allocate, Slice::F64(_)) => {
                Slice::F64(device.alloc_zeros::<f64>(layout.shape().elem_count())?)
            }
            _ => candle::bail!("only float parameters can be sharded"),
        };
        Ok(())
    }
}

/// Whether this build swaps storage on `var`'s device (CPU; CUDA under the `cuda` feature).
fn swappable(var: &Var) -> bool {
    var.device().is_cpu() || (cfg!(feature = "cuda") && var.device().is_cuda())
}

/// Marks `param` released, then replaces its variable's buffer by an empty one (on devices
/// without a swap: only the mark).
fn release_storage(param: &Parameter) -> Result<()> {
    // The handle first: from here on every checked read through it is an error naming it.
    param.set_released(true);
    // SAFETY: the variable's metadata is read (device) and its buffer is swapped wholesale by
    // `SwapStorage::Release`, which reads only the storage's dtype tag, never the old values;
    // the reference ends with this function.
    let var = unsafe { param.var_unchecked() };
    if swappable(var) {
        var.as_tensor().inplace_op1(&SwapStorage::Release)?;
    }
    Ok(())
}

/// Gives `param`'s variable a new buffer holding `values` (FP32, rounded to the variable's
/// dtype to nearest even, as Candle's `to_dtype`), then marks it resident.
fn restore_storage(param: &Parameter, values: &[f32]) -> Result<()> {
    // SAFETY: the variable's metadata is read (element count, device) and its buffer is
    // replaced wholesale by `SwapStorage::Restore` (reading only the storage's dtype tag) with
    // one covering its layout; on devices without a swap the storage was never released and
    // `write_f32_values` writes a full buffer. The parameter is marked resident only after,
    // and the reference ends with this function.
    let var = unsafe { param.var_unchecked() };
    if values.len() != var.elem_count() {
        return Err(Error::config(
            "zero",
            format!("{} gathered values for a parameter of {} elements", values.len(), var.elem_count()),
        ));
    }
    if swappable(var) {
        var.as_tensor().inplace_op1(&SwapStorage::Restore(values))?;
    } else {
        write_f32_values(var, values)?;
    }
    // Readable again only once its values are back.
    param.set_released(false);
    Ok(())
}

/// Gives `param`'s variable a new buffer holding `values` (a tensor on its device, of its
/// shape and dtype: a device-to-device copy, nothing crosses to the host), then marks it
/// resident.
fn restore_storage_from(param: &Parameter, values: &Tensor) -> Result<()> {
    // SAFETY: the variable's metadata is read (device) and its buffer is replaced wholesale by
    // `SwapStorage::Allocate` (reading only the storage's dtype tag and the layout) with a
    // zeroed one covering its layout, which `Var::set` then fills: the old values are never
    // read. On devices without a swap the storage was never released. The parameter is
    // marked resident only after, and the reference ends with this function.
    let var = unsafe { param.var_unchecked() };
    if swappable(var) {
        var.as_tensor().inplace_op1(&SwapStorage::Allocate)?;
    }
    var.set(values)?;
    param.set_released(false);
    Ok(())
}

/// Where a rank's FP32 slices live: host vectors (the host updater steps them with the
/// flat-slice kernels) or 1-D tensors on the parameters' device (the device-resident updater,
/// [`crate::device_zero`]). Each covers the rank's shard range of its flat buffer, padding
/// included.
pub(crate) enum Slices {
    Host(Vec<Vec<f32>>),
    Device(Vec<Tensor>),
}

impl Slices {
    fn bytes(&self) -> usize {
        match self {
            Slices::Host(v) => v.iter().map(|s| s.len() * 4).sum(),
            Slices::Device(v) => v.iter().map(|s| s.elem_count() * 4).sum(),
        }
    }
}

fn misplaced(wanted: &str) -> Error {
    Error::config("zero", format!("internal: stage 3's slices are not {wanted}"))
}

/// One rank's parameters under stage 3: its FP32 slice of every flat buffer (the parameters
/// themselves for F32, the master weights otherwise: the value a gather rounds to the dtype),
/// and which buffers are gathered into the model's variables now.
pub(crate) struct ShardedParameters {
    comm: SharedComm,
    params: Vec<Parameter>,
    partition: Partition,
    /// Per flat buffer, this rank's slice in FP32: what the optimizer steps.
    slices: Slices,
    held: Vec<bool>,
    /// Per segment, the flat buffers holding the parameters it lists (set by
    /// [`ShardedModel::new`]; empty before).
    segment_groups: Vec<Vec<usize>>,
    /// The segment whose parameters the last forward gathered, released at the next forward.
    transient: Option<usize>,
    /// Whether variables are released between uses (false before [`ShardedModel::new`] and
    /// after [`ShardedModel::into_inner`]: then every buffer stays gathered).
    releasing: bool,
    /// The most bytes gathered at once while releasing.
    peak_gathered: usize,
    /// Bytes written from host memory into variables off the CPU by gathers since the last
    /// [`ShardedParameters::take_uploaded`] (the slices live on the host).
    uploaded: u64,
}

impl ShardedParameters {
    /// Every buffer gathered (the variables hold the full values they were built with).
    pub(crate) fn new(
        comm: SharedComm,
        params: Vec<Parameter>,
        partition: Partition,
        slices: Slices,
    ) -> Self {
        let held = vec![true; partition.groups().len()];
        Self {
            comm,
            params,
            partition,
            slices,
            held,
            segment_groups: Vec::new(),
            transient: None,
            releasing: false,
            peak_gathered: 0,
            uploaded: 0,
        }
    }

    /// The bytes gathers have uploaded into device variables since the last call.
    pub(crate) fn take_uploaded(&mut self) -> u64 {
        std::mem::take(&mut self.uploaded)
    }

    /// Whether variables are released between uses now.
    pub(crate) fn is_releasing(&self) -> bool {
        self.releasing
    }

    /// Bytes of the FP32 slices.
    pub(crate) fn slice_bytes(&self) -> usize {
        self.slices.bytes()
    }

    /// The host slices (the host updater's).
    ///
    /// # Errors
    /// An internal error when the slices live on the device.
    pub(crate) fn host_slices_mut(&mut self) -> Result<&mut Vec<Vec<f32>>> {
        match &mut self.slices {
            Slices::Host(v) => Ok(v),
            Slices::Device(_) => Err(misplaced("on the host")),
        }
    }

    /// The device slices (the device-resident updater's), to read.
    ///
    /// # Errors
    /// An internal error when the slices live on the host.
    pub(crate) fn device_slices(&self) -> Result<&[Tensor]> {
        match &self.slices {
            Slices::Device(v) => Ok(v),
            Slices::Host(_) => Err(misplaced("on the device")),
        }
    }

    /// The device slices (the device-resident updater's).
    ///
    /// # Errors
    /// An internal error when the slices live on the host.
    pub(crate) fn device_slices_mut(&mut self) -> Result<&mut Vec<Tensor>> {
        match &mut self.slices {
            Slices::Device(v) => Ok(v),
            Slices::Host(_) => Err(misplaced("on the device")),
        }
    }

    /// Bytes of parameters currently gathered into variables (on CPU).
    pub(crate) fn gathered_bytes(&self) -> usize {
        self.partition
            .groups()
            .iter()
            .zip(&self.held)
            .filter(|(_, &held)| held)
            .map(|(layout, _)| layout.len() * layout.dtype().size_in_bytes())
            .sum()
    }

    /// All-gathers buffer `group` (in its dtype) into its variables, unless it is gathered.
    fn gather(&mut self, group: usize) -> Result<()> {
        if self.held[group] {
            return Ok(());
        }
        let layout = &self.partition.groups()[group];
        match &self.slices {
            Slices::Host(values) => {
                let rank = self.comm.rank();
                let mut flat = vec![0f32; layout.padded_len()];
                flat[layout.shard_range(rank)].copy_from_slice(&values[group]);
                let comm = &self.comm;
                let flat = exchange_in_dtype(layout.dtype(), flat, |bytes| comm.all_gather(bytes))?;
                for e in layout.entries() {
                    let param = &self.params[e.param];
                    if !param.device().is_cpu() {
                        self.uploaded += (e.len * layout.dtype().size_in_bytes()) as u64;
                    }
                    restore_storage(param, &flat[e.offset..e.offset + e.len])?;
                }
            }
            Slices::Device(slices) => {
                // Rounded to the dtype on the device (to nearest even, as the host path), then
                // gathered device to device; F64 parameters travel as their FP32 values.
                let wire = if layout.dtype() == DType::F64 { DType::F32 } else { layout.dtype() };
                let all = self.comm.all_gather_tensor(&slices[group].to_dtype(wire)?)?;
                for e in layout.entries() {
                    let param = &self.params[e.param];
                    let values =
                        all.narrow(0, e.offset, e.len)?.reshape(param.shape())?.to_dtype(param.dtype())?;
                    restore_storage_from(param, &values)?;
                }
            }
        }
        self.held[group] = true;
        if self.releasing {
            self.peak_gathered = self.peak_gathered.max(self.gathered_bytes());
        }
        Ok(())
    }

    /// Releases buffer `group`'s variables (only while releasing).
    fn release(&mut self, group: usize) -> Result<()> {
        if !self.held[group] || !self.releasing {
            return Ok(());
        }
        for e in self.partition.groups()[group].entries() {
            release_storage(&self.params[e.param])?;
        }
        self.held[group] = false;
        Ok(())
    }

    fn groups_of(&self, segment: usize) -> Vec<usize> {
        self.segment_groups.get(segment).cloned().unwrap_or_default()
    }

    /// Gathers every buffer segment `segment` uses.
    fn acquire(&mut self, segment: usize) -> Result<()> {
        for g in self.groups_of(segment) {
            self.gather(g)?;
        }
        Ok(())
    }

    /// Releases the buffers of `segment` that `keep` (a segment about to run) does not use.
    fn release_segment(&mut self, segment: usize, keep: Option<usize>) -> Result<()> {
        let kept = keep.map(|k| self.groups_of(k)).unwrap_or_default();
        for g in self.groups_of(segment) {
            if !kept.contains(&g) {
                self.release(g)?;
            }
        }
        Ok(())
    }

    /// Before segment `segment`'s forward or recompute.
    pub(crate) fn before_forward(&mut self, segment: usize) -> Result<()> {
        if let Some(previous) = self.transient.take() {
            if previous != segment {
                self.release_segment(previous, Some(segment))?;
            }
        }
        self.acquire(segment)?;
        self.transient = Some(segment);
        Ok(())
    }

    /// Before segment `segment`'s backward: gathers its buffers unless they are (the protocol
    /// gathers them after the next segment's backward, or in its recompute; this makes a
    /// hook that does not call the updater safe too).
    pub(crate) fn before_backward(&mut self, segment: usize) -> Result<()> {
        if self.releasing {
            self.acquire(segment)?;
        }
        Ok(())
    }

    /// After segment `segment`'s backward: gathers segment `segment - 1` (whose backward is
    /// next) and releases the rest of `segment`'s.
    pub(crate) fn after_backward(&mut self, segment: usize) -> Result<()> {
        if !self.releasing {
            return Ok(());
        }
        // Release first (keeping what the next segment shares), then gather: at most one
        // segment's buffers plus the shared ones are held at once.
        let next = segment.checked_sub(1);
        self.release_segment(segment, next)?;
        if let Some(next) = next {
            self.acquire(next)?;
        }
        self.transient = None;
        Ok(())
    }

    /// After the optimizer stepped the slices: gathers the buffers that are gathered now
    /// again, so variables never hold stale values.
    pub(crate) fn refresh(&mut self) -> Result<()> {
        for g in 0..self.held.len() {
            if self.held[g] {
                self.held[g] = false;
                self.gather(g)?;
            }
        }
        Ok(())
    }

    /// Gathers every buffer and stops releasing.
    fn gather_all(&mut self) -> Result<()> {
        for g in 0..self.held.len() {
            self.gather(g)?;
        }
        self.releasing = false;
        self.transient = None;
        Ok(())
    }

    /// Starts releasing: every buffer is released until a segment needs it.
    fn start_releasing(&mut self, segment_groups: Vec<Vec<usize>>) -> Result<()> {
        self.segment_groups = segment_groups;
        self.releasing = true;
        self.transient = None;
        for g in 0..self.held.len() {
            self.release(g)?;
        }
        Ok(())
    }
}

/// A model whose parameters are sharded over the ranks (ZeRO stage 3): each segment's
/// parameters are all-gathered just before its forward or recompute and released after (see
/// the module docs). Build it with [`ShardedModel::new`], which also returns the rank's
/// [`ZeroUpdater`]; train it with the Trainer's segmented backward.
pub struct ShardedModel<M> {
    model: M,
    shards: Arc<Mutex<ShardedParameters>>,
    /// The first collective failure in a forward, kept typed (the engine carries only
    /// Candle errors).
    failed: RefCell<Option<Error>>,
}

impl<M> std::fmt::Debug for ShardedModel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedModel").field("gathered_bytes", &self.gathered_bytes()).finish()
    }
}

pub(crate) fn lock(shards: &Mutex<ShardedParameters>) -> MutexGuard<'_, ShardedParameters> {
    shards.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<M: TrainableModel> ShardedModel<M> {
    /// Shards `model` over the ranks of `comm`: builds the rank's stage-3 [`ZeroUpdater`] (one
    /// flat buffer per segment, as stage 2, and an `optimizer` over this rank's pieces),
    /// broadcasts rank 0's parameters to every rank, keeps this rank's FP32 slice and releases
    /// the model's variables. Every rank must call it (it communicates).
    ///
    /// Off the CPU the slices, gradient accumulators and optimizer state are tensors on the
    /// parameters' device wherever the optimizer has a device form (8-bit AdamW: CUDA only):
    /// see [`ShardedModel::on_device`].
    ///
    /// # Errors
    /// Bad optimizer hyper-parameters, a parameter of a non-float dtype, a collective failure,
    /// or a device error.
    pub fn new(
        model: M,
        optimizer: &OptimizerConfig,
        comm: Box<dyn Communicator>,
    ) -> Result<(Self, ZeroUpdater)> {
        let on_device = model
            .parameters()
            .iter()
            .find(|p| !p.device().is_cpu())
            .is_some_and(|p| optimizer.has_device_form(p.device()));
        Self::build(model, optimizer, comm, on_device)
    }

    /// As [`ShardedModel::new`], with the rank's FP32 slices, gradient accumulators and
    /// optimizer state as tensors on the parameters' device whatever it is (on the CPU: the
    /// tensor-op optimizers; see [`crate::device_zero`]). Gathers are device collectives
    /// ([`Communicator::all_gather_tensor`]) rounded to the dtype on the device: a step moves
    /// no parameter bytes through the host.
    ///
    /// # Errors
    /// As [`ShardedModel::new`]; 8-bit AdamW off CUDA (its device form is the CUDA kernel).
    pub fn on_device(
        model: M,
        optimizer: &OptimizerConfig,
        comm: Box<dyn Communicator>,
    ) -> Result<(Self, ZeroUpdater)> {
        Self::build(model, optimizer, comm, true)
    }

    fn build(
        model: M,
        optimizer: &OptimizerConfig,
        comm: Box<dyn Communicator>,
        on_device: bool,
    ) -> Result<(Self, ZeroUpdater)> {
        let params: &Parameters = model.parameters();
        let units = segment_units(&model, params);
        let (mut updater, shards) = ZeroUpdater::stage3(params, &units, optimizer, comm, on_device)?;
        updater.broadcast_parameters()?;
        let index: std::collections::HashMap<_, _> =
            params.iter().enumerate().map(|(i, p)| (p.id(), i)).collect();
        let segment_groups = {
            let guard = lock(&shards);
            (0..model.num_segments())
                .map(|segment| {
                    let mut groups = Vec::new();
                    for p in model.segment_parameters(segment) {
                        let located = index.get(&p.id()).and_then(|&i| guard.partition.locate(i));
                        if let Some((g, _)) = located {
                            if !groups.contains(&g) {
                                groups.push(g);
                            }
                        }
                    }
                    groups
                })
                .collect()
        };
        lock(&shards).start_releasing(segment_groups)?;
        Ok((Self { model, shards, failed: RefCell::new(None) }, updater))
    }
}

impl<M> ShardedModel<M> {
    /// Gathers every parameter into the model's variables and returns the model (every rank
    /// must call it: it communicates). The updater keeps working on it, without releasing
    /// anything any more.
    ///
    /// # Errors
    /// A collective failure or a device error.
    pub fn into_inner(self) -> Result<M> {
        lock(&self.shards).gather_all()?;
        Ok(self.model)
    }

    /// The wrapped model. Its parameters are released except around their segment's use: a
    /// forward through it, or any read through a parameter handle, is then an error naming the
    /// parameter ([`candle_train::Error::ParameterReleased`]).
    pub fn inner(&self) -> &M {
        &self.model
    }

    /// Bytes of parameters gathered into the model's variables now (0 between steps, one or
    /// two segments' worth during one).
    pub fn gathered_bytes(&self) -> usize {
        lock(&self.shards).gathered_bytes()
    }

    /// The most parameter bytes gathered at once so far (one segment's flat buffers, when
    /// the protocol of the module docs is followed).
    pub fn peak_gathered_bytes(&self) -> usize {
        lock(&self.shards).peak_gathered
    }

    /// Gathers segment `index`'s parameters as its forward does first (releasing those the
    /// previous forward gathered). [`SegmentedModel::forward_segment`] calls it.
    ///
    /// # Errors
    /// A collective failure or a device error.
    pub fn gather_segment(&self, index: usize) -> Result<()> {
        lock(&self.shards).before_forward(index)
    }

    /// A gather's failure as the engine carries it (a Candle error naming the segment), kept
    /// typed for [`ShardedModel::take_error`].
    fn typed(&self, gathered: Result<()>, segment: impl FnOnce() -> String) -> candle::Result<()> {
        gathered.map_err(|e| {
            let message = format!("gathering the parameters of {}: {e}", segment());
            self.failed.borrow_mut().get_or_insert(e);
            candle::Error::Msg(message)
        })
    }

    /// The first collective failure a forward met, if any (taken: a second call returns
    /// `None`).
    pub fn take_error(&self) -> Option<Error> {
        self.failed.borrow_mut().take()
    }
}

impl<M: SegmentedModel> SegmentedModel for ShardedModel<M> {
    type Batch = M::Batch;

    fn num_segments(&self) -> usize {
        self.model.num_segments()
    }

    fn segment_name(&self, index: usize) -> String {
        self.model.segment_name(index)
    }

    fn first_input(&self, batch: &M::Batch) -> candle::Result<Tensor> {
        self.model.first_input(batch)
    }

    fn forward_segment(
        &self,
        index: usize,
        input: &Tensor,
        batch: &M::Batch,
        ctx: &SegmentContext,
    ) -> candle::Result<Tensor> {
        // A segment's input that carries the previous segments' graph (a plain whole-graph
        // backward) would have that graph read released parameters in its backward: refused.
        // The engine hands segments a tracked copy (a variable) or a detached input.
        if index > 0 && input.track_op() && !input.is_variable() && lock(&self.shards).is_releasing() {
            return Err(candle::Error::Msg(format!(
                "segment `{}` of a ZeRO stage 3 model was given an input that carries the previous segments' graph: its parameters are released after their segment runs, so only the segmented engine (`forward_backward`, one backward per segment) can train it, not a whole-graph backward",
                self.model.segment_name(index)
            )));
        }
        let gathered = self.gather_segment(index);
        self.typed(gathered, || self.model.segment_name(index))?;
        self.model.forward_segment(index, input, batch, ctx)
    }

    fn before_backward(&self, index: usize) -> candle::Result<()> {
        let gathered = lock(&self.shards).before_backward(index);
        self.typed(gathered, || self.model.segment_name(index))?;
        self.model.before_backward(index)
    }

    fn segment_parameters(&self, index: usize) -> Vec<SegmentParameter> {
        self.model.segment_parameters(index)
    }

    fn is_block(&self, index: usize) -> bool {
        self.model.is_block(index)
    }

    fn stateful_layer(&self, index: usize) -> Option<String> {
        self.model.stateful_layer(index)
    }
}

impl<M: TrainableModel> TrainableModel for ShardedModel<M> {
    fn parameters(&self) -> &Parameters {
        self.model.parameters()
    }

    fn context_length(&self) -> usize {
        self.model.context_length()
    }

    fn device(&self) -> candle::Device {
        self.model.device()
    }

    fn settings(&self) -> String {
        self.model.settings()
    }

    fn lora_config(&self) -> Option<&candle_train::lora::LoraConfig> {
        self.model.lora_config()
    }

    /// The parameters gathered now (between steps, usually none; those gathered during a step
    /// count with its activations).
    fn resident_parameter_bytes(&self) -> usize {
        self.gathered_bytes()
    }
}

/// Whether parameters of `dtype` can be sharded (float types).
pub(crate) fn shardable(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64)
}
