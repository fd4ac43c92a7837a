//! ZeRO stages 0-3 as candle-train [`Updater`]s for one rank of N.
//!
//! Parameters are laid out in one flat buffer per dtype by [`Partition`]; each rank owns one
//! equal contiguous slice of it.
//!
//! - Stage 0 (data parallel): a flat FP32 accumulator over the whole buffer, accumulated
//!   locally over the micro-batches (no-sync), all-reduced once per step; every rank holds the
//!   whole gradient, master weights and optimizer state, and steps every parameter.
//! - Stage 1 (optimizer state sharded): the same no-sync accumulator, reduce-scattered once per
//!   step; each rank steps only its slice, with master weights and optimizer state for that
//!   slice only, then the new parameter values are all-gathered in the parameters' dtype.
//! - Stage 2 (gradients sharded too): parameters are laid out in one flat buffer per segment
//!   (per "unit": the segment whose backward completes the parameter's gradient, see
//!   [`segment_units`]) and dtype, each split equally over the ranks, as FSDP does per wrapped
//!   module. The rank holds an FP32 gradient accumulator for its slices only. In the engine's
//!   per-segment hook, during backward, a unit's final gradients are staged in FP32 (one
//!   segment's worth, transient) and, once the unit is complete, reduce-scattered: each rank adds
//!   its chunk to its accumulator. This happens every micro-batch. A gradient that is not final
//!   yet (a tied weight used by a later segment) is held until its last contribution arrives.
//!   The step is stage 1's; the all-gather of the new values goes through a transient flat
//!   buffer per unit.
//! - Stage 3 (parameters sharded too): stage 2's buffers, gradients and reduction; the rank
//!   keeps only its FP32 slice of the parameters (for F32 parameters the slice is the
//!   parameters; otherwise it is the master weights, rounded to the dtype when gathered), and
//!   the model's variables are released except around their segment's use. Built with
//!   [`ShardedModel::new`](crate::stage3::ShardedModel::new), which wraps the model; see
//!   [`crate::stage3`]. The step updates the slices and all-gathers nothing.
//!
//! How the optimizer sees a slice that cuts through parameters: it is built over the rank's
//! [`Piece`](crate::partition::Piece)s (index `k` is the rank's `k`-th piece, of the piece's
//! length), and each piece is stepped with the weight-decay flag of its original parameter
//! (parameters of two or more dimensions decay). AdamW and SGD are elementwise, so stepping a
//! parameter piece by piece gives the same bits as stepping it whole. Padding belongs to no
//! piece: it never reaches the norm or the optimizer.
//!
//! Semantics that hold on every rank alike: the gradient is the sum of the ranks' shares (each
//! rank's loss is weighted by its fraction of the global batch, see
//! [`candle_train::Trainer::data_parallel`]); the global norm is computed from the reduced
//! gradient (stage 1: the ranks' partial sums of squares, all-reduced in FP64), so clipping is
//! the same everywhere; the inf/NaN decision is all-reduced, so every rank skips together.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle::{DType, TensorId};
use candle_ckpt::SegmentGradients;
use candle_train::checkpoint::{Checkpoint, Progress, RunIdentity, ShardedInfo};
use candle_train::host::{to_f32_vec, update_f32_in_place, with_f32_values, write_f32_values};
use candle_train::loss_scale::unscale_slice;
use candle_train::updater::{StateBytes, Transfers};
use candle_train::{Optimizer, OptimizerConfig, Parameter, Parameters, StepReport, Updater};
use half::{bf16, f16};

use crate::checkpoint::{buffers_by_index, owning_piece, piece_buffers, Need, SavedPiece};
use crate::comm::{CommStats, Communicator};
use crate::device_zero::DeviceZero;
use crate::error::{Error, Result};
use crate::partition::{FlatEntry, Partition};
use crate::stage3::{lock, shardable, ShardedParameters, SharedComm, Slices};
use crate::ZeroStage;

/// One flat buffer's state on this rank.
struct Group {
    /// The FP32 gradient accumulator: over the whole padded buffer (stages 0-1) or the rank's
    /// slice (stage 2).
    grads: Vec<f32>,
    /// The flat index of `grads[0]`.
    grads_offset: usize,
    /// The flat elements this rank steps: all of them (stage 0) or its slice (stage 1).
    owned: Range<usize>,
    /// FP32 master weights of the owned elements, for parameters not held in F32.
    master: Option<Vec<f32>>,
}

/// A piece of a parameter this rank steps; its position is its optimizer index.
struct OwnedPiece {
    group: usize,
    param: usize,
    param_range: Range<usize>,
    /// Its elements within the group's owned range.
    owned_range: Range<usize>,
    decay: bool,
}

/// One rank's [`Updater`] for ZeRO stage 0, 1 or 2 (see the module docs).
pub struct ZeroUpdater {
    stage: ZeroStage,
    comm: Box<dyn Communicator>,
    params: Vec<Parameter>,
    index: HashMap<TensorId, (usize, FlatEntry)>,
    partition: Partition,
    groups: Vec<Group>,
    pieces: Vec<OwnedPiece>,
    optimizer: Box<dyn Optimizer>,
    reduced: bool,
    /// Stage 2: FP32 gradients of parameters whose last contribution has not arrived yet.
    pending: HashMap<usize, Vec<f32>>,
    /// Stage 2: per group, its flat FP32 gradients staged so far and how many of its
    /// parameters they cover.
    staging: HashMap<usize, (Vec<f32>, usize)>,
    /// Stage 3: the rank's parameter slices, shared with the model wrapper.
    shards: Option<Arc<Mutex<ShardedParameters>>>,
    /// Whether the parameters live off the CPU, so that every host copy below is a transfer.
    off_host: bool,
    /// Host <-> device bytes since the last `take_transfers` (collectives come from the
    /// communicator's own count).
    transfers: Transfers,
    /// The communicator's staged-byte count at the last `take_transfers`.
    staged_seen: u64,
    /// Stages 0-2 with every buffer on the parameters' device: when set, it holds the state
    /// and the host buffers above are empty.
    device: Option<DeviceZero>,
}

/// For each of `params` (in order), the segment of `model` whose backward completes its
/// gradient: the first segment that lists it (backward runs in reverse). Parameters no segment
/// lists get `usize::MAX`. These are stage 2's units ([`ZeroUpdater::with_units`]).
pub fn segment_units<M: candle_ckpt::SegmentedModel + ?Sized>(model: &M, params: &Parameters) -> Vec<usize> {
    let mut first: HashMap<TensorId, usize> = HashMap::new();
    for segment in 0..model.num_segments() {
        for p in model.segment_parameters(segment) {
            first.entry(p.id()).or_insert(segment);
        }
    }
    params.iter().map(|p| first.get(&p.id()).copied().unwrap_or(usize::MAX)).collect()
}

impl std::fmt::Debug for ZeroUpdater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroUpdater")
            .field("stage", &self.stage)
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("pieces", &self.pieces.len())
            .finish()
    }
}

impl ZeroUpdater {
    /// The updater of rank `comm.rank()` for `params` (the same parameters, with the same
    /// values, on every rank: see [`ZeroUpdater::broadcast_parameters`]), with an optimizer
    /// built from `optimizer` over the pieces this rank steps, and one flat buffer per dtype.
    /// Communicates nothing. Stage 2 works with this layout too, but reduce-scatters the whole
    /// buffer once the last segment completes; give it per-segment buffers with
    /// [`ZeroUpdater::with_units`] so that it reduces during backward.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for stage 3 (it shards the model too: build it with
    /// [`ShardedModel::new`](crate::stage3::ShardedModel::new)) or bad optimizer
    /// hyper-parameters; a device error reading half-precision parameters.
    pub fn new(
        stage: ZeroStage,
        params: &Parameters,
        optimizer: &OptimizerConfig,
        comm: Box<dyn Communicator>,
    ) -> Result<Self> {
        Self::with_units(stage, params, &[], optimizer, comm)
    }

    /// As [`ZeroUpdater::new`], with one flat buffer per unit and dtype (`units[i]` is
    /// parameter `i`'s unit, usually from [`segment_units`]; an empty slice puts every
    /// parameter in one unit).
    ///
    /// # Errors
    /// As [`ZeroUpdater::new`].
    pub fn with_units(
        stage: ZeroStage,
        params: &Parameters,
        units: &[usize],
        optimizer: &OptimizerConfig,
        comm: Box<dyn Communicator>,
    ) -> Result<Self> {
        if stage == ZeroStage::Stage3 {
            return Err(Error::config(
                "zero",
                "stage 3 shards the model's parameters too: build it with `ShardedModel::new`",
            ));
        }
        // Off the CPU the state lives on the device, wherever the optimizer has a device form
        // (8-bit AdamW: CUDA only).
        let on_device = params
            .iter()
            .find(|p| !p.device().is_cpu())
            .is_some_and(|p| optimizer.has_device_form(p.device()));
        Self::build(stage, params, units, optimizer, comm, on_device)
    }

    /// As [`ZeroUpdater::with_units`], with the gradient accumulators, master weights and
    /// optimizer state as tensors on the parameters' device whatever it is (see
    /// [`crate::device_zero`]; what `with_units` builds off the CPU). Stages 0-2.
    ///
    /// # Errors
    /// As [`ZeroUpdater::new`]; stage 3 (see
    /// [`ShardedModel::on_device`](crate::stage3::ShardedModel::on_device)), or 8-bit AdamW off
    /// CUDA (its device form is the CUDA kernel).
    pub fn on_device(
        stage: ZeroStage,
        params: &Parameters,
        units: &[usize],
        optimizer: &OptimizerConfig,
        comm: Box<dyn Communicator>,
    ) -> Result<Self> {
        if stage == ZeroStage::Stage3 {
            return Err(Error::config(
                "zero",
                "stage 3 shards the model's parameters too: build it with `ShardedModel::on_device`",
            ));
        }
        Self::build(stage, params, units, optimizer, comm, true)
    }

    /// Whether the gradient accumulators, master weights and optimizer state live on the
    /// parameters' device.
    pub fn is_device_resident(&self) -> bool {
        self.device.is_some()
    }

    /// Stage 3's updater and its parameter slices (every variable still gathered).
    pub(crate) fn stage3(
        params: &Parameters,
        units: &[usize],
        optimizer: &OptimizerConfig,
        comm: Box<dyn Communicator>,
        on_device: bool,
    ) -> Result<(Self, Arc<Mutex<ShardedParameters>>)> {
        if let Some(p) = params.iter().find(|p| !shardable(p.dtype())) {
            return Err(Error::config(
                "zero",
                format!("stage 3 cannot shard parameter `{}` of dtype {:?}", p.name, p.dtype()),
            ));
        }
        let updater = Self::build(ZeroStage::Stage3, params, units, optimizer, comm, on_device)?;
        let shards = updater.shards.clone().expect("stage 3 builds its parameter slices");
        Ok((updater, shards))
    }

    fn build(
        stage: ZeroStage,
        params: &Parameters,
        units: &[usize],
        optimizer: &OptimizerConfig,
        comm: Box<dyn Communicator>,
        on_device: bool,
    ) -> Result<Self> {
        let (comm, shared): (Box<dyn Communicator>, _) = if stage == ZeroStage::Stage3 {
            let shared = SharedComm::new(comm);
            (Box::new(shared.clone()), Some(shared))
        } else {
            (comm, None)
        };
        let params: Vec<Parameter> = params.iter().cloned().collect();
        let shapes: Vec<(DType, usize)> = params.iter().map(|p| (p.dtype(), p.elem_count())).collect();
        let units = if units.is_empty() { vec![0; params.len()] } else { units.to_vec() };
        let partition = Partition::by_unit(&shapes, &units, comm.world_size());
        let mut index = HashMap::new();
        for (i, p) in params.iter().enumerate() {
            let located = partition.locate(i).expect("every parameter is in its dtype's buffer");
            index.insert(p.id(), located);
        }
        let rank = comm.rank();
        if on_device {
            let shards = match shared {
                Some(shared) => {
                    let slices = crate::device_zero::device_slices(&params, &partition, rank)?;
                    let shards = ShardedParameters::new(
                        shared,
                        params.clone(),
                        partition.clone(),
                        Slices::Device(slices),
                    );
                    Some(Arc::new(Mutex::new(shards)))
                }
                None => None,
            };
            let device = DeviceZero::new(
                stage,
                &params,
                partition.clone(),
                index.clone(),
                optimizer,
                rank,
                shards.clone(),
            )?;
            let staged_seen = comm.host_staged_bytes();
            return Ok(Self {
                stage,
                comm,
                params,
                index,
                partition,
                groups: Vec::new(),
                pieces: Vec::new(),
                // Unused: the device state's optimizer steps.
                optimizer: optimizer.build_pieces(&[])?,
                reduced: false,
                pending: HashMap::new(),
                staging: HashMap::new(),
                shards,
                off_host: false,
                transfers: Transfers::default(),
                staged_seen,
                device: Some(device),
            });
        }
        let mut groups = Vec::new();
        let mut pieces = Vec::new();
        let mut slices = Vec::new();
        for (g, layout) in partition.groups().iter().enumerate() {
            let (owned, group_pieces) = match stage {
                ZeroStage::Stage0 => {
                    let whole =
                        layout.entries().iter().map(|e| (e.param, 0..e.len, e.offset..e.offset + e.len));
                    (0..layout.padded_len(), whole.collect::<Vec<_>>())
                }
                _ => {
                    let mine =
                        layout.pieces(rank).into_iter().map(|p| (p.param, p.param_range, p.shard_range));
                    (layout.shard_range(rank), mine.collect())
                }
            };
            // Stage 3 keeps an FP32 slice for every dtype (outside the group: shared).
            let master = if layout.dtype() == DType::F32 && stage != ZeroStage::Stage3 {
                None
            } else {
                let mut master = vec![0f32; owned.len()];
                for (param, param_range, owned_range) in &group_pieces {
                    let values = to_f32_vec(params[*param].var()?.as_tensor())?;
                    master[owned_range.clone()].copy_from_slice(&values[param_range.clone()]);
                }
                Some(master)
            };
            let master = match stage {
                ZeroStage::Stage3 => {
                    slices.push(master.unwrap_or_default());
                    None
                }
                _ => master,
            };
            for (param, param_range, owned_range) in group_pieces {
                let decay = params[param].rank() >= 2;
                pieces.push(OwnedPiece { group: g, param, param_range, owned_range, decay });
            }
            let (grads, grads_offset) = match stage {
                ZeroStage::Stage2 | ZeroStage::Stage3 => (vec![0.0; owned.len()], owned.start),
                _ => (vec![0.0; layout.padded_len()], 0),
            };
            groups.push(Group { grads, grads_offset, owned, master });
        }
        // (piece, whole parameter) lengths: 8-bit AdamW decides 8-bit or 32-bit state per
        // original parameter, whatever the slice this rank steps.
        let sizes: Vec<(usize, usize)> =
            pieces.iter().map(|p| (p.param_range.len(), params[p.param].elem_count())).collect();
        let optimizer = optimizer.build_pieces(&sizes)?;
        let shards = shared.map(|comm| {
            Arc::new(Mutex::new(ShardedParameters::new(
                comm,
                params.clone(),
                partition.clone(),
                Slices::Host(slices),
            )))
        });
        let off_host = params.iter().any(|p| !p.device().is_cpu());
        let staged_seen = comm.host_staged_bytes();
        Ok(Self {
            stage,
            comm,
            params,
            index,
            partition,
            groups,
            pieces,
            optimizer,
            reduced: false,
            pending: HashMap::new(),
            staging: HashMap::new(),
            shards,
            off_host,
            transfers: Transfers::default(),
            staged_seen,
            device: None,
        })
    }

    /// Makes every rank's parameters (and stage 0's master weights) equal to rank 0's, as
    /// data-parallel training starts: one broadcast per flat buffer, in the parameters' dtype.
    ///
    /// # Errors
    /// A collective failure, or a device error; [`Error::InvalidConfig`] for a stage-3 updater
    /// whose model is sharded already.
    pub fn broadcast_parameters(&mut self) -> Result<()> {
        if self.shards.as_ref().is_some_and(|s| lock(s).is_releasing()) {
            return Err(Error::config(
                "zero",
                "stage 3 broadcasts rank 0's parameters before it releases them (in `ShardedModel::new`), not after",
            ));
        }
        for (g, layout) in self.partition.groups().iter().enumerate() {
            let mut flat = vec![0f32; layout.padded_len()];
            for e in layout.entries() {
                with_f32_values(self.params[e.param].var()?.as_tensor(), |v| {
                    flat[e.offset..e.offset + e.len].copy_from_slice(v)
                })?;
            }
            let flat = exchange_in_dtype(layout.dtype(), flat, |bytes| self.comm.broadcast(bytes, 0))?;
            for e in layout.entries() {
                write_f32_values(self.params[e.param].var()?, &flat[e.offset..e.offset + e.len])?;
            }
            let Some(group) = self.groups.get_mut(g) else { continue };
            if let Some(master) = group.master.as_mut() {
                master.copy_from_slice(&flat[group.owned.clone()]);
            }
            if let Some(shards) = &self.shards {
                lock(shards).host_slices_mut()?[g].copy_from_slice(&flat[group.owned.clone()]);
            }
        }
        if let Some(device) = &mut self.device {
            device.reload_masters()?;
        }
        Ok(())
    }

    /// The stage.
    pub fn stage(&self) -> ZeroStage {
        self.stage
    }

    /// The flat buffers.
    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    /// What this rank has communicated so far.
    pub fn comm_stats(&self) -> CommStats {
        self.comm.stats()
    }

    /// This rank and the world size.
    pub fn rank(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.world_size())
    }

    /// The reduced FP32 gradient of the owned elements of parameter `name`, as `(range of the
    /// parameter's flattened elements, values)` pieces. Only meaningful between the reduction
    /// (the first [`Updater::unscale`] or [`Updater::step`] of a step) and the step.
    pub fn owned_gradient(&self, name: &str) -> Vec<(Range<usize>, Vec<f32>)> {
        self.pieces
            .iter()
            .filter(|p| self.params[p.param].name == name)
            .map(|p| {
                let group = &self.groups[p.group];
                let grad = &group.grads[group.owned.start - group.grads_offset..][p.owned_range.clone()];
                (p.param_range.clone(), grad.to_vec())
            })
            .collect()
    }

    /// Reduces the accumulated gradients across ranks, once per step (stage 2 reduced them
    /// during backward).
    fn reduce(&mut self) -> Result<()> {
        if matches!(self.stage, ZeroStage::Stage2 | ZeroStage::Stage3) {
            // Units the engine never completed (a parameter no segment lists a final gradient
            // for): flushed in group order, the same on every rank.
            let mut incomplete: Vec<usize> = self.staging.keys().copied().collect();
            incomplete.sort_unstable();
            for group in incomplete {
                self.reduce_scatter_staged(group)?;
            }
            return Ok(());
        }
        if self.reduced {
            return Ok(());
        }
        for group in &mut self.groups {
            match self.stage {
                ZeroStage::Stage0 => self.comm.all_reduce_f32(&mut group.grads)?,
                _ => self.comm.reduce_scatter_f32(&mut group.grads)?,
            }
        }
        self.reduced = true;
        Ok(())
    }

    /// A sum over ranks of per-rank FP64 values (stage 0 values are already global).
    fn global_sum(&self, local: f64) -> Result<f64> {
        if self.stage == ZeroStage::Stage0 {
            return Ok(local);
        }
        let mut v = [local];
        self.comm.all_reduce_f64(&mut v)?;
        Ok(v[0])
    }

    /// Stage 1: all-gathers the stepped slices, in the parameters' dtype, into every rank's
    /// parameters. Stage 0: writes the master weights of half-precision parameters back.
    fn publish(&mut self) -> Result<()> {
        if let Some(shards) = &self.shards {
            // Stage 3: nothing to gather; variables gathered now get the new values.
            return lock(shards).refresh();
        }
        let rank = self.comm.rank();
        for (g, layout) in self.partition.groups().iter().enumerate() {
            let group = &mut self.groups[g];
            if self.stage == ZeroStage::Stage0 {
                if let Some(master) = &group.master {
                    for e in layout.entries() {
                        let var = self.params[e.param].var()?;
                        if self.off_host {
                            self.transfers.parameters += (e.len * var.dtype().size_in_bytes()) as u64;
                        }
                        write_f32_values(var, &master[e.offset..e.offset + e.len])?;
                    }
                }
                continue;
            }
            // Stage 1's full gradient accumulator is done with: reuse it to assemble the new
            // values. Stage 2 has none: a transient buffer.
            let mut flat = if self.stage == ZeroStage::Stage1 {
                let mut flat = std::mem::take(&mut group.grads);
                flat.fill(0.0);
                flat
            } else {
                vec![0.0; layout.padded_len()]
            };
            let shard = layout.shard_range(rank);
            match &group.master {
                Some(master) => flat[shard.clone()].copy_from_slice(master),
                None => {
                    for piece in layout.pieces(rank) {
                        if self.off_host {
                            self.transfers.parameters += 4 * self.params[piece.param].elem_count() as u64;
                        }
                        with_f32_values(self.params[piece.param].var()?.as_tensor(), |v| {
                            flat[shard.start..][piece.shard_range.clone()]
                                .copy_from_slice(&v[piece.param_range.clone()])
                        })?;
                    }
                }
            }
            let comm = &self.comm;
            let flat = exchange_in_dtype(layout.dtype(), flat, |bytes| comm.all_gather(bytes))?;
            for e in layout.entries() {
                let var = self.params[e.param].var()?;
                if self.off_host {
                    self.transfers.parameters += (e.len * var.dtype().size_in_bytes()) as u64;
                }
                write_f32_values(var, &flat[e.offset..e.offset + e.len])?;
            }
            if self.stage == ZeroStage::Stage1 {
                group.grads = flat;
            }
        }
        Ok(())
    }

    /// Stage 2's hook: stages one segment's final gradients and reduce-scatters every unit
    /// they complete.
    fn accumulate_sharded(&mut self, gradients: &SegmentGradients) -> candle_train::Result<()> {
        let mut completed = Vec::new();
        for g in &gradients.gradients {
            let Some(&(group, entry)) = self.index.get(&g.id) else {
                return Err(unknown(&g.name));
            };
            if self.off_host {
                self.transfers.gradients += 4 * g.grad.elem_count() as u64;
            }
            let mut values = to_f32_vec(&g.grad)?;
            if let Some(earlier) = self.pending.remove(&entry.param) {
                values.iter_mut().zip(&earlier).for_each(|(v, e)| *v += e);
            }
            if !g.is_final {
                self.pending.insert(entry.param, values);
                continue;
            }
            let layout = &self.partition.groups()[group];
            let (staged, count) =
                self.staging.entry(group).or_insert_with(|| (vec![0.0; layout.padded_len()], 0));
            staged[entry.offset..entry.offset + entry.len].iter_mut().zip(&values).for_each(|(s, v)| *s += v);
            *count += 1;
            if *count == layout.entries().len() {
                completed.push(group);
            }
        }
        for group in completed {
            self.reduce_scatter_staged(group)?;
        }
        Ok(())
    }

    /// Stage 2: reduce-scatters a unit's staged gradients and adds this rank's chunk to its
    /// accumulator.
    fn reduce_scatter_staged(&mut self, group: usize) -> Result<()> {
        let Some((mut staged, _)) = self.staging.remove(&group) else {
            return Ok(());
        };
        self.comm.reduce_scatter_f32(&mut staged)?;
        let g = &mut self.groups[group];
        let mine = &staged[g.owned.clone()];
        g.grads.iter_mut().zip(mine).for_each(|(a, &v)| *a += v);
        Ok(())
    }
}

impl ZeroUpdater {
    /// This rank's pieces of a sharded checkpoint: its slice of every flat buffer (whatever the
    /// stage: stage 0 steps everything but writes only its slice), with FP32 values and
    /// optimizer buffers.
    fn checkpoint_pieces(&self) -> Result<Vec<SavedPiece>> {
        if let Some(device) = &self.device {
            return device.checkpoint_pieces();
        }
        let rank = self.comm.rank();
        let state = self.optimizer.state()?;
        let buffers = buffers_by_index(&state)?;
        let mut shards = self.shards.as_ref().map(|s| lock(s));
        let slices = match shards.as_mut() {
            Some(shards) => Some(shards.host_slices_mut()?),
            None => None,
        };
        let mut out = Vec::new();
        for (g, layout) in self.partition.groups().iter().enumerate() {
            let group = &self.groups[g];
            let shard = layout.shard_range(rank);
            for piece in layout.pieces(rank) {
                // The flat elements, relative to the owned range.
                let flat = shard.start + piece.shard_range.start - group.owned.start
                    ..shard.start + piece.shard_range.end - group.owned.start;
                let values = match (&slices, &group.master) {
                    (Some(slices), _) => slices[g][flat.clone()].to_vec(),
                    (None, Some(master)) => master[flat.clone()].to_vec(),
                    (None, None) => with_f32_values(self.params[piece.param].var()?.as_tensor(), |v| {
                        v[piece.param_range.clone()].to_vec()
                    })?,
                };
                // The optimizer piece holding these elements (stage 0: the whole parameter).
                let owned = self.pieces.iter().map(|o| (o.group, o.param, &o.param_range));
                let (k, offset) = owning_piece(owned, g, &piece)?;
                let owned_len = self.pieces[k].param_range.len();
                let piece_buffers =
                    piece_buffers(&buffers, &state.kind, k, owned_len, offset, piece.param_range.len())?;
                out.push(SavedPiece {
                    name: self.params[piece.param].name.clone(),
                    param_range: piece.param_range,
                    values,
                    buffers: piece_buffers,
                });
            }
        }
        Ok(out)
    }

    fn restore_from(&mut self, ckpt: &Checkpoint, params: &Parameters) -> Result<()> {
        let Some(info) = &ckpt.manifest.sharded else {
            return Err(Error::config("checkpoint", "not a sharded checkpoint"));
        };
        let optimizer = Updater::optimizer(self);
        if info.optimizer != optimizer.name() {
            return Err(Error::Train(candle_train::Error::checkpoint(
                &ckpt.path,
                format!("it holds {} state, this run uses {}", info.optimizer, optimizer.name()),
            )));
        }
        let current = optimizer.state()?;
        let piece_ranges: Vec<(usize, Range<usize>)> = match &self.device {
            Some(device) => device.piece_ranges(),
            None => self.pieces.iter().map(|p| (p.param, p.param_range.clone())).collect(),
        };
        let by_index = buffers_by_index(&current)?;
        let stage3 = self.shards.is_some();
        let mut needs = Vec::new();
        // Values: every parameter whole (stages 0-2 hold it), or the owned pieces (stage 3).
        if !stage3 {
            for (i, p) in self.params.iter().enumerate() {
                needs.push(Need { buffer: "value".into(), param: i, range: 0..p.elem_count() });
            }
        }
        for (k, (param, range)) in piece_ranges.iter().enumerate() {
            if stage3 {
                needs.push(Need { buffer: "value".into(), param: *param, range: range.clone() });
            }
            for (base, _) in by_index.get(&k).map(Vec::as_slice).unwrap_or_default() {
                needs.push(Need { buffer: base.clone(), param: *param, range: range.clone() });
            }
        }
        let mut found = crate::checkpoint::read(ckpt, params, &needs)?.into_iter();
        let mut values = Vec::new();
        let mut buffers = std::collections::BTreeMap::new();
        if !stage3 {
            values = found.by_ref().take(self.params.len()).collect();
        }
        let mut piece_values = Vec::new();
        for k in 0..piece_ranges.len() {
            if stage3 {
                piece_values.push(found.next().unwrap_or_default());
            }
            for (base, _) in by_index.get(&k).map(Vec::as_slice).unwrap_or_default() {
                buffers.insert(format!("{base}.{k}"), found.next().unwrap_or_default());
            }
        }
        let state = candle_train::optim::OptimizerState {
            kind: current.kind.clone(),
            step: info.optimizer_step,
            buffers,
            quantized: Default::default(),
        };
        if let Some(device) = &mut self.device {
            return device.restore(&values, &piece_values, &state);
        }
        // The optimizer checks its buffers and changes nothing on error.
        self.optimizer.load_state(&state)?;
        if let Some(shards) = &self.shards {
            let mut shards = lock(shards);
            let slices = shards.host_slices_mut()?;
            for (piece, v) in self.pieces.iter().zip(piece_values) {
                slices[piece.group][piece.owned_range.clone()].copy_from_slice(&v);
            }
            shards.refresh()?;
        } else {
            for (p, v) in self.params.iter().zip(&values) {
                write_f32_values(p.var()?, v)?;
            }
            for piece in &self.pieces {
                if let Some(master) = self.groups[piece.group].master.as_mut() {
                    master[piece.owned_range.clone()]
                        .copy_from_slice(&values[piece.param][piece.param_range.clone()]);
                }
            }
        }
        self.zero_grad();
        Ok(())
    }
}

fn unknown(name: &str) -> candle_train::Error {
    candle_train::Error::StateMismatch {
        name: name.to_string(),
        expected: "a parameter known to the updater".into(),
        found: "an unknown variable".into(),
    }
}

/// Runs an in-place byte collective on `flat` converted to `dtype` (rounded to nearest even,
/// as Candle's `to_dtype`), and returns the result as FP32. F32 buffers go through as they
/// are, without a copy.
pub(crate) fn exchange_in_dtype(
    dtype: DType,
    mut flat: Vec<f32>,
    collective: impl FnOnce(&mut [u8]) -> std::result::Result<(), crate::error::CommError>,
) -> Result<Vec<f32>> {
    match dtype {
        DType::BF16 => {
            let mut half: Vec<bf16> = flat.iter().map(|&v| bf16::from_f32(v)).collect();
            collective(bytemuck::cast_slice_mut(&mut half))?;
            flat.iter_mut().zip(&half).for_each(|(o, h)| *o = h.to_f32());
        }
        DType::F16 => {
            let mut half: Vec<f16> = flat.iter().map(|&v| f16::from_f32(v)).collect();
            collective(bytemuck::cast_slice_mut(&mut half))?;
            flat.iter_mut().zip(&half).for_each(|(o, h)| *o = h.to_f32());
        }
        // F32, and F64 stepped on FP32 values as the single-device updater does.
        _ => collective(bytemuck::cast_slice_mut(&mut flat))?,
    }
    Ok(flat)
}

impl Updater for ZeroUpdater {
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn accumulate(&mut self, gradients: &SegmentGradients) -> candle_train::Result<()> {
        if let Some(device) = &mut self.device {
            device.accumulate(self.comm.as_ref(), gradients)?;
            if let Some(shards) = &self.shards {
                lock(shards).after_backward(gradients.segment)?;
            }
            return Ok(());
        }
        if self.stage == ZeroStage::Stage2 {
            return self.accumulate_sharded(gradients);
        }
        if let Some(shards) = self.shards.clone() {
            self.accumulate_sharded(gradients)?;
            return Ok(lock(&shards).after_backward(gradients.segment)?);
        }
        for g in &gradients.gradients {
            let Some(&(group, entry)) = self.index.get(&g.id) else {
                return Err(unknown(&g.name));
            };
            if self.off_host {
                self.transfers.gradients += 4 * entry.len as u64;
            }
            let acc = &mut self.groups[group].grads[entry.offset..entry.offset + entry.len];
            with_f32_values(&g.grad, |values| {
                acc.iter_mut().zip(values).for_each(|(a, &v)| *a += v);
            })?;
        }
        Ok(())
    }

    fn step(&mut self, lr: f64, max_grad_norm: Option<f64>) -> candle_train::Result<StepReport> {
        if let Some(device) = &mut self.device {
            return Ok(device.step(self.comm.as_ref(), &mut self.transfers, lr, max_grad_norm)?);
        }
        self.reduce()?;
        let local: f64 = self
            .groups
            .iter()
            .flat_map(|g| &g.grads[g.owned.start - g.grads_offset..g.owned.end - g.grads_offset])
            .map(|&v| (v as f64) * (v as f64))
            .sum();
        let grad_norm = self.global_sum(local)?.sqrt();
        if !grad_norm.is_finite() {
            self.zero_grad();
            return Ok(StepReport { grad_norm, stepped: false, clip_coef: 1.0 });
        }
        let clip = candle_train::updater::clip_factor(grad_norm, max_grad_norm);
        if let Some(coef) = clip {
            let c = coef as f32;
            for g in &mut self.groups {
                let owned = g.owned.start - g.grads_offset..g.owned.end - g.grads_offset;
                g.grads[owned].iter_mut().for_each(|v| *v *= c);
            }
        }
        let clip_coef = clip.unwrap_or(1.0);
        self.optimizer.begin_step();
        let mut shards = self.shards.as_ref().map(|s| lock(s));
        let mut slices = match shards.as_mut() {
            Some(shards) => Some(shards.host_slices_mut()?),
            None => None,
        };
        for (k, piece) in self.pieces.iter().enumerate() {
            let group = &mut self.groups[piece.group];
            let grad = &group.grads[group.owned.start - group.grads_offset..][piece.owned_range.clone()];
            let optimizer = &mut self.optimizer;
            if let Some(slices) = slices.as_mut() {
                let slice = &mut slices[piece.group][piece.owned_range.clone()];
                optimizer.update(k, slice, grad, lr, piece.decay)?;
                continue;
            }
            match &mut group.master {
                Some(master) => {
                    optimizer.update(k, &mut master[piece.owned_range.clone()], grad, lr, piece.decay)?
                }
                None => {
                    if self.off_host {
                        // The whole parameter down and back up.
                        self.transfers.parameters += 8 * self.params[piece.param].elem_count() as u64;
                    }
                    let mut outcome = Ok(());
                    update_f32_in_place(self.params[piece.param].var()?, |values| {
                        outcome =
                            optimizer.update(k, &mut values[piece.param_range.clone()], grad, lr, piece.decay)
                    })?;
                    outcome?;
                }
            }
        }
        drop(shards);
        self.publish()?;
        self.zero_grad();
        Ok(StepReport { grad_norm, stepped: true, clip_coef })
    }

    fn unscale(&mut self, inv_scale: f32) -> candle_train::Result<bool> {
        if let Some(device) = &mut self.device {
            return Ok(device.unscale(self.comm.as_ref(), &mut self.transfers, inv_scale)?);
        }
        self.reduce()?;
        let mut found_inf = false;
        for g in &mut self.groups {
            let owned = g.owned.start - g.grads_offset..g.owned.end - g.grads_offset;
            found_inf |= unscale_slice(&mut g.grads[owned], inv_scale);
        }
        // One decision for every rank, even where only one rank's slice overflowed.
        let mut flag = [f64::from(u8::from(found_inf))];
        self.comm.all_reduce_f64(&mut flag).map_err(Error::from)?;
        Ok(flag[0] > 0.0)
    }

    fn zero_grad(&mut self) {
        if let Some(device) = &mut self.device {
            device.zero_grad();
        }
        self.groups.iter_mut().for_each(|g| g.grads.fill(0.0));
        self.pending.clear();
        self.staging.clear();
        self.reduced = false;
    }

    fn optimizer(&self) -> &dyn Optimizer {
        match &self.device {
            Some(device) => device.optimizer(),
            None => self.optimizer.as_ref(),
        }
    }

    fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        match &mut self.device {
            Some(device) => device.optimizer_mut(),
            None => self.optimizer.as_mut(),
        }
    }

    fn sharded_checkpoints(&self) -> bool {
        true
    }

    fn save_sharded(
        &mut self,
        run_dir: &Path,
        keep: usize,
        params: &Parameters,
        progress: Progress,
        run: RunIdentity,
    ) -> candle_train::Result<PathBuf> {
        let pieces = self.checkpoint_pieces();
        // A rank that cannot build its pieces still takes part (with none), so that every rank
        // fails together instead of waiting for it.
        let (pieces, local_error) = match pieces {
            Ok(p) => (p, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let mut flag = [f64::from(u8::from(local_error.is_some()))];
        self.comm.all_reduce_f64(&mut flag).map_err(Error::from)?;
        if let Some(e) = local_error {
            return Err(e.into());
        }
        if flag[0] > 0.0 {
            return Err(candle_train::Error::config("checkpoint", "another rank could not export its state"));
        }
        let info = ShardedInfo {
            stage: self.stage as u8,
            optimizer: Updater::optimizer(self).name().to_string(),
            optimizer_step: Updater::optimizer(self).step_count(),
        };
        Ok(crate::checkpoint::save(self.comm.as_ref(), run_dir, keep, params, pieces, info, progress, run)?)
    }

    fn restore_sharded(&mut self, checkpoint: &Checkpoint, params: &Parameters) -> candle_train::Result<()> {
        Ok(self.restore_from(checkpoint, params)?)
    }

    /// Host <-> device bytes since the last call: on a GPU the host updater's state is in
    /// host memory, so gradients come down per micro-batch and parameters go up per step (stage
    /// 3: every gather of a segment's parameters), and the NCCL backend stages every
    /// collective through the device. The device-resident stages 0-2 move only scalars.
    fn take_transfers(&mut self) -> Transfers {
        let staged = self.comm.host_staged_bytes();
        let mut transfers = std::mem::take(&mut self.transfers);
        if let Some(shards) = &self.shards {
            transfers.parameters += lock(shards).take_uploaded();
        }
        transfers.collectives += staged.saturating_sub(self.staged_seen);
        self.staged_seen = staged;
        transfers
    }

    fn sum_over_ranks(&mut self, value: f64) -> candle_train::Result<f64> {
        let mut v = [value];
        self.comm.all_reduce_f64(&mut v).map_err(Error::from)?;
        Ok(v[0])
    }

    fn state_bytes(&self) -> StateBytes {
        if let Some(device) = &self.device {
            return device.state_bytes();
        }
        StateBytes {
            gradients: self.groups.iter().map(|g| g.grads.len() * 4).sum(),
            master_weights: self.groups.iter().flat_map(|g| &g.master).map(|m| m.len() * 4).sum::<usize>()
                + self.shards.as_ref().map_or(0, |s| lock(s).slice_bytes()),
            optimizer_state: self.optimizer.state_bytes(),
        }
    }
}
