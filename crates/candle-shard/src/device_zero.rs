//! ZeRO stages 0-3 with every buffer on the parameters' device (issue 16): the FP32 gradient
//! accumulators, the owned slice's FP32 master weights and the optimizer state are tensors
//! there, the optimizer is device-resident (fused kernels on CUDA, the tensor-op path
//! elsewhere) and the collectives take tensors ([`Communicator::all_reduce_tensor`] and
//! friends: NCCL reduces and gathers device memory with no host staging). A step reads back
//! two scalars (the gradient norm's partial sum, and under loss scaling the found-inf probe),
//! which are all-reduced as FP64 values.
//!
//! The semantics are [`crate::zero`]'s, stage for stage: stage 0 all-reduces the gradient and
//! steps everything; stage 1 reduce-scatters once per step and steps the rank's slice; stage 2
//! reduce-scatters each unit during backward, as soon as its gradients are final. After a
//! step, stages 1-2 all-gather the new values in the parameters' dtype. Stage 3 reduces as
//! stage 2 and steps the rank's FP32 slices, which live on the device too (in the
//! `ShardedParameters` the model wrapper gathers from, device to device); the step gathers
//! nothing but the variables that are gathered at that moment. Sharded checkpoints are written
//! in the same format as the host updater's (the pieces copied to the host).
//!
//! [`crate::zero::ZeroUpdater`] holds one of these when built with
//! [`crate::zero::ZeroUpdater::on_device`] (stage 3:
//! [`crate::stage3::ShardedModel::on_device`]), or by default when its parameters live off the
//! CPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle::{DType, Device, Tensor, TensorId};
use candle_ckpt::SegmentGradients;
use candle_train::updater::{StateBytes, Transfers};
use candle_train::{Optimizer, OptimizerConfig, Parameter, StepReport};

use crate::checkpoint::{buffers_by_index, owning_piece, piece_buffers, SavedPiece};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::partition::{FlatEntry, Partition};
use crate::stage3::{lock, ShardedParameters};
use crate::ZeroStage;

/// A piece of a parameter this rank steps; its position is its optimizer index.
struct Owned {
    group: usize,
    param: usize,
    param_range: std::ops::Range<usize>,
    /// Its elements within the group's owned range.
    owned_range: std::ops::Range<usize>,
    decay: bool,
}

pub(crate) struct DeviceZero {
    stage: ZeroStage,
    rank: usize,
    params: Vec<Parameter>,
    index: HashMap<TensorId, (usize, FlatEntry)>,
    partition: Partition,
    device: Device,
    /// Per parameter: the local FP32 gradient summed over micro-batches (stages 0-1), or a
    /// stage-2 gradient whose last contribution has not arrived.
    local: Vec<Option<Tensor>>,
    /// Stage 2: per group, the final gradients of this micro-batch staged so far (by entry).
    staged: HashMap<usize, Vec<Option<Tensor>>>,
    /// Per group: the reduced FP32 gradient of the owned range (1-D), once reduced.
    owned: Vec<Option<Tensor>>,
    /// Per group: the flat elements this rank steps.
    ranges: Vec<std::ops::Range<usize>>,
    pieces: Vec<Owned>,
    /// Per piece: FP32 master values (parameters not held in F32; stage 3 keeps them in its
    /// slices instead).
    master: Vec<Option<Tensor>>,
    /// Stage 3: the rank's FP32 slices (one per flat buffer, on the device), shared with the
    /// model wrapper that gathers from them.
    shards: Option<Arc<Mutex<ShardedParameters>>>,
    optimizer: Box<dyn Optimizer>,
    reduced: bool,
}

fn flat_f32(t: &Tensor) -> candle::Result<Tensor> {
    t.to_dtype(DType::F32)?.flatten_all()
}

/// Stage 3's initial slices: per flat buffer, this rank's shard range of the parameters' FP32
/// values (padding zero), as contiguous 1-D tensors on their device.
pub(crate) fn device_slices(params: &[Parameter], partition: &Partition, rank: usize) -> Result<Vec<Tensor>> {
    let device = params.first().map_or(Device::Cpu, |p| p.device().clone());
    let mut slices = Vec::with_capacity(partition.groups().len());
    for layout in partition.groups() {
        let mut parts = Vec::with_capacity(layout.entries().len() + 1);
        for e in layout.entries() {
            parts.push(flat_f32(params[e.param].var()?.as_tensor())?);
        }
        if layout.padded_len() > layout.len() {
            parts.push(Tensor::zeros(layout.padded_len() - layout.len(), DType::F32, &device)?);
        }
        let shard = layout.shard_range(rank);
        slices.push(Tensor::cat(&parts, 0)?.narrow(0, shard.start, shard.len())?.contiguous()?);
    }
    Ok(slices)
}

impl DeviceZero {
    pub(crate) fn new(
        stage: ZeroStage,
        params: &[Parameter],
        partition: Partition,
        index: HashMap<TensorId, (usize, FlatEntry)>,
        optimizer: &OptimizerConfig,
        rank: usize,
        shards: Option<Arc<Mutex<ShardedParameters>>>,
    ) -> Result<Self> {
        if (stage == ZeroStage::Stage3) != shards.is_some() {
            return Err(Error::config("zero", "internal: stage 3, and only stage 3, steps shared slices"));
        }
        let device = params.first().map_or(Device::Cpu, |p| p.device().clone());
        let mut ranges = Vec::new();
        let mut pieces = Vec::new();
        for (g, layout) in partition.groups().iter().enumerate() {
            match stage {
                ZeroStage::Stage0 => {
                    ranges.push(0..layout.padded_len());
                    for e in layout.entries() {
                        pieces.push(Owned {
                            group: g,
                            param: e.param,
                            param_range: 0..e.len,
                            owned_range: e.offset..e.offset + e.len,
                            decay: params[e.param].rank() >= 2,
                        });
                    }
                }
                _ => {
                    ranges.push(layout.shard_range(rank));
                    for p in layout.pieces(rank) {
                        pieces.push(Owned {
                            group: g,
                            param: p.param,
                            param_range: p.param_range,
                            owned_range: p.shard_range,
                            decay: params[p.param].rank() >= 2,
                        });
                    }
                }
            }
        }
        let piece_value = |o: &Owned| -> candle::Result<Tensor> {
            flat_f32(&params[o.param].tensor()?)?.narrow(0, o.param_range.start, o.param_range.len())
        };
        let master = pieces
            .iter()
            .map(|o| match params[o.param].dtype() {
                _ if shards.is_some() => Ok(None),
                DType::F32 => Ok(None),
                _ => Ok(Some(piece_value(o)?.contiguous()?)),
            })
            .collect::<candle::Result<Vec<_>>>()?;
        let shapes = pieces
            .iter()
            .map(|o| Tensor::zeros(o.param_range.len(), DType::F32, &device))
            .collect::<candle::Result<Vec<_>>>()?;
        // 8-bit AdamW decides 8-bit or 32-bit state per original parameter.
        let originals: Vec<usize> = pieces.iter().map(|o| params[o.param].elem_count()).collect();
        let optimizer = optimizer.build_pieces_on_device(&shapes.iter().collect::<Vec<_>>(), &originals)?;
        Ok(Self {
            stage,
            rank,
            params: params.to_vec(),
            index,
            device,
            local: vec![None; params.len()],
            staged: HashMap::new(),
            owned: vec![None; partition.groups().len()],
            ranges,
            partition,
            pieces,
            master,
            shards,
            optimizer,
            reduced: false,
        })
    }

    pub(crate) fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    pub(crate) fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        self.optimizer.as_mut()
    }

    /// The group's flat FP32 buffer (padding zero) from per-entry gradients.
    fn flat(&self, group: usize, grad: impl Fn(&FlatEntry) -> Option<Tensor>) -> Result<Tensor> {
        let layout = &self.partition.groups()[group];
        let mut parts = Vec::with_capacity(layout.entries().len() + 1);
        for e in layout.entries() {
            parts.push(match grad(e) {
                Some(g) => g.flatten_all()?,
                None => Tensor::zeros(e.len, DType::F32, &self.device)?,
            });
        }
        if layout.padded_len() > layout.len() {
            parts.push(Tensor::zeros(layout.padded_len() - layout.len(), DType::F32, &self.device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    pub(crate) fn accumulate(&mut self, comm: &dyn Communicator, gradients: &SegmentGradients) -> Result<()> {
        let mut completed = Vec::new();
        for g in &gradients.gradients {
            let Some(&(group, entry)) = self.index.get(&g.id) else {
                return Err(Error::Train(candle_train::Error::StateMismatch {
                    name: g.name.clone(),
                    expected: "a parameter known to the updater".into(),
                    found: "an unknown variable".into(),
                }));
            };
            let grad = g.grad.to_dtype(DType::F32)?;
            let sum = match self.local[entry.param].take() {
                Some(earlier) => (earlier + grad)?,
                None => grad,
            };
            if !self.reduces_per_unit() || !g.is_final {
                self.local[entry.param] = Some(sum);
                continue;
            }
            let layout = &self.partition.groups()[group];
            let position = layout.entries().iter().position(|e| e.param == entry.param).unwrap_or(0);
            let staged = self.staged.entry(group).or_insert_with(|| vec![None; layout.entries().len()]);
            staged[position] = Some(sum);
            if staged.iter().all(Option::is_some) {
                completed.push(group);
            }
        }
        for group in completed {
            self.reduce_scatter_staged(comm, group)?;
        }
        Ok(())
    }

    /// Stage 2: reduce-scatters a unit's staged gradients into the rank's accumulator.
    fn reduce_scatter_staged(&mut self, comm: &dyn Communicator, group: usize) -> Result<()> {
        let Some(staged) = self.staged.remove(&group) else { return Ok(()) };
        let entries = self.partition.groups()[group].entries().to_vec();
        let flat = self.flat(group, |e| {
            entries.iter().position(|x| x.param == e.param).and_then(|i| staged[i].clone())
        })?;
        let mine = comm.reduce_scatter_tensor(&flat)?;
        self.owned[group] = Some(match self.owned[group].take() {
            Some(acc) => (acc + mine)?,
            None => mine,
        });
        Ok(())
    }

    /// Stages 2 and 3 reduce-scatter each unit's gradients during backward.
    fn reduces_per_unit(&self) -> bool {
        matches!(self.stage, ZeroStage::Stage2 | ZeroStage::Stage3)
    }

    fn reduce(&mut self, comm: &dyn Communicator) -> Result<()> {
        if self.reduces_per_unit() {
            // Units never completed (a parameter no segment lists a final gradient for),
            // flushed in group order on every rank alike.
            let mut incomplete: Vec<usize> = self.staged.keys().copied().collect();
            incomplete.sort_unstable();
            for group in incomplete {
                self.reduce_scatter_staged(comm, group)?;
            }
            // Gradients held back as not final (none in a well-formed model) count too.
            if self.local.iter().any(Option::is_some) {
                for group in 0..self.partition.groups().len() {
                    let local = std::mem::take(&mut self.local);
                    let flat = self.flat(group, |e| local[e.param].clone())?;
                    self.local = local;
                    let mine = comm.reduce_scatter_tensor(&flat)?;
                    self.owned[group] = Some(match self.owned[group].take() {
                        Some(acc) => (acc + mine)?,
                        None => mine,
                    });
                }
                self.local.iter_mut().for_each(|l| *l = None);
            }
            return Ok(());
        }
        if self.reduced {
            return Ok(());
        }
        for group in 0..self.partition.groups().len() {
            let flat = self.flat(group, |e| self.local[e.param].clone())?;
            self.owned[group] = Some(match self.stage {
                ZeroStage::Stage0 => comm.all_reduce_tensor(&flat)?,
                _ => comm.reduce_scatter_tensor(&flat)?,
            });
        }
        self.local.iter_mut().for_each(|l| *l = None);
        self.reduced = true;
        Ok(())
    }

    /// The owned gradient of `group` (zeros when nothing arrived).
    fn owned_grad(&self, group: usize) -> Result<Tensor> {
        match &self.owned[group] {
            Some(g) => Ok(g.clone()),
            None => Ok(Tensor::zeros(self.ranges[group].len(), DType::F32, &self.device)?),
        }
    }

    /// The sum over this rank's owned gradients of `f(g)` (scalars), read back as one f64.
    fn owned_sum(
        &self,
        transfers: &mut Transfers,
        f: impl Fn(&Tensor) -> candle::Result<Tensor>,
    ) -> Result<f64> {
        let total = candle_train::updater::sum_scalars_f64(self.owned.iter().flatten(), f)?;
        Ok(candle_train::updater::read_scalar(total.as_ref(), transfers)?)
    }

    pub(crate) fn unscale(
        &mut self,
        comm: &dyn Communicator,
        transfers: &mut Transfers,
        inv_scale: f32,
    ) -> Result<bool> {
        self.reduce(comm)?;
        for g in self.owned.iter_mut().flatten() {
            *g = g.affine(f64::from(inv_scale), 0.0)?;
        }
        // `x * 0` is NaN exactly for inf and NaN: one decision for every rank.
        let probe = self.owned_sum(transfers, |g| g.affine(0.0, 0.0)?.sum_all())?;
        let mut flag = [f64::from(u8::from(!probe.is_finite()))];
        comm.all_reduce_f64(&mut flag)?;
        Ok(flag[0] > 0.0)
    }

    pub(crate) fn step(
        &mut self,
        comm: &dyn Communicator,
        transfers: &mut Transfers,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> Result<StepReport> {
        self.reduce(comm)?;
        // FP64 squares, as the host updater sums them: the norm does not depend on the split.
        let local = self.owned_sum(transfers, candle_train::updater::sum_of_squares_f64)?;
        let sum_sq = if self.stage == ZeroStage::Stage0 {
            local
        } else {
            let mut v = [local];
            comm.all_reduce_f64(&mut v)?;
            v[0]
        };
        let grad_norm = sum_sq.sqrt();
        if !grad_norm.is_finite() {
            self.zero_grad();
            return Ok(StepReport { grad_norm, stepped: false, clip_coef: 1.0 });
        }
        let clip = candle_train::updater::clip_factor(grad_norm, max_grad_norm);
        if let Some(coef) = clip {
            let c = f64::from(coef as f32);
            for g in self.owned.iter_mut().flatten() {
                *g = g.affine(c, 0.0)?;
            }
        }
        let clip_coef = clip.unwrap_or(1.0);
        self.optimizer.begin_step();
        let mut shards = self.shards.as_ref().map(|s| lock(s));
        // Each piece's new FP32 values (its master, a view of its stage-3 slice or of the F32
        // variable).
        let mut values = Vec::with_capacity(self.pieces.len());
        for (k, piece) in self.pieces.iter().enumerate() {
            let grad =
                self.owned_grad(piece.group)?.narrow(0, piece.owned_range.start, piece.owned_range.len())?;
            let current = match (&self.master[k], shards.as_deref()) {
                (Some(master), _) => master.clone(),
                (None, Some(shards)) => shards.device_slices()?[piece.group].narrow(
                    0,
                    piece.owned_range.start,
                    piece.owned_range.len(),
                )?,
                (None, None) => flat_f32(&self.params[piece.param].var()?.as_tensor().detach())?.narrow(
                    0,
                    piece.param_range.start,
                    piece.param_range.len(),
                )?,
            };
            let (new, in_place) = match self.optimizer.update_tensor(k, &current, &grad, lr, piece.decay)? {
                Some(new) => (new, false),
                None => (current, true),
            };
            if self.master[k].is_some() {
                self.master[k] = Some(new.clone());
            }
            values.push((new, in_place));
        }
        match shards.as_deref_mut() {
            Some(shards) => self.publish_slices(shards, &values)?,
            None => self.publish(comm, values)?,
        }
        drop(shards);
        self.zero_grad();
        Ok(StepReport { grad_norm, stepped: true, clip_coef })
    }

    /// Group `g`'s owned range in FP32 from its pieces' values (zero where no piece is: the
    /// padding).
    fn assemble(&self, g: usize, values: &[(Tensor, bool)]) -> Result<Tensor> {
        let owned_len = self.ranges[g].len();
        let mut parts = Vec::new();
        let mut at = 0;
        for (piece, (value, _)) in self.pieces.iter().zip(values).filter(|(p, _)| p.group == g) {
            if piece.owned_range.start > at {
                parts.push(Tensor::zeros(piece.owned_range.start - at, DType::F32, &self.device)?);
            }
            parts.push(value.clone());
            at = piece.owned_range.end;
        }
        if owned_len > at {
            parts.push(Tensor::zeros(owned_len - at, DType::F32, &self.device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Stage 3: the new values become the slices (unless a fused kernel stepped them in
    /// place), and the variables gathered now are gathered again with them.
    fn publish_slices(&self, shards: &mut ShardedParameters, values: &[(Tensor, bool)]) -> Result<()> {
        for g in 0..self.ranges.len() {
            let mut group = self.pieces.iter().zip(values).filter(|(p, _)| p.group == g);
            if group.all(|(_, (_, in_place))| *in_place) {
                continue;
            }
            let slice = self.assemble(g, values)?;
            shards.device_slices_mut()?[g] = slice;
        }
        shards.refresh()
    }

    /// Writes the new values into every rank's parameters: stage 0 directly (every rank
    /// stepped everything), stages 1-2 through an all-gather in the parameters' dtype.
    fn publish(&self, comm: &dyn Communicator, values: Vec<(Tensor, bool)>) -> Result<()> {
        if self.stage == ZeroStage::Stage0 {
            for (k, (piece, (value, in_place))) in self.pieces.iter().zip(&values).enumerate() {
                // An F32 variable a fused step updated in place is already done.
                if *in_place && self.master[k].is_none() {
                    continue;
                }
                let var = self.params[piece.param].var()?;
                var.set(&value.reshape(var.shape())?.to_dtype(var.dtype())?.contiguous()?)?;
            }
            return Ok(());
        }
        for (g, layout) in self.partition.groups().iter().enumerate() {
            let mine = self.assemble(g, &values)?.to_dtype(layout.dtype())?;
            let all = comm.all_gather_tensor(&mine)?;
            for e in layout.entries() {
                let var = self.params[e.param].var()?;
                var.set(&all.narrow(0, e.offset, e.len)?.reshape(var.shape())?.contiguous()?)?;
            }
        }
        Ok(())
    }

    pub(crate) fn zero_grad(&mut self) {
        self.local.iter_mut().for_each(|l| *l = None);
        self.owned.iter_mut().for_each(|o| *o = None);
        self.staged.clear();
        self.reduced = false;
    }

    pub(crate) fn state_bytes(&self) -> StateBytes {
        let gradients = match self.stage {
            // The local accumulators cover every parameter.
            ZeroStage::Stage0 | ZeroStage::Stage1 => self.params.iter().map(|p| p.elem_count() * 4).sum(),
            _ => self.ranges.iter().map(|r| r.len() * 4).sum(),
        };
        let slices = self.shards.as_ref().map_or(0, |s| lock(s).slice_bytes());
        StateBytes {
            gradients,
            master_weights: self.master.iter().flatten().map(|m| m.elem_count() * 4).sum::<usize>() + slices,
            optimizer_state: self.optimizer.state_bytes(),
        }
    }

    /// This rank's pieces of a sharded checkpoint, copied to the host (the host updater's
    /// format: its slice of every flat buffer, with FP32 values and optimizer buffers).
    pub(crate) fn checkpoint_pieces(&self) -> Result<Vec<SavedPiece>> {
        let state = self.optimizer.state()?;
        let buffers = buffers_by_index(&state)?;
        let shards = self.shards.as_ref().map(|s| lock(s));
        let mut out = Vec::new();
        for (g, layout) in self.partition.groups().iter().enumerate() {
            for piece in layout.pieces(self.rank) {
                let owned = self.pieces.iter().map(|o| (o.group, o.param, &o.param_range));
                let (k, offset) = owning_piece(owned, g, &piece)?;
                let o = &self.pieces[k];
                let len = piece.param_range.len();
                let source = match (&self.master[k], shards.as_deref()) {
                    (Some(master), _) => master.clone(),
                    (None, Some(shards)) => {
                        shards.device_slices()?[g].narrow(0, o.owned_range.start, o.owned_range.len())?
                    }
                    (None, None) => flat_f32(self.params[o.param].var()?.as_tensor())?.narrow(
                        0,
                        o.param_range.start,
                        o.param_range.len(),
                    )?,
                };
                let values = source.narrow(0, offset, len)?.to_vec1::<f32>()?;
                let buffers = piece_buffers(&buffers, &state.kind, k, o.param_range.len(), offset, len)?;
                out.push(SavedPiece {
                    name: self.params[piece.param].name.clone(),
                    param_range: piece.param_range,
                    values,
                    buffers,
                });
            }
        }
        Ok(out)
    }

    /// Reads the master weights (stage 3: the slices) again from the parameters (after a
    /// broadcast wrote them, before stage 3 releases them).
    pub(crate) fn reload_masters(&mut self) -> Result<()> {
        if let Some(shards) = &self.shards {
            let slices = device_slices(&self.params, &self.partition, self.rank)?;
            *lock(shards).device_slices_mut()? = slices;
        }
        for (k, piece) in self.pieces.iter().enumerate() {
            if self.master[k].is_some() {
                let values = flat_f32(self.params[piece.param].var()?.as_tensor())?
                    .narrow(0, piece.param_range.start, piece.param_range.len())?
                    .contiguous()?;
                self.master[k] = Some(values);
            }
        }
        Ok(())
    }

    /// The optimizer pieces as `(param, param_range)`, in optimizer order (what a restore
    /// reads).
    pub(crate) fn piece_ranges(&self) -> Vec<(usize, std::ops::Range<usize>)> {
        self.pieces.iter().map(|p| (p.param, p.param_range.clone())).collect()
    }

    /// Restores parameters (whole values; stage 3: the owned pieces' values, in optimizer
    /// order), master weights and optimizer state read from a sharded checkpoint; nothing
    /// changes unless the optimizer accepts its state.
    pub(crate) fn restore(
        &mut self,
        values: &[Vec<f32>],
        piece_values: &[Vec<f32>],
        state: &candle_train::optim::OptimizerState,
    ) -> Result<()> {
        self.optimizer.load_state(state)?;
        if let Some(shards) = &self.shards {
            let pieces = piece_values
                .iter()
                .map(|v| Ok((Tensor::from_slice(v, v.len(), &self.device)?, false)))
                .collect::<Result<Vec<_>>>()?;
            let mut shards = lock(shards);
            for g in 0..self.ranges.len() {
                let slice = self.assemble(g, &pieces)?;
                shards.device_slices_mut()?[g] = slice;
            }
            shards.refresh()?;
            drop(shards);
            self.zero_grad();
            return Ok(());
        }
        for (p, v) in self.params.iter().zip(values) {
            let t = Tensor::from_slice(v, p.shape(), &self.device)?.to_dtype(p.dtype())?;
            p.var()?.set(&t)?;
        }
        for (k, piece) in self.pieces.iter().enumerate() {
            if self.master[k].is_some() {
                let v = &values[piece.param][piece.param_range.clone()];
                self.master[k] = Some(Tensor::from_slice(v, v.len(), &self.device)?);
            }
        }
        self.zero_grad();
        Ok(())
    }
}
