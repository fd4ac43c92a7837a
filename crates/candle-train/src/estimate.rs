//! Predicts a GPT training step's memory, by the categories of [`MemoryReport`], from shapes and
//! settings alone: no tensor is allocated and no model is built.
//!
//! # What is predicted
//!
//! The Trainer measures, per step, the peak of the counting allocator since the step started;
//! [`MemoryReport::new`] splits it into the model state (parameters in the compute dtype, FP32
//! gradient accumulators, FP32 master weights when the compute dtype is not F32, FP32
//! optimizer state), `other` (what else was live when the step started) and `activations`
//! (everything the step allocated at its peak). [`estimate_memory`] predicts each term:
//!
//! - the model state is arithmetic on [`GptConfig::num_parameters`];
//! - `other` is the corpus (the training split keeps the file's allocation, the validation
//!   split is copied out of it), the validation batches, the bookkeeping of the model and the
//!   updater, and [`EstimateInput::runtime_bytes`]: scratch memory the process keeps whatever
//!   the model ([`default_runtime_bytes`]);
//! - `activations` come from running one micro-batch *in shadow*: a size-only mirror of the
//!   Candle tensors involved, reference-counted like Candle's, with Candle's `backward` ported
//!   rule by rule, and the model's layers, the recompute engine, the updater's hook and the
//!   batch construction mirrored statement by statement. A shadow tensor knows its shape,
//!   strides and dtype, and holds its storage and (when it tracks gradients) its operands, so
//!   what stays alive and when is what Rust's drop order and Candle's graph retention make of
//!   the same code: kept graphs, recompute inputs, the gradient store's entries and the
//!   graphs those entries retain, custom ops' saved statistics, temporaries inside backward
//!   rules, BF16 matmuls widened to F32. The peak of the shadow heap is the prediction.
//!
//! Accumulation does not change the peak: micro-batches run one after another and their
//! gradients go into the FP32 accumulators, which are model state.
//!
//! The mirror follows the code of [`crate::models::Gpt`], [`crate::layers`] and
//! `candle_ckpt::forward_backward` as they are; a change there that allocates differently
//! needs the same change here (the estimator's test compares with measurements).
//!
//! # What is not modelled
//!
//! Per-tensor bookkeeping (the tensor handle, its shape and strides) is a fixed number of bytes
//! per tensor; hash-map and name allocations are left out; the matmul kernel's per-call
//! packing buffers are not modelled; only
//! [`BackwardMode::Segmented`] is.

use candle::DType;
use candle_ckpt::{Decision, RecomputePolicy, SegmentInfo};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::memory::MemoryReport;
use crate::models::GptConfig;
use crate::optim::OptimizerConfig;
use crate::trainer::{BackwardMode, TrainerConfig};

/// What [`estimate_memory`] needs to know about a training run.
#[derive(Debug, Clone, PartialEq)]
pub struct EstimateInput {
    /// The model's shape.
    pub config: GptConfig,
    /// The dtype of the parameters (F32, BF16, F16 or F64).
    pub dtype: DType,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches per optimizer step (the peak does not depend on it; validated).
    pub accumulation_steps: usize,
    /// The optimizer (AdamW keeps two FP32 moments per parameter, SGD with momentum one).
    pub optimizer: OptimizerConfig,
    /// Keep or recompute, one per segment (`n_layer + 2`), as a [`RecomputePolicy`] decides
    /// on [`gpt_segment_infos`].
    pub decisions: Vec<Decision>,
    /// Length in bytes of the corpus text the run trains on (0 to leave the corpus out of
    /// `other`).
    pub corpus_bytes: usize,
    /// The fraction of the corpus held out for validation (as given to
    /// [`Corpus::from_bytes`](crate::Corpus::from_bytes)).
    pub validation_fraction: f64,
    /// Validation windows the Trainer holds as batches ([`TrainerConfig::eval_windows`]).
    pub eval_windows: usize,
    /// Heap the process holds besides the model, its state and the data, counted in
    /// `other`; [`default_runtime_bytes`] estimates it for this machine.
    pub runtime_bytes: usize,
}

impl EstimateInput {
    /// The input for training `config` in `dtype` as `trainer` says, with `optimizer`, on a
    /// corpus of `corpus_bytes` bytes split with `validation_fraction`. The decisions are
    /// those of `trainer`'s recompute policy; a byte-budget policy decides on the segment
    /// sizes this module estimates ([`estimated_segment_infos`]) instead of measured ones. The
    /// runtime bytes are [`default_runtime_bytes`].
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad model config or a plain-backward trainer (only the
    /// segmented engine is modelled), or the policy's error.
    pub fn for_trainer(
        config: GptConfig,
        dtype: DType,
        trainer: &TrainerConfig,
        optimizer: OptimizerConfig,
        corpus_bytes: usize,
        validation_fraction: f64,
    ) -> Result<Self> {
        if trainer.backward != BackwardMode::Segmented {
            return Err(Error::config("backward", "the memory estimate models the segmented backward only"));
        }
        let (micro_batch, seq_len) = (trainer.micro_batch.get(), trainer.seq_len.get());
        let infos = if trainer.recompute.needs_sizes() {
            estimated_segment_infos(&config, dtype, micro_batch, seq_len)?
        } else {
            gpt_segment_infos(&config)
        };
        Ok(Self {
            config,
            dtype,
            micro_batch,
            seq_len,
            accumulation_steps: trainer.accumulation_steps.get(),
            optimizer,
            decisions: trainer.recompute.decide(&infos)?,
            corpus_bytes,
            validation_fraction,
            eval_windows: trainer.eval_windows,
            runtime_bytes: default_runtime_bytes(),
        })
    }
}

/// One segment's share of the activations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentEstimate {
    /// The segment's name (`embedding`, `h.{i}`, `head`).
    pub name: String,
    /// Whether it is a transformer block.
    pub is_block: bool,
    /// Whether the decisions recompute it.
    pub recomputed: bool,
    /// Bytes its kept graph holds: what [`candle_ckpt::measure_segments`] measures as
    /// `activation_bytes`.
    pub activation_bytes: usize,
    /// Bytes of its input (what a recomputed segment keeps instead of its graph).
    pub input_bytes: usize,
    /// The most bytes the step holds above its start while this segment's backward runs.
    pub backward_peak_bytes: usize,
}

/// A predicted training step's memory, by the categories of [`MemoryReport`], with the
/// activations broken down per segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Model parameters in their dtype.
    pub parameters: usize,
    /// FP32 gradient accumulators.
    pub gradients: usize,
    /// FP32 master weights (zero for F32 parameters).
    pub master_weights: usize,
    /// Optimizer state.
    pub optimizer_state: usize,
    /// Peak bytes the step allocates above its starting level.
    pub activations: usize,
    /// Live bytes at the step's start outside the model state (data, bookkeeping, runtime).
    pub other: usize,
    /// The step's peak live bytes: the sum of the categories above.
    pub peak: usize,
    /// Per segment, in order.
    pub segments: Vec<SegmentEstimate>,
}

impl MemoryEstimate {
    /// The estimate as a [`MemoryReport`], to compare with a measured one.
    pub fn report(&self) -> MemoryReport {
        MemoryReport {
            parameters: self.parameters,
            gradients: self.gradients,
            master_weights: self.master_weights,
            optimizer_state: self.optimizer_state,
            activations: self.activations,
            other: self.other,
            peak: self.peak,
            transfers: Default::default(),
        }
    }

    /// The segments as recompute policies see them, with the estimated sizes filled in (what
    /// [`candle_ckpt::Recompute::Budget`] needs).
    pub fn segment_infos(&self) -> Vec<SegmentInfo> {
        self.segments
            .iter()
            .map(|s| SegmentInfo {
                name: s.name.clone(),
                is_block: s.is_block,
                activation_bytes: Some(s.activation_bytes),
                input_bytes: Some(s.input_bytes),
            })
            .collect()
    }
}

/// The segments of a [`Gpt`](crate::Gpt) of this shape as [`candle_ckpt::segment_infos`]
/// reports them for the model (`embedding`, `h.{i}`, `head`; the blocks are the middle
/// ones), without building it: `policy.decide(&gpt_segment_infos(&config))`.
pub fn gpt_segment_infos(config: &GptConfig) -> Vec<SegmentInfo> {
    let n = config.n_layer;
    (0..n + 2)
        .map(|i| SegmentInfo {
            name: segment_name(i, n),
            is_block: i > 0 && i <= n,
            activation_bytes: None,
            input_bytes: None,
        })
        .collect()
}

/// [`gpt_segment_infos`] with each segment's activation and input bytes estimated for a
/// micro-batch of `micro_batch` sequences of `seq_len` tokens with parameters in `dtype` (what
/// [`candle_ckpt::measure_segments`] would measure), so that a byte-budget policy can decide
/// without running the model.
///
/// # Errors
/// [`Error::InvalidConfig`] for a bad model config, a zero batch size or sequence length, or a
/// non-float dtype; [`Error::SequenceTooLong`].
pub fn estimated_segment_infos(
    config: &GptConfig,
    dtype: DType,
    micro_batch: usize,
    seq_len: usize,
) -> Result<Vec<SegmentInfo>> {
    check_shape(config, dtype, micro_batch, seq_len)?;
    let heap = shadow::Heap::new(dtype);
    let model = shadow::Gpt::new(&heap, config, dtype);
    let batch = shadow::Batch::new(&heap, micro_batch, seq_len);
    let sizes = shadow::measure_segments(&model, &batch);
    Ok(gpt_segment_infos(config)
        .into_iter()
        .zip(sizes)
        .map(|(info, (activation, input))| SegmentInfo {
            activation_bytes: Some(activation),
            input_bytes: Some(input),
            ..info
        })
        .collect())
}

/// Heap the process keeps besides the model, its state and the data, estimated for this
/// machine: Candle's CPU matmul (the `gemm` crate) gives every thread that runs one a
/// scratch buffer the size of the L2 cache, kept for the thread's life. With Candle's thread
/// count `n` above 1 (`RAYON_NUM_THREADS`, else the cores), that is the `n` worker threads and
/// the calling thread (which runs the small matmuls itself); with one thread, the calling
/// thread alone. The L2 size is read from `/sys/devices/system/cpu/cpu0/cache` (1 MiB where
/// that cannot be read).
pub fn default_runtime_bytes() -> usize {
    let threads = candle::utils::get_num_threads();
    let buffers = if threads > 1 { threads + 1 } else { 1 };
    buffers * l2_cache_bytes().unwrap_or(1 << 20)
}

fn l2_cache_bytes() -> Option<usize> {
    for index in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{index}");
        let read = |file: &str| std::fs::read_to_string(format!("{dir}/{file}")).ok();
        let Some(level) = read("level") else { break };
        if level.trim() != "2" || read("type").is_some_and(|t| t.trim() == "Instruction") {
            continue;
        }
        let size = read("size")?;
        let size = size.trim();
        let split = size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len());
        let (digits, unit) = size.split_at(split);
        let multiplier = match unit {
            "" => 1,
            "K" => 1 << 10,
            "M" => 1 << 20,
            _ => return None,
        };
        return digits.parse::<usize>().ok().map(|n| n * multiplier);
    }
    None
}

fn segment_name(index: usize, n_layer: usize) -> String {
    match index {
        0 => "embedding".into(),
        i if i <= n_layer => format!("h.{}", i - 1),
        _ => "head".into(),
    }
}

fn check_shape(config: &GptConfig, dtype: DType, micro_batch: usize, seq_len: usize) -> Result<()> {
    config.validate()?;
    if micro_batch == 0 {
        return Err(Error::config("micro_batch", "must be at least 1"));
    }
    if seq_len == 0 {
        return Err(Error::config("seq_len", "must be at least 1"));
    }
    if seq_len > config.n_ctx {
        return Err(Error::SequenceTooLong { seq_len, context: config.n_ctx });
    }
    if !dtype.is_float() {
        return Err(Error::config("dtype", format!("{dtype:?} is not a float dtype to train in")));
    }
    Ok(())
}

/// Predicts the memory of one training step of `input`.
///
/// # Errors
/// [`Error::InvalidConfig`] for a bad model config, a zero batch size, sequence length or
/// accumulation count, a non-float dtype, decisions that are not one per segment or that
/// recompute the last segment, a validation fraction outside (0, 1) or a bad optimizer
/// config; [`Error::SequenceTooLong`].
pub fn estimate_memory(input: &EstimateInput) -> Result<MemoryEstimate> {
    let config = &input.config;
    check_shape(config, input.dtype, input.micro_batch, input.seq_len)?;
    if input.accumulation_steps == 0 {
        return Err(Error::config("accumulation_steps", "must be at least 1"));
    }
    let n = config.n_layer + 2;
    if input.decisions.len() != n {
        return Err(Error::config(
            "decisions",
            format!("{} decisions given for a model of {n} segments", input.decisions.len()),
        ));
    }
    if input.decisions[n - 1] == Decision::Recompute {
        return Err(Error::config("decisions", "the last segment (the loss) is always kept"));
    }
    if !(input.validation_fraction > 0.0 && input.validation_fraction < 1.0) {
        return Err(Error::config(
            "validation_fraction",
            format!("{} is not in (0, 1)", input.validation_fraction),
        ));
    }
    let params = config.num_parameters();
    let parameters = params * input.dtype.size_in_bytes();
    let gradients = params * 4;
    let master_weights = if input.dtype == DType::F32 { 0 } else { params * 4 };
    let optimizer_state = match &input.optimizer {
        OptimizerConfig::AdamW(c) => {
            c.validate()?;
            params * 8
        }
        OptimizerConfig::AdamW8bit(c) => {
            c.validate()?;
            crate::optim::AdamW8bit::state_bytes_for(&config.parameter_sizes())
        }
        OptimizerConfig::Sgd(c) if c.momentum > 0.0 => params * 4,
        OptimizerConfig::Sgd(_) => 0,
    };

    let heap = shadow::Heap::new(input.dtype);
    let model = shadow::Gpt::new(&heap, config, input.dtype);
    let sizes = {
        let batch = shadow::Batch::new(&heap, input.micro_batch, input.seq_len);
        shadow::measure_segments(&model, &batch)
    };
    heap.reset_peak();
    let multiplier = 1.0 / input.accumulation_steps as f64;
    let backward_peaks =
        shadow::train_micro_batch(&model, input.micro_batch, input.seq_len, &input.decisions, multiplier);
    let activations = heap.peak();

    let segments = sizes
        .into_iter()
        .zip(backward_peaks)
        .enumerate()
        .map(|(i, ((activation_bytes, input_bytes), backward_peak_bytes))| SegmentEstimate {
            name: segment_name(i, config.n_layer),
            is_block: i > 0 && i + 1 < n,
            recomputed: input.decisions[i] == Decision::Recompute,
            activation_bytes,
            input_bytes,
            backward_peak_bytes,
        })
        .collect();
    let other = other_bytes(input);
    Ok(MemoryEstimate {
        parameters,
        gradients,
        master_weights,
        optimizer_state,
        activations,
        other,
        peak: parameters + gradients + master_weights + optimizer_state + activations + other,
        segments,
    })
}

/// Bookkeeping bytes per parameter tensor (its name, handle, the updater's index entry and
/// the model's segment lists).
const BYTES_PER_PARAMETER_TENSOR: usize = 660;
/// Bookkeeping bytes of the model, trainer and updater structures.
const BYTES_FIXED: usize = 46 << 10;
/// Heap bookkeeping of one tensor handle (the shared tensor, its shape and strides).
const BYTES_PER_TENSOR: usize = 240;

fn other_bytes(input: &EstimateInput) -> usize {
    let (len, t) = (input.corpus_bytes, input.seq_len);
    let (corpus, windows) = if len == 0 {
        (0, 0)
    } else {
        let n_val = ((len as f64 * input.validation_fraction).round() as usize).clamp(1, len);
        // The training split keeps the file's allocation; the validation split is a copy.
        let available = n_val.saturating_sub(1) / t;
        (len + n_val, available.min(input.eval_windows).max(1))
    };
    let batches = windows.div_ceil(input.micro_batch);
    let val_batches = windows * t * 8 + batches * 2 * BYTES_PER_TENSOR;
    let tensors = 12 * input.config.n_layer + 4;
    corpus + val_batches + tensors * BYTES_PER_PARAMETER_TENSOR + BYTES_FIXED + input.runtime_bytes
}

/// A size-only mirror of the Candle tensors, autograd, layers and engine a training step
/// uses. Every allocation is counted on a [`Heap`]; nothing holds data.
mod shadow {
    use std::cell::Cell;
    use std::collections::HashMap;
    use std::rc::Rc;

    use candle::DType;
    use candle_ckpt::Decision;

    use super::BYTES_PER_TENSOR;
    use crate::models::GptConfig;

    /// Live and peak bytes of the shadow heap.
    #[derive(Debug)]
    pub(super) struct Heap {
        live: Cell<usize>,
        peak: Cell<usize>,
        /// The peak since the last [`Heap::mark`].
        mark_peak: Cell<usize>,
        ids: Cell<usize>,
        /// Candle's CPU BF16 matmul widens both operands' storages to F32.
        widening_matmul: bool,
    }

    impl Heap {
        pub(super) fn new(dtype: DType) -> Rc<Self> {
            Rc::new(Self {
                live: Cell::new(0),
                peak: Cell::new(0),
                mark_peak: Cell::new(0),
                ids: Cell::new(0),
                widening_matmul: dtype == DType::BF16,
            })
        }

        fn alloc(&self, bytes: usize) {
            let now = self.live.get() + bytes;
            self.live.set(now);
            self.touch(0);
        }

        fn free(&self, bytes: usize) {
            self.live.set(self.live.get().saturating_sub(bytes));
        }

        /// A transient `extra` bytes above the live level.
        fn touch(&self, extra: usize) {
            let now = self.live.get() + extra;
            self.peak.set(self.peak.get().max(now));
            self.mark_peak.set(self.mark_peak.get().max(now));
        }

        pub(super) fn peak(&self) -> usize {
            self.peak.get()
        }

        pub(super) fn reset_peak(&self) {
            self.peak.set(self.live.get());
        }

        /// Starts a sub-measurement of the peak.
        fn mark(&self) {
            self.mark_peak.set(self.live.get());
        }

        fn mark_peak(&self) -> usize {
            self.mark_peak.get()
        }

        fn live(&self) -> usize {
            self.live.get()
        }

        fn id(&self) -> usize {
            let id = self.ids.get() + 1;
            self.ids.set(id);
            id
        }
    }

    /// An allocation on the shadow heap, freed when dropped (a counted block) or never counted (model
    /// state, allocated before the step).
    struct Alloc {
        heap: Rc<Heap>,
        bytes: usize,
        counted: bool,
    }

    impl Alloc {
        fn new(heap: &Rc<Heap>, bytes: usize) -> Self {
            heap.alloc(bytes);
            Self { heap: heap.clone(), bytes, counted: true }
        }

        fn uncounted(heap: &Rc<Heap>, bytes: usize) -> Self {
            Self { heap: heap.clone(), bytes, counted: false }
        }
    }

    impl Drop for Alloc {
        fn drop(&mut self) {
            if self.counted {
                self.heap.free(self.bytes);
            }
        }
    }

    /// A host vector (a `Vec` the code allocates besides tensors).
    fn host(heap: &Rc<Heap>, bytes: usize) -> Alloc {
        Alloc::new(heap, bytes)
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum BinaryOp {
        Add,
        Sub,
        Mul,
        Div,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum UnaryOp {
        Exp,
        Log,
        Sqr,
        Sqrt,
        Recip,
        Neg,
        Powf(f64),
    }

    type Bwd1 = Rc<dyn Fn(&Tensor, &Tensor, &Tensor) -> Option<Tensor>>;
    type Bwd2 = Rc<dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> (Option<Tensor>, Option<Tensor>)>;
    type Bwd3 = Rc<
        dyn Fn(
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
            &Tensor,
        ) -> (Option<Tensor>, Option<Tensor>, Option<Tensor>),
    >;

    /// A recorded op: its operands (kept alive) and what its backward needs.
    #[derive(Clone)]
    enum Op {
        Binary(Tensor, Tensor, BinaryOp),
        Unary(Tensor, UnaryOp),
        Affine(Tensor, f64),
        Matmul(Tensor, Tensor),
        ToDType(Tensor),
        /// A sum, with the kept-dims shape of its result.
        Sum(Tensor, Vec<usize>),
        Max(Tensor),
        Broadcast(Tensor),
        Reshape(Tensor),
        Transpose(Tensor, usize, usize),
        Narrow(Tensor, usize, usize, usize),
        Copy(Tensor),
        IndexSelect(Tensor, Tensor, usize),
        Gather(Tensor, Tensor, usize),
        /// Ops that never appear in a graph walked backward (they only keep their operands).
        Other(Vec<Tensor>),
        Custom1(Tensor, Bwd1),
        Custom2(Tensor, Tensor, Bwd2),
        Custom3(Tensor, Tensor, Tensor, Bwd3),
    }

    impl Op {
        /// The operands Candle's `sorted_nodes` walks, in its order.
        fn walked(&self) -> Vec<&Tensor> {
            match self {
                Op::Binary(a, b, _)
                | Op::Matmul(a, b)
                | Op::IndexSelect(a, b, _)
                | Op::Gather(a, b, _)
                | Op::Custom2(a, b, _) => vec![a, b],
                Op::Unary(a, _)
                | Op::Affine(a, _)
                | Op::Sum(a, _)
                | Op::Max(a)
                | Op::Broadcast(a)
                | Op::Reshape(a)
                | Op::Transpose(a, _, _)
                | Op::Narrow(a, _, _, _)
                | Op::Copy(a)
                | Op::Custom1(a, _) => vec![a],
                Op::ToDType(a) => {
                    if a.dtype().is_float() {
                        vec![a]
                    } else {
                        vec![]
                    }
                }
                Op::Other(args) => args.iter().collect(),
                Op::Custom3(a, b, c, _) => vec![a, b, c],
            }
        }
    }

    struct Inner {
        id: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
        offset: usize,
        dtype: DType,
        storage: Rc<Alloc>,
        variable: bool,
        op: Option<Op>,
        _handle: Alloc,
    }

    /// A shadow tensor: a shape, strides and dtype over a shared storage, and the op that made
    /// it when it tracks gradients.
    #[derive(Clone)]
    pub(super) struct Tensor(Rc<Inner>);

    fn contiguous_stride(shape: &[usize]) -> Vec<usize> {
        let mut stride = vec![1; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        stride
    }

    fn elems(shape: &[usize]) -> usize {
        shape.iter().product()
    }

    /// `Some(op)` when an operand tracks gradients (Candle's `BackpropOp::new*`).
    fn record(args: &[&Tensor], op: impl FnOnce() -> Op) -> Option<Op> {
        if args.iter().any(|a| a.track_op()) {
            Some(op())
        } else {
            None
        }
    }

    impl Tensor {
        #[allow(clippy::too_many_arguments)]
        fn make(
            heap: &Rc<Heap>,
            shape: Vec<usize>,
            stride: Vec<usize>,
            offset: usize,
            dtype: DType,
            storage: Rc<Alloc>,
            variable: bool,
            op: Option<Op>,
        ) -> Self {
            Self(Rc::new(Inner {
                id: heap.id(),
                shape,
                stride,
                offset,
                dtype,
                storage,
                variable,
                op,
                _handle: Alloc::new(heap, BYTES_PER_TENSOR),
            }))
        }

        /// A new contiguous tensor on fresh storage.
        fn fresh(heap: &Rc<Heap>, shape: &[usize], dtype: DType, op: Option<Op>) -> Self {
            let storage = Rc::new(Alloc::new(heap, elems(shape) * dtype.size_in_bytes()));
            Self::make(heap, shape.to_vec(), contiguous_stride(shape), 0, dtype, storage, false, op)
        }

        /// A tensor made from host data or filled with a constant (`zeros`, `ones`,
        /// `from_vec`, `arange`): untracked.
        pub(super) fn new(heap: &Rc<Heap>, shape: &[usize], dtype: DType) -> Self {
            Self::fresh(heap, shape, dtype, None)
        }

        /// A parameter: a variable whose storage is model state, not step memory.
        fn parameter(heap: &Rc<Heap>, shape: &[usize], dtype: DType) -> Self {
            let storage = Rc::new(Alloc::uncounted(heap, elems(shape) * dtype.size_in_bytes()));
            Self::make(heap, shape.to_vec(), contiguous_stride(shape), 0, dtype, storage, true, None)
        }

        /// `Var::from_tensor`: a variable on a copy of the storage.
        fn make_var(&self) -> Self {
            let heap = self.heap();
            let storage = Rc::new(Alloc::new(heap, self.elem_count() * self.dtype().size_in_bytes()));
            let shape = self.dims().to_vec();
            Self::make(heap, shape.clone(), contiguous_stride(&shape), 0, self.dtype(), storage, true, None)
        }

        fn heap(&self) -> &Rc<Heap> {
            &self.0.storage.heap
        }

        fn id(&self) -> usize {
            self.0.id
        }

        pub(super) fn dims(&self) -> &[usize] {
            &self.0.shape
        }

        pub(super) fn dtype(&self) -> DType {
            self.0.dtype
        }

        pub(super) fn elem_count(&self) -> usize {
            elems(&self.0.shape)
        }

        fn rank(&self) -> usize {
            self.0.shape.len()
        }

        fn dim(&self, d: usize) -> usize {
            self.0.shape[d]
        }

        fn is_variable(&self) -> bool {
            self.0.variable
        }

        fn track_op(&self) -> bool {
            self.0.variable || self.0.op.is_some()
        }

        fn storage_bytes(&self) -> usize {
            self.0.storage.bytes
        }

        fn is_contiguous(&self) -> bool {
            let mut acc = 1;
            for (&stride, &dim) in self.0.stride.iter().zip(self.0.shape.iter()).rev() {
                if dim > 1 && stride != acc {
                    return false;
                }
                acc *= dim;
            }
            true
        }

        /// A tensor sharing this one's storage.
        fn view(&self, shape: Vec<usize>, stride: Vec<usize>, offset: usize, op: Option<Op>) -> Self {
            Self::make(self.heap(), shape, stride, offset, self.dtype(), self.0.storage.clone(), false, op)
        }

        pub(super) fn detach(&self) -> Self {
            if self.0.op.is_none() && !self.0.variable {
                self.clone()
            } else {
                self.view(self.0.shape.clone(), self.0.stride.clone(), self.0.offset, None)
            }
        }

        pub(super) fn to_dtype(&self, dtype: DType) -> Self {
            if self.dtype() == dtype {
                return self.clone();
            }
            let op = record(&[self], || Op::ToDType(self.clone()));
            Self::fresh(self.heap(), self.dims(), dtype, op)
        }

        pub(super) fn contiguous(&self) -> Self {
            if self.is_contiguous() {
                return self.clone();
            }
            let op = record(&[self], || Op::Copy(self.clone()));
            Self::fresh(self.heap(), self.dims(), self.dtype(), op)
        }

        pub(super) fn reshape(&self, shape: &[usize]) -> Self {
            let op = record(&[self], || Op::Reshape(self.clone()));
            if self.is_contiguous() {
                self.view(shape.to_vec(), contiguous_stride(shape), self.0.offset, op)
            } else {
                Self::fresh(self.heap(), shape, self.dtype(), op)
            }
        }

        pub(super) fn flatten_all(&self) -> Self {
            if self.rank() <= 1 {
                if self.rank() == 0 {
                    return self.reshape(&[1]);
                }
                return self.clone();
            }
            self.reshape(&[self.elem_count()])
        }

        fn squeeze(&self, dim: usize) -> Self {
            if self.dim(dim) != 1 {
                return self.clone();
            }
            let (mut shape, mut stride) = (self.0.shape.clone(), self.0.stride.clone());
            shape.remove(dim);
            stride.remove(dim);
            let op = record(&[self], || Op::Reshape(self.clone()));
            self.view(shape, stride, self.0.offset, op)
        }

        pub(super) fn unsqueeze(&self, dim: usize) -> Self {
            let (mut shape, mut stride) = (self.0.shape.clone(), self.0.stride.clone());
            let s = if dim < stride.len() { stride[dim] } else { 1 };
            shape.insert(dim, 1);
            stride.insert(dim, s);
            let op = record(&[self], || Op::Reshape(self.clone()));
            self.view(shape, stride, self.0.offset, op)
        }

        pub(super) fn transpose(&self, d1: usize, d2: usize) -> Self {
            if d1 == d2 {
                return self.clone();
            }
            let (mut shape, mut stride) = (self.0.shape.clone(), self.0.stride.clone());
            shape.swap(d1, d2);
            stride.swap(d1, d2);
            let op = record(&[self], || Op::Transpose(self.clone(), d1, d2));
            self.view(shape, stride, self.0.offset, op)
        }

        pub(super) fn t(&self) -> Self {
            let r = self.rank();
            self.transpose(r - 2, r - 1)
        }

        pub(super) fn narrow(&self, dim: usize, start: usize, len: usize) -> Self {
            if start == 0 && self.dim(dim) == len {
                return self.clone();
            }
            let mut shape = self.0.shape.clone();
            shape[dim] = len;
            let offset = self.0.offset + start * self.0.stride[dim];
            let op = record(&[self], || Op::Narrow(self.clone(), dim, start, len));
            self.view(shape, self.0.stride.clone(), offset, op)
        }

        pub(super) fn broadcast_as(&self, shape: &[usize]) -> Self {
            let added = shape.len() - self.rank();
            let mut stride = vec![0; added];
            for (i, (&src, &s)) in self.0.shape.iter().zip(&self.0.stride).enumerate() {
                stride.push(if shape[added + i] == src { s } else { 0 });
            }
            let op = record(&[self], || Op::Broadcast(self.clone()));
            self.view(shape.to_vec(), stride, self.0.offset, op)
        }

        fn binary(&self, rhs: &Self, op: BinaryOp) -> Self {
            let recorded = record(&[self, rhs], || Op::Binary(self.clone(), rhs.clone(), op));
            Self::fresh(self.heap(), self.dims(), self.dtype(), recorded)
        }

        pub(super) fn add(&self, rhs: &Self) -> Self {
            self.binary(rhs, BinaryOp::Add)
        }

        pub(super) fn sub(&self, rhs: &Self) -> Self {
            self.binary(rhs, BinaryOp::Sub)
        }

        pub(super) fn mul(&self, rhs: &Self) -> Self {
            self.binary(rhs, BinaryOp::Mul)
        }

        pub(super) fn div(&self, rhs: &Self) -> Self {
            self.binary(rhs, BinaryOp::Div)
        }

        /// Candle's `broadcast_*` ops: broadcast whichever side needs it, then the op.
        fn broadcast_binary(&self, rhs: &Self, op: BinaryOp) -> Self {
            let rank = self.rank().max(rhs.rank());
            let pad = |t: &Self| -> Vec<usize> {
                let mut d = vec![1; rank - t.rank()];
                d.extend_from_slice(t.dims());
                d
            };
            let (l, r) = (pad(self), pad(rhs));
            let shape: Vec<usize> = l.iter().zip(&r).map(|(&a, &b)| a.max(b)).collect();
            match (shape != self.dims(), shape != rhs.dims()) {
                (true, true) => self.broadcast_as(&shape).binary(&rhs.broadcast_as(&shape), op),
                (false, true) => self.binary(&rhs.broadcast_as(&shape), op),
                (true, false) => self.broadcast_as(&shape).binary(rhs, op),
                (false, false) => self.binary(rhs, op),
            }
        }

        pub(super) fn broadcast_add(&self, rhs: &Self) -> Self {
            self.broadcast_binary(rhs, BinaryOp::Add)
        }

        pub(super) fn broadcast_sub(&self, rhs: &Self) -> Self {
            self.broadcast_binary(rhs, BinaryOp::Sub)
        }

        pub(super) fn broadcast_mul(&self, rhs: &Self) -> Self {
            self.broadcast_binary(rhs, BinaryOp::Mul)
        }

        pub(super) fn broadcast_div(&self, rhs: &Self) -> Self {
            self.broadcast_binary(rhs, BinaryOp::Div)
        }

        fn unary(&self, op: UnaryOp) -> Self {
            let recorded = record(&[self], || Op::Unary(self.clone(), op));
            Self::fresh(self.heap(), self.dims(), self.dtype(), recorded)
        }

        pub(super) fn exp(&self) -> Self {
            self.unary(UnaryOp::Exp)
        }

        pub(super) fn log(&self) -> Self {
            self.unary(UnaryOp::Log)
        }

        pub(super) fn sqr(&self) -> Self {
            self.unary(UnaryOp::Sqr)
        }

        pub(super) fn sqrt(&self) -> Self {
            self.unary(UnaryOp::Sqrt)
        }

        pub(super) fn recip(&self) -> Self {
            self.unary(UnaryOp::Recip)
        }

        pub(super) fn neg(&self) -> Self {
            self.unary(UnaryOp::Neg)
        }

        pub(super) fn powf(&self, e: f64) -> Self {
            self.unary(UnaryOp::Powf(e))
        }

        pub(super) fn affine(&self, mul: f64, _add: f64) -> Self {
            let recorded = record(&[self], || Op::Affine(self.clone(), mul));
            Self::fresh(self.heap(), self.dims(), self.dtype(), recorded)
        }

        pub(super) fn sum_keepdim(&self, dims: &[usize]) -> Self {
            let mut shape = self.0.shape.clone();
            for &d in dims {
                shape[d] = 1;
            }
            let kept = shape.clone();
            let recorded = record(&[self], || Op::Sum(self.clone(), kept));
            Self::fresh(self.heap(), &shape, self.dtype(), recorded)
        }

        pub(super) fn sum(&self, dims: &[usize]) -> Self {
            let sum = self.sum_keepdim(dims);
            match dims {
                [] => sum,
                [d] => sum.squeeze(*d),
                _ => {
                    let shape: Vec<usize> = sum
                        .dims()
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !dims.contains(i))
                        .map(|(_, &d)| d)
                        .collect();
                    sum.reshape(&shape)
                }
            }
        }

        pub(super) fn sum_all(&self) -> Self {
            let dims: Vec<usize> = (0..self.rank()).collect();
            self.sum(&dims)
        }

        pub(super) fn max_keepdim(&self, dim: usize) -> Self {
            let mut shape = self.0.shape.clone();
            shape[dim] = 1;
            let recorded = record(&[self], || Op::Max(self.clone()));
            Self::fresh(self.heap(), &shape, self.dtype(), recorded)
        }

        pub(super) fn matmul(&self, rhs: &Self) -> Self {
            let mut shape = self.0.shape.clone();
            let r = shape.len();
            shape[r - 1] = rhs.dim(rhs.rank() - 1);
            let out = elems(&shape) * self.dtype().size_in_bytes();
            let heap = self.heap();
            if heap.widening_matmul && self.dtype() == DType::BF16 {
                // Both storages widened to F32, an F32 result, then the BF16 result.
                heap.touch(2 * (self.storage_bytes() + rhs.storage_bytes() + out) + out);
            }
            let recorded = record(&[self, rhs], || Op::Matmul(self.clone(), rhs.clone()));
            Self::fresh(heap, &shape, self.dtype(), recorded)
        }

        pub(super) fn index_select(&self, ids: &Self, dim: usize) -> Self {
            let mut shape = self.0.shape.clone();
            shape[dim] = ids.elem_count();
            let recorded = record(&[self, ids], || Op::IndexSelect(self.clone(), ids.clone(), dim));
            Self::fresh(self.heap(), &shape, self.dtype(), recorded)
        }

        pub(super) fn index_add(&self, ids: &Self, src: &Self, _dim: usize) -> Self {
            let recorded =
                record(&[self, ids, src], || Op::Other(vec![self.clone(), ids.clone(), src.clone()]));
            Self::fresh(self.heap(), self.dims(), self.dtype(), recorded)
        }

        pub(super) fn gather(&self, ids: &Self, dim: usize) -> Self {
            let recorded = record(&[self, ids], || Op::Gather(self.clone(), ids.clone(), dim));
            Self::fresh(self.heap(), ids.dims(), self.dtype(), recorded)
        }

        pub(super) fn scatter_add(&self, ids: &Self, src: &Self, _dim: usize) -> Self {
            let recorded =
                record(&[self, ids, src], || Op::Other(vec![self.clone(), ids.clone(), src.clone()]));
            Self::fresh(self.heap(), self.dims(), self.dtype(), recorded)
        }

        pub(super) fn zeros_like(&self) -> Self {
            Self::new(self.heap(), self.dims(), self.dtype())
        }

        pub(super) fn ones_like(&self) -> Self {
            Self::new(self.heap(), self.dims(), self.dtype())
        }

        /// `Tensor::cat` of contiguous tensors along `dim`.
        fn cat(args: &[&Self], dim: usize) -> Self {
            let mut shape = args[0].dims().to_vec();
            shape[dim] = args.iter().map(|a| a.dim(dim)).sum();
            let recorded = record(args, || Op::Other(args.iter().map(|a| (*a).clone()).collect()));
            Self::fresh(args[0].heap(), &shape, args[0].dtype(), recorded)
        }
    }

    macro_rules! tensor_ops {
        ($trait:ident, $method:ident, $tensor_fn:ident, $scalar:expr, $scalar_rev:expr) => {
            impl std::ops::$trait<Tensor> for Tensor {
                type Output = Tensor;
                fn $method(self, rhs: Tensor) -> Tensor {
                    Tensor::$tensor_fn(&self, &rhs)
                }
            }
            impl std::ops::$trait<&Tensor> for Tensor {
                type Output = Tensor;
                fn $method(self, rhs: &Tensor) -> Tensor {
                    Tensor::$tensor_fn(&self, rhs)
                }
            }
            impl std::ops::$trait<Tensor> for &Tensor {
                type Output = Tensor;
                fn $method(self, rhs: Tensor) -> Tensor {
                    Tensor::$tensor_fn(&self, &rhs)
                }
            }
            impl std::ops::$trait<&Tensor> for &Tensor {
                type Output = Tensor;
                fn $method(self, rhs: &Tensor) -> Tensor {
                    Tensor::$tensor_fn(&self, rhs)
                }
            }
            impl std::ops::$trait<f64> for Tensor {
                type Output = Tensor;
                fn $method(self, rhs: f64) -> Tensor {
                    let (mul, add): (f64, f64) = $scalar(rhs);
                    self.affine(mul, add)
                }
            }
            impl std::ops::$trait<f64> for &Tensor {
                type Output = Tensor;
                fn $method(self, rhs: f64) -> Tensor {
                    let (mul, add): (f64, f64) = $scalar(rhs);
                    self.affine(mul, add)
                }
            }
            impl std::ops::$trait<Tensor> for f64 {
                type Output = Tensor;
                fn $method(self, rhs: Tensor) -> Tensor {
                    let (mul, add): (f64, f64) = $scalar_rev(self);
                    rhs.affine(mul, add)
                }
            }
            impl std::ops::$trait<&Tensor> for f64 {
                type Output = Tensor;
                fn $method(self, rhs: &Tensor) -> Tensor {
                    let (mul, add): (f64, f64) = $scalar_rev(self);
                    rhs.affine(mul, add)
                }
            }
        };
    }

    tensor_ops!(Add, add, add, |c| (1.0, c), |c| (1.0, c));
    tensor_ops!(Sub, sub, sub, |c: f64| (1.0, -c), |c| (-1.0, c));
    tensor_ops!(Mul, mul, mul, |c| (c, 0.0), |c| (c, 0.0));
    tensor_ops!(Div, div, div, |c: f64| (1.0 / c, 0.0), |c| (1.0 / c, 0.0));

    /// Candle's `custom_grad::custom1..3`: the precomputed value is copied once into the op's
    /// output (`CpuStorage::try_clone`) and released.
    fn custom1(arg: &Tensor, value: Tensor, bwd: Bwd1) -> Tensor {
        if !arg.track_op() {
            return value;
        }
        let out = Tensor::fresh(arg.heap(), value.dims(), value.dtype(), Some(Op::Custom1(arg.clone(), bwd)));
        drop(value);
        out
    }

    fn custom2(a: &Tensor, b: &Tensor, value: Tensor, bwd: Bwd2) -> Tensor {
        if !a.track_op() && !b.track_op() {
            return value;
        }
        let out = Tensor::fresh(
            a.heap(),
            value.dims(),
            value.dtype(),
            Some(Op::Custom2(a.clone(), b.clone(), bwd)),
        );
        drop(value);
        out
    }

    fn custom3(a: &Tensor, b: &Tensor, c: &Tensor, value: Tensor, bwd: Bwd3) -> Tensor {
        if !a.track_op() && !b.track_op() && !c.track_op() {
            return value;
        }
        let op = Op::Custom3(a.clone(), b.clone(), c.clone(), bwd);
        let out = Tensor::fresh(a.heap(), value.dims(), value.dtype(), Some(op));
        drop(value);
        out
    }

    /// Candle's `GradStore`.
    pub(super) struct GradStore(HashMap<usize, Tensor>);

    impl GradStore {
        pub(super) fn get(&self, t: &Tensor) -> Option<&Tensor> {
            self.0.get(&t.id())
        }

        fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
            self.0.remove(&t.id())
        }

        fn or_insert(&mut self, t: &Tensor) -> &mut Tensor {
            self.0.entry(t.id()).or_insert_with(|| t.zeros_like())
        }
    }

    impl Tensor {
        /// Candle's `sorted_nodes`.
        fn sorted_nodes(&self) -> Vec<Tensor> {
            fn walk(node: &Tensor, nodes: &mut Vec<Tensor>, seen: &mut HashMap<usize, bool>) -> bool {
                if let Some(&tracks) = seen.get(&node.id()) {
                    return tracks;
                }
                let mut tracks = false;
                if node.is_variable() {
                    tracks = true;
                } else if node.dtype().is_int() {
                } else if let Some(op) = &node.0.op {
                    for arg in op.walked() {
                        tracks |= walk(arg, nodes, seen);
                    }
                }
                seen.insert(node.id(), tracks);
                if tracks {
                    nodes.push(node.clone());
                }
                tracks
            }
            let mut nodes = Vec::new();
            walk(self, &mut nodes, &mut HashMap::new());
            nodes.reverse();
            nodes
        }

        /// Candle's `backward`, rule by rule for the ops a training step records.
        pub(super) fn backward(&self) -> GradStore {
            let sorted = self.sorted_nodes();
            let mut grads = GradStore(HashMap::new());
            grads.0.insert(self.id(), self.ones_like().contiguous());
            for node in sorted.iter() {
                if node.is_variable() {
                    continue;
                }
                let Some(grad) = grads.remove(node) else { continue };
                let grad = grad.detach();
                let Some(op) = &node.0.op else { continue };
                match op {
                    Op::Binary(lhs, rhs, BinaryOp::Add) => {
                        let s = grads.or_insert(lhs);
                        *s = s.add(&grad);
                        let s = grads.or_insert(rhs);
                        *s = s.add(&grad);
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Sub) => {
                        let s = grads.or_insert(lhs);
                        *s = s.add(&grad);
                        let s = grads.or_insert(rhs);
                        *s = s.sub(&grad);
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Mul) => {
                        let lhs_grad = grad.mul(rhs);
                        let s = grads.or_insert(lhs);
                        *s = s.add(&lhs_grad);
                        let rhs_grad = grad.mul(lhs);
                        let s = grads.or_insert(rhs);
                        *s = s.add(&rhs_grad);
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Div) => {
                        let lhs_grad = grad.div(rhs);
                        let s = grads.or_insert(lhs);
                        *s = s.add(&lhs_grad);
                        let rhs_grad = grad.mul(lhs).div(&rhs.sqr());
                        let s = grads.or_insert(rhs);
                        *s = s.sub(&rhs_grad);
                    }
                    Op::Matmul(lhs, rhs) => {
                        let lhs_grad = grad.matmul(&rhs.t());
                        let s = grads.or_insert(lhs);
                        *s = s.add(&lhs_grad);
                        let rhs_grad = lhs.t().matmul(&grad);
                        let s = grads.or_insert(rhs);
                        *s = s.add(&rhs_grad);
                    }
                    Op::Broadcast(arg) => {
                        let left = node.rank() - arg.rank();
                        let mut sum_dims: Vec<usize> = (0..left).collect();
                        for (d, (n, a)) in node.dims()[left..].iter().zip(arg.dims()).enumerate() {
                            if n != a {
                                sum_dims.push(d + left);
                            }
                        }
                        let mut arg_grad = grad.sum_keepdim(&sum_dims);
                        for _ in 0..left {
                            arg_grad = arg_grad.squeeze(0);
                        }
                        let s = grads.or_insert(arg);
                        let dims = s.dims().to_vec();
                        *s = s.add(&arg_grad.broadcast_as(&dims));
                    }
                    Op::Sum(arg, kept) => {
                        let grad = if arg.rank() == grad.rank() {
                            grad.broadcast_as(arg.dims())
                        } else {
                            grad.reshape(kept).broadcast_as(arg.dims())
                        };
                        let s = grads.or_insert(arg);
                        *s = s.add(&grad);
                    }
                    Op::Max(arg) => {
                        let s = grads.or_insert(arg);
                        *s = s.add(&grad.broadcast_as(arg.dims()));
                    }
                    Op::ToDType(arg) => {
                        let s = grads.or_insert(arg);
                        *s = s.add(&grad.to_dtype(arg.dtype()));
                    }
                    Op::Copy(arg) => {
                        let s = grads.or_insert(arg);
                        *s = s.add(&grad);
                    }
                    Op::Affine(arg, mul) => {
                        let arg_grad = grad.affine(*mul, 0.0);
                        let s = grads.or_insert(arg);
                        *s = s.add(&arg_grad);
                    }
                    Op::Reshape(arg) => {
                        let arg_grad = grad.reshape(arg.dims());
                        let s = grads.or_insert(arg);
                        *s = s.add(&arg_grad);
                    }
                    Op::Transpose(arg, d1, d2) => {
                        let arg_grad = grad.transpose(*d1, *d2);
                        let s = grads.or_insert(arg);
                        *s = s.add(&arg_grad);
                    }
                    Op::Narrow(arg, dim, start, len) => {
                        let pad = |n: usize| {
                            (n > 0).then(|| {
                                let mut dims = arg.dims().to_vec();
                                dims[*dim] = n;
                                Tensor::new(arg.heap(), &dims, grad.dtype())
                            })
                        };
                        let left = pad(*start);
                        let right = pad(arg.dim(*dim) - start - len);
                        let arg_grad = match (left, right) {
                            (None, None) => grad.clone(),
                            (Some(l), None) => Tensor::cat(&[&l, &grad], *dim),
                            (None, Some(r)) => Tensor::cat(&[&grad, &r], *dim),
                            (Some(l), Some(r)) => Tensor::cat(&[&l, &grad, &r], *dim),
                        };
                        let s = grads.or_insert(arg);
                        *s = s.add(&arg_grad);
                    }
                    Op::IndexSelect(arg, ids, dim) => {
                        let s = grads.or_insert(arg);
                        let ids = ids.contiguous();
                        *s = s.index_add(&ids, &grad, *dim);
                    }
                    Op::Gather(arg, ids, dim) => {
                        let s = grads.or_insert(arg);
                        *s = s.scatter_add(ids, &grad, *dim);
                    }
                    Op::Unary(arg, UnaryOp::Exp) => {
                        let s = grads.or_insert(arg);
                        *s = s.add(&(&grad * node));
                    }
                    Op::Unary(arg, UnaryOp::Log) => {
                        let s = grads.or_insert(arg);
                        *s = s.add(&(&grad / arg));
                    }
                    Op::Unary(arg, UnaryOp::Sqr) => {
                        let arg_grad = arg.mul(&grad).affine(2.0, 0.0);
                        let s = grads.or_insert(arg);
                        *s = s.add(&arg_grad);
                    }
                    Op::Unary(arg, UnaryOp::Sqrt) => {
                        let arg_grad = grad.div(node).affine(0.5, 0.0);
                        let s = grads.or_insert(arg);
                        *s = s.add(&arg_grad);
                    }
                    Op::Unary(arg, UnaryOp::Recip) => {
                        let s = grads.or_insert(arg);
                        let g = &grad / arg.sqr();
                        *s = s.sub(&g);
                    }
                    Op::Unary(arg, UnaryOp::Neg) => {
                        let s = grads.or_insert(arg);
                        *s = s.sub(&grad);
                    }
                    Op::Unary(arg, UnaryOp::Powf(e)) => {
                        let arg_grad = &(&grad * arg.powf(e - 1.0)) * *e;
                        let s = grads.or_insert(arg);
                        *s = s.add(&arg_grad);
                    }
                    Op::Custom1(arg, bwd) => {
                        if let Some(arg_grad) = bwd(arg, node, &grad) {
                            let s = grads.or_insert(arg);
                            *s = s.add(&arg_grad);
                        }
                    }
                    Op::Custom2(a, b, bwd) => {
                        let (ga, gb) = bwd(a, b, node, &grad);
                        if let Some(ga) = ga {
                            let s = grads.or_insert(a);
                            *s = s.add(&ga);
                        }
                        if let Some(gb) = gb {
                            let s = grads.or_insert(b);
                            *s = s.add(&gb);
                        }
                    }
                    Op::Custom3(a, b, c, bwd) => {
                        let (ga, gb, gc) = bwd(a, b, c, node, &grad);
                        if let Some(ga) = ga {
                            let s = grads.or_insert(a);
                            *s = s.add(&ga);
                        }
                        if let Some(gb) = gb {
                            let s = grads.or_insert(b);
                            *s = s.add(&gb);
                        }
                        if let Some(gc) = gc {
                            let s = grads.or_insert(c);
                            *s = s.add(&gc);
                        }
                    }
                    Op::Other(_) => {}
                }
            }
            grads
        }
    }

    /// `device::reduction_dtype`.
    fn reduction_dtype(dtype: DType) -> DType {
        if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    // ---- layers::ops ----

    fn softmax_last_dim(x: &Tensor) -> Tensor {
        let x = x.to_dtype(reduction_dtype(x.dtype()));
        let last = x.rank() - 1;
        let max = x.max_keepdim(last).detach();
        let exp = x.broadcast_sub(&max).exp();
        let sum = exp.sum_keepdim(&[last]);
        exp.broadcast_div(&sum)
    }

    fn log_softmax_last_dim(x: &Tensor) -> Tensor {
        let x = x.to_dtype(reduction_dtype(x.dtype()));
        let last = x.rank() - 1;
        let max = x.max_keepdim(last).detach();
        let shifted = x.broadcast_sub(&max);
        let log_sum = shifted.exp().sum_keepdim(&[last]).log();
        shifted.broadcast_sub(&log_sum)
    }

    fn mean_last_dim(x: &Tensor) -> Tensor {
        let last = x.rank() - 1;
        let n = x.dim(last) as f64;
        x.sum_keepdim(&[last]) / n
    }

    /// `ops::causal_softmax` through `fused::causal_softmax` (a contiguous CPU input): a custom
    /// op computing its output from its input (one buffer, no copy).
    fn causal_softmax(scores: &Tensor, scale: f64) -> Tensor {
        let dtype = scores.dtype();
        let rd = reduction_dtype(dtype);
        let op = record(&[scores], || {
            Op::Custom1(
                scores.clone(),
                Rc::new(move |_, y, g| {
                    // `softmax_backward_cpu`: one output allocation when both are contiguous.
                    if y.dtype() == g.dtype()
                        && y.dims() == g.dims()
                        && y.is_contiguous()
                        && g.is_contiguous()
                    {
                        return Some(Tensor::new(y.heap(), y.dims(), y.dtype()));
                    }
                    let (y, g) = (y.to_dtype(rd), g.to_dtype(rd));
                    let last = y.rank() - 1;
                    let dot = (&g * &y).sum_keepdim(&[last]);
                    let grad = (g.broadcast_sub(&dot) * y) * scale;
                    Some(grad.to_dtype(dtype))
                }),
            )
        });
        Tensor::fresh(scores.heap(), scores.dims(), dtype, op)
    }

    /// `linear::affine` (`InOut` layout): `x W + b` as one op. The bias is added in place to the
    /// matmul's output (`fused::add_bias_owned`) and its gradient is one pass over `g`
    /// (`fused::bias_grad`: an F32 vector, then the bias dtype).
    fn affine(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let value = x.detach().matmul(&w.detach());
        custom3(
            x,
            w,
            b,
            value,
            Rc::new(|x, w, b, _, g| {
                let grad_x = g.matmul(&w.t());
                let grad_w = x.t().matmul(g);
                let grad_b = Tensor::new(b.heap(), b.dims(), reduction_dtype(g.dtype())).to_dtype(b.dtype());
                (Some(grad_x), Some(grad_w), Some(grad_b))
            }),
        )
    }

    /// `fused::gelu_tanh`: a custom op computing its output from its input (one buffer, as
    /// Candle's `gelu`), whose backward allocates only the input's gradient.
    fn gelu_tanh(x: &Tensor) -> Tensor {
        let op = record(&[x], || Op::Custom1(x.clone(), Rc::new(|x, _, _| Some(x.zeros_like()))));
        Tensor::fresh(x.heap(), x.dims(), x.dtype(), op)
    }

    fn residual_add(x: &Tensor, branch: &Tensor) -> Tensor {
        if x.dtype() == branch.dtype() {
            return x + branch;
        }
        let value = x.detach() + branch.detach().to_dtype(x.dtype());
        custom2(
            x,
            branch,
            value,
            Rc::new(|_, branch, _, g| (Some(g.clone()), Some(g.to_dtype(branch.dtype())))),
        )
    }

    // ---- layers ----

    struct Linear {
        weight: Tensor,
        bias: Tensor,
    }

    impl Linear {
        fn new(heap: &Rc<Heap>, inputs: usize, outputs: usize, dtype: DType) -> Self {
            Self {
                weight: Tensor::parameter(heap, &[inputs, outputs], dtype),
                bias: Tensor::parameter(heap, &[outputs], dtype),
            }
        }

        fn forward(&self, x: &Tensor) -> Tensor {
            let dims = x.dims().to_vec();
            let (in_features, lead) = (dims[dims.len() - 1], &dims[..dims.len() - 1]);
            let rows: usize = lead.iter().product();
            let x2 = x.reshape(&[rows, in_features]);
            let y = affine(&x2, &self.weight, &self.bias);
            let mut out_dims = lead.to_vec();
            out_dims.push(y.dim(1));
            y.reshape(&out_dims)
        }
    }

    struct LayerNorm {
        weight: Tensor,
        bias: Tensor,
    }

    impl LayerNorm {
        fn new(heap: &Rc<Heap>, dim: usize, dtype: DType) -> Self {
            Self {
                weight: Tensor::parameter(heap, &[dim], dtype),
                bias: Tensor::parameter(heap, &[dim], dtype),
            }
        }

        fn forward_as(&self, x: &Tensor, dtype: DType) -> Tensor {
            let rd = reduction_dtype(x.dtype());
            let (w, b) = (&self.weight, &self.bias);
            let x32 = x.detach().to_dtype(rd);
            let mean = mean_last_dim(&x32);
            let centered = x32.broadcast_sub(&mean);
            let rstd = (mean_last_dim(&centered.sqr()) + 1e-5).sqrt().recip();
            let value = centered
                .broadcast_mul(&rstd)
                .broadcast_mul(&w.detach().to_dtype(rd))
                .broadcast_add(&b.detach().to_dtype(rd))
                .to_dtype(dtype);
            drop(centered);
            custom3(
                x,
                w,
                b,
                value,
                Rc::new(move |x, w, b, _, g| {
                    let xhat = x.to_dtype(rd).broadcast_sub(&mean).broadcast_mul(&rstd);
                    let g = g.to_dtype(rd);
                    let c = xhat.dim(xhat.rank() - 1);
                    let rows = xhat.elem_count() / c.max(1);
                    let grad_w = (&g * &xhat).reshape(&[rows, c]).sum(&[0]).to_dtype(w.dtype());
                    let grad_b = g.reshape(&[rows, c]).sum(&[0]).to_dtype(b.dtype());
                    let gw = g.broadcast_mul(&w.to_dtype(rd));
                    let mean_gw = mean_last_dim(&gw);
                    let mean_gw_xhat = mean_last_dim(&(&gw * &xhat));
                    let grad_x = gw
                        .broadcast_sub(&mean_gw)
                        .sub(&xhat.broadcast_mul(&mean_gw_xhat))
                        .broadcast_mul(&rstd)
                        .to_dtype(x.dtype());
                    (Some(grad_x), Some(grad_w), Some(grad_b))
                }),
            )
        }
    }

    struct Embedding {
        weight: Tensor,
    }

    impl Embedding {
        fn forward(&self, ids: &Tensor) -> Tensor {
            let mut dims = ids.dims().to_vec();
            let table = &self.weight;
            dims.push(table.dim(1));
            let ids = ids.flatten_all();
            let value = table.detach().index_select(&ids, 0);
            let rows = custom2(
                table,
                &ids,
                value,
                Rc::new(|table, ids, _, g| {
                    let rd = reduction_dtype(table.dtype());
                    let grad = Tensor::new(table.heap(), table.dims(), rd).index_add(ids, &g.to_dtype(rd), 0);
                    (Some(grad.to_dtype(table.dtype())), None)
                }),
            );
            rows.reshape(&dims)
        }
    }

    /// `Dropout::forward` in training.
    fn dropout(x: &Tensor, p: f32) -> Tensor {
        if p == 0.0 {
            return x.clone();
        }
        // `fused::dropout` (contiguous input on the CPU): a one-byte mask held by the op, one
        // output buffer; the backward allocates the input's gradient.
        let mask = Tensor::new(x.heap(), x.dims(), DType::U8);
        let op = record(&[x], || {
            Op::Custom1(
                x.clone(),
                Rc::new(move |x, _, _| {
                    let _held_by_the_op = &mask;
                    Some(x.zeros_like())
                }),
            )
        });
        Tensor::fresh(x.heap(), x.dims(), x.dtype(), op)
    }

    struct Attention {
        c_attn: Linear,
        c_proj: Linear,
        n_head: usize,
        p: f32,
    }

    impl Attention {
        fn forward(&self, x: &Tensor) -> Tensor {
            let (b, t, c) = (x.dim(0), x.dim(1), x.dim(2));
            let head_dim = c / self.n_head;
            let qkv = self.c_attn.forward(x);
            let split = |i: usize| {
                qkv.narrow(2, i * c, c).reshape(&[b, t, self.n_head, head_dim]).transpose(1, 2).contiguous()
            };
            let (q, k, v) = (split(0), split(1), split(2));
            let probs = causal_softmax(&q.matmul(&k.t()), 1.0 / (head_dim as f64).sqrt());
            let probs = dropout(&probs, self.p);
            let y = probs.matmul(&v).transpose(1, 2).reshape(&[b, t, c]);
            let y = self.c_proj.forward(&y);
            dropout(&y, self.p)
        }
    }

    struct Mlp {
        c_fc: Linear,
        c_proj: Linear,
        p: f32,
    }

    impl Mlp {
        fn forward(&self, x: &Tensor) -> Tensor {
            let h = gelu_tanh(&self.c_fc.forward(x));
            dropout(&self.c_proj.forward(&h), self.p)
        }
    }

    struct Block {
        ln_1: LayerNorm,
        attn: Attention,
        ln_2: LayerNorm,
        mlp: Mlp,
    }

    /// The tokens of one micro-batch, as `Corpus::train_batch` builds them.
    pub(super) struct Batch {
        inputs: Tensor,
        targets: Tensor,
    }

    impl Batch {
        pub(super) fn new(heap: &Rc<Heap>, b: usize, t: usize) -> Self {
            let _offsets = host(heap, b * std::mem::size_of::<usize>());
            Self {
                inputs: Tensor::new(heap, &[b, t], DType::U32),
                targets: Tensor::new(heap, &[b, t], DType::U32),
            }
        }
    }

    /// `models::Gpt` with its segments.
    pub(super) struct Gpt {
        heap: Rc<Heap>,
        wte: Embedding,
        wpe: Embedding,
        blocks: Vec<Block>,
        ln_f: LayerNorm,
        p: f32,
        vocab: usize,
        dtype: DType,
    }

    impl Gpt {
        pub(super) fn new(heap: &Rc<Heap>, config: &GptConfig, dtype: DType) -> Self {
            let c = config.n_embd;
            let p = config.dropout;
            let blocks = (0..config.n_layer)
                .map(|_| Block {
                    ln_1: LayerNorm::new(heap, c, dtype),
                    attn: Attention {
                        c_attn: Linear::new(heap, c, 3 * c, dtype),
                        c_proj: Linear::new(heap, c, c, dtype),
                        n_head: config.n_head,
                        p,
                    },
                    ln_2: LayerNorm::new(heap, c, dtype),
                    mlp: Mlp {
                        c_fc: Linear::new(heap, c, 4 * c, dtype),
                        c_proj: Linear::new(heap, 4 * c, c, dtype),
                        p,
                    },
                })
                .collect();
            Self {
                heap: heap.clone(),
                wte: Embedding { weight: Tensor::parameter(heap, &[config.vocab_size, c], dtype) },
                wpe: Embedding { weight: Tensor::parameter(heap, &[config.n_ctx, c], dtype) },
                blocks,
                ln_f: LayerNorm::new(heap, c, dtype),
                p,
                vocab: config.vocab_size,
                dtype,
            }
        }

        fn num_segments(&self) -> usize {
            self.blocks.len() + 2
        }

        fn residual_dtype(&self) -> DType {
            reduction_dtype(self.dtype)
        }

        fn embed(&self, inputs: &Tensor) -> Tensor {
            let t = inputs.dim(1);
            let rd = self.residual_dtype();
            let positions = Tensor::new(&self.heap, &[t], DType::U32);
            let tokens = self.wte.forward(inputs).to_dtype(rd);
            let h = tokens.broadcast_add(&self.wpe.forward(&positions).to_dtype(rd));
            dropout(&h, self.p)
        }

        fn block_forward(&self, block: &Block, x: &Tensor) -> Tensor {
            let dt = self.dtype;
            let attn = block.attn.forward(&block.ln_1.forward_as(x, dt));
            let x = residual_add(x, &attn);
            let mlp = block.mlp.forward(&block.ln_2.forward_as(&x, dt));
            residual_add(&x, &mlp)
        }

        fn head_logits(&self, h: &Tensor) -> Tensor {
            let h = self.ln_f.forward_as(h, self.dtype);
            let (b, t, c) = (h.dim(0), h.dim(1), h.dim(2));
            let logits = h.reshape(&[b * t, c]).matmul(&self.wte.weight.t());
            logits.reshape(&[b, t, self.vocab])
        }

        fn forward_segment(&self, index: usize, input: &Tensor, batch: &Batch) -> Tensor {
            match index {
                0 => self.embed(input),
                i if i <= self.blocks.len() => self.block_forward(&self.blocks[i - 1], input),
                _ => {
                    let logits = self.head_logits(input);
                    let (b, t, v) = (logits.dim(0), logits.dim(1), logits.dim(2));
                    cross_entropy(&logits.reshape(&[b * t, v]), &batch.targets.flatten_all())
                }
            }
        }

        /// The parameters segment `index` lists.
        fn segment_parameters(&self, index: usize) -> Vec<Tensor> {
            match index {
                0 => vec![self.wte.weight.clone(), self.wpe.weight.clone()],
                i if i <= self.blocks.len() => {
                    let b = &self.blocks[i - 1];
                    let (a, m) = (&b.attn, &b.mlp);
                    [&b.ln_1.weight, &b.ln_1.bias, &a.c_attn.weight, &a.c_attn.bias, &a.c_proj.weight]
                        .into_iter()
                        .chain([&a.c_proj.bias, &b.ln_2.weight, &b.ln_2.bias, &m.c_fc.weight, &m.c_fc.bias])
                        .chain([&m.c_proj.weight, &m.c_proj.bias])
                        .cloned()
                        .collect()
                }
                _ => vec![self.ln_f.weight.clone(), self.ln_f.bias.clone(), self.wte.weight.clone()],
            }
        }
    }

    fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
        let n = logits.dim(0);
        cross_entropy_sum(logits, targets) / n as f64
    }

    fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Tensor {
        let rd = reduction_dtype(logits.dtype());
        let targets = targets.to_dtype(DType::U32).unsqueeze(1);
        let log_probs = log_softmax_last_dim(&logits.detach());
        let value = log_probs.gather(&targets, 1).sum_all().neg();
        drop(log_probs);
        custom1(
            logits,
            value,
            Rc::new(move |logits, _, g| {
                let probs = softmax_last_dim(logits);
                let ones = Tensor::new(logits.heap(), targets.dims(), rd);
                let onehot = probs.zeros_like().scatter_add(&targets, &ones, 1);
                let grad = (probs - onehot).broadcast_mul(&g.to_dtype(rd));
                Some(grad.to_dtype(logits.dtype()))
            }),
        )
    }

    /// `candle_ckpt::tracked_input`: a segment's input as a variable (one copy).
    fn tracked_input(x: &Tensor) -> Tensor {
        if x.dtype().is_int() {
            return x.clone();
        }
        x.detach().make_var()
    }

    /// `candle_ckpt::measure_segments` with every graph kept: per segment, the bytes its
    /// forward keeps and the bytes of its input.
    pub(super) fn measure_segments(model: &Gpt, batch: &Batch) -> Vec<(usize, usize)> {
        let heap = &model.heap;
        let n = model.num_segments();
        let mut kept = Vec::with_capacity(n);
        let mut sizes = Vec::with_capacity(n);
        let mut x = batch.inputs.clone();
        for index in 0..n {
            let input_bytes = x.elem_count() * x.dtype().size_in_bytes();
            let before = heap.live();
            let input = if index > 0 { tracked_input(&x) } else { x.clone() };
            drop(x);
            let output = model.forward_segment(index, &input, batch);
            drop(input);
            x = output.detach();
            sizes.push((heap.live().saturating_sub(before), input_bytes));
            kept.push(output);
        }
        sizes
    }

    /// `updater::LocalUpdater::accumulate`: reading a gradient as FP32 copies it to the host
    /// unless it is a contiguous F32 tensor.
    fn accumulate(gradients: Vec<(Tensor, Tensor)>) {
        for (_, grad) in &gradients {
            if grad.dtype() == DType::F32 && grad.is_contiguous() {
                continue;
            }
            let values = {
                let widened = grad.to_dtype(DType::F32).flatten_all();
                host(grad.heap(), widened.elem_count() * 4)
            };
            drop(values);
        }
    }

    /// `Trainer::accumulate_step` for one micro-batch (`candle_ckpt::forward_backward` with
    /// the updater's hook); returns the peak bytes during each segment's backward.
    pub(super) fn train_micro_batch(
        model: &Gpt,
        b: usize,
        t: usize,
        decisions: &[Decision],
        multiplier: f64,
    ) -> Vec<usize> {
        let heap = model.heap.clone();
        let batch = Batch::new(&heap, b, t);
        let n = model.num_segments();
        let mut peaks = vec![0; n];

        // Forward.
        let mut saved: Vec<(Tensor, Option<Tensor>)> = Vec::with_capacity(n);
        let mut x = batch.inputs.clone();
        for (index, decision) in decisions.iter().enumerate() {
            let keep = *decision == Decision::Keep || index + 1 == n;
            if keep {
                let input = if index > 0 { tracked_input(&x) } else { x.clone() };
                let output = model.forward_segment(index, &input, &batch);
                x = output.detach();
                saved.push((input, Some(output)));
            } else {
                let output = model.forward_segment(index, &x, &batch).detach();
                saved.push((x, None));
                x = output;
            }
        }
        drop(x);
        let Some(loss) = saved.last().and_then(|(_, output)| output.clone()) else { return peaks };
        let loss_value = loss.detach();
        drop(loss);

        // Backward, last segment first.
        let mut grad_out: Option<Tensor> = None;
        for index in (0..n).rev() {
            heap.mark();
            let Some((input, output)) = saved.pop() else { break };
            let (input, output) = match output {
                Some(output) => (input, output),
                None => {
                    let input = if index > 0 { tracked_input(&input) } else { input };
                    let output = model.forward_segment(index, &input, &batch);
                    (input, output)
                }
            };
            let seed = if index + 1 == n {
                None
            } else {
                match grad_out.take() {
                    Some(g) => Some(g),
                    None => break,
                }
            };
            let root = match &seed {
                None if multiplier == 1.0 => output,
                None => output.affine(multiplier, 0.0),
                Some(g) => output.mul(g).sum_all(),
            };
            drop(seed);
            let grads = root.backward();
            drop(root);
            let wants_input_grad = index > 0 && !input.dtype().is_int();
            let gradients: Vec<(Tensor, Tensor)> = model
                .segment_parameters(index)
                .into_iter()
                .filter_map(|p| grads.get(&p).map(|g| (p.clone(), g.detach())))
                .collect();
            if wants_input_grad {
                grad_out = grads.get(&input).map(Tensor::detach);
            }
            drop(grads);
            drop(input);
            accumulate(gradients);
            peaks[index] = heap.mark_peak();
        }
        // The loss read back as an f64 scalar.
        drop(loss_value.to_dtype(DType::F64));
        peaks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_ckpt::Recompute;

    #[test]
    fn segment_infos_match_the_model_names() {
        let config = GptConfig { n_layer: 3, ..GptConfig::default() };
        let infos = gpt_segment_infos(&config);
        let names: Vec<&str> = infos.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["embedding", "h.0", "h.1", "h.2", "head"]);
        let blocks: Vec<bool> = infos.iter().map(|s| s.is_block).collect();
        assert_eq!(blocks, [false, true, true, true, false]);
    }

    fn input(config: GptConfig, policy: Recompute) -> Result<EstimateInput> {
        Ok(EstimateInput {
            config,
            dtype: DType::F32,
            micro_batch: 8,
            seq_len: 64,
            accumulation_steps: 1,
            optimizer: OptimizerConfig::AdamW(Default::default()),
            decisions: policy.decide(&gpt_segment_infos(&config))?,
            corpus_bytes: 0,
            validation_fraction: 0.1,
            eval_windows: 1,
            runtime_bytes: 0,
        })
    }

    #[test]
    fn recomputation_lowers_the_estimate_and_state_is_exact() -> Result<()> {
        let config = GptConfig { n_layer: 4, ..GptConfig::default() };
        let never = estimate_memory(&input(config, Recompute::Never)?)?;
        let all = estimate_memory(&input(config, Recompute::All)?)?;
        assert!(all.activations < never.activations);
        assert_eq!(never.parameters, config.num_parameters() * 4);
        assert_eq!(never.optimizer_state, 2 * never.gradients);
        assert_eq!(never.peak, never.report().categories().iter().map(|(_, b)| b).sum::<usize>());
        assert_eq!(never.segment_infos().len(), 6);
        let mut bad = input(config, Recompute::Never)?;
        bad.decisions.pop();
        assert!(estimate_memory(&bad).is_err());
        bad = input(config, Recompute::Never)?;
        bad.seq_len = 129;
        assert!(matches!(estimate_memory(&bad), Err(Error::SequenceTooLong { .. })));
        Ok(())
    }

    #[test]
    fn a_byte_budget_can_decide_on_estimated_sizes() -> Result<()> {
        let config = GptConfig { n_layer: 6, ..GptConfig::default() };
        let infos = estimated_segment_infos(&config, DType::F32, 8, 64)?;
        let total: usize = infos.iter().filter_map(|s| s.activation_bytes).sum();
        let decisions = Recompute::Budget(total / 2).decide(&infos)?;
        let recomputed = decisions.iter().filter(|d| **d == Decision::Recompute).count();
        assert!(recomputed > 0 && recomputed < 6, "{recomputed}");
        Ok(())
    }
}
