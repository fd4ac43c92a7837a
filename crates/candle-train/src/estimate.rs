//! Predicts a training step's memory, by the categories of [`MemoryReport`], for any stacked
//! model (GPT, LLaMA, BERT, or a user's [`crate::module::Stacked`] model) without a mirror of
//! its layers.
//!
//! # How
//!
//! The Trainer measures, per step, the peak of the counting allocator since the step started;
//! [`MemoryReport::new`] splits it into the model state (parameters in their dtype, FP32
//! gradient accumulators, FP32 master weights for half-precision parameters, optimizer state),
//! `other` (what else was live when the step started) and `activations` (everything the step
//! allocated at its peak). The estimate has three parts:
//!
//! - **model state** from the parameters' shapes alone: the model of the real shape is never
//!   built. The parameters of a model with one block plus, per further block, the block's
//!   parameters; the per-parameter byte rules of the updater (8-bit AdamW's blocks included).
//!   Under LoRA ([`EstimateInput::lora`]) the trainable parameters are the adapters, and the
//!   frozen base is counted by its exact bytes ([`TrainableModel::frozen_segment_bytes`]): the
//!   one-block model's (embedding, head, norms, the block) plus the block's per further block,
//!   dense in its dtype or, for QLoRA, each quantized weight's
//!   [`storage_bytes`](crate::quant::QuantizedWeight::storage_bytes) (NF4's packed codes and
//!   double-quantized absmaxes).
//! - **activations** from a measured probe: the real code of each distinct segment (the
//!   embedding, one block, the head) runs once at the real batch shape, on a model with one
//!   block, through the engine's own per-segment forward and backward under the counting
//!   allocator, with a scratch [`LocalUpdater`] as the gradient hook
//!   ([`candle_ckpt::probe_segments`]). The block's record stands for every block (blocks of a
//!   stack are identical), and [`candle_ckpt::simulate`] composes the records in the engine's
//!   keep/recompute/drop order for the real depth and the policy's decisions (a byte budget
//!   decides on the probed sizes). The batch's own tensors and the optimizer step's transient
//!   are measured the same way.
//! - **other**: the corpus, the validation batches, bookkeeping per parameter tensor and
//!   [`default_runtime_bytes`] (scratch memory the process keeps whatever the model).
//!
//! Accumulation does not change the peak: micro-batches run one after another and their
//! gradients go into the FP32 accumulators, which are model state.
//!
//! The probe allocates one block at the real width and runs it at the real batch shape: cheap
//! next to a step of the real model, but not free (a block's activations, twice). Only the
//! segmented backward with the host-store updater on the CPU is modelled.

use candle::{DType, Device, Tensor};
use candle_ckpt::{
    probe_segments, simulate, Decision, Recompute, RecomputePolicy, SegmentContext, StepProbe,
};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraModel};
use crate::memory::{DeviceMeter, MemoryReport};
use crate::models::{BertClassifier, BertConfig, GptConfig, LlamaConfig, TokenBatch};
use crate::optim::OptimizerConfig;
use crate::trainer::{BackwardMode, TrainableModel, TrainerConfig};
use crate::updater::{LocalUpdater, Updater};

/// The model families [`estimate_memory`] builds a one-block probe of.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelShape {
    /// A [`crate::Gpt`].
    Gpt(GptConfig),
    /// A [`crate::Llama`].
    Llama(LlamaConfig),
    /// A [`BertClassifier`] (mean pooling) with this many labels.
    Bert {
        /// The encoder.
        config: BertConfig,
        /// Outputs of the classifier head.
        num_labels: usize,
    },
}

impl From<GptConfig> for ModelShape {
    fn from(config: GptConfig) -> Self {
        Self::Gpt(config)
    }
}

impl From<LlamaConfig> for ModelShape {
    fn from(config: LlamaConfig) -> Self {
        Self::Llama(config)
    }
}

impl ModelShape {
    /// The family's name: `gpt`, `llama` or `bert`.
    pub fn family(&self) -> &'static str {
        match self {
            Self::Gpt(_) => "gpt",
            Self::Llama(_) => "llama",
            Self::Bert { .. } => "bert",
        }
    }

    /// Its number of blocks.
    pub fn blocks(&self) -> usize {
        match self {
            Self::Gpt(c) => c.n_layer,
            Self::Llama(c) => c.num_hidden_layers,
            Self::Bert { config, .. } => config.num_hidden_layers,
        }
    }

    /// Its width (the residual stream's).
    pub fn width(&self) -> usize {
        match self {
            Self::Gpt(c) => c.n_embd,
            Self::Llama(c) => c.hidden_size,
            Self::Bert { config, .. } => config.hidden_size,
        }
    }

    /// The longest sequence it accepts.
    pub fn context_length(&self) -> usize {
        match self {
            Self::Gpt(c) => c.n_ctx,
            Self::Llama(c) => c.max_position_embeddings,
            Self::Bert { config, .. } => config.max_position_embeddings,
        }
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad configuration or a model without blocks.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Gpt(c) => c.validate()?,
            Self::Llama(c) => c.validate()?,
            Self::Bert { config, num_labels } => {
                config.validate()?;
                if *num_labels == 0 {
                    return Err(Error::config("num_labels", "must be at least 1"));
                }
            }
        }
        if self.blocks() == 0 {
            return Err(Error::config("layers", "the estimator needs at least one block"));
        }
        Ok(())
    }
}

/// What [`estimate_memory`] needs to know about a training run.
#[derive(Debug, Clone, PartialEq)]
pub struct EstimateInput {
    /// The model's family and shape.
    pub model: ModelShape,
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
    /// The recompute policy; a byte budget decides on the probed segment sizes.
    pub recompute: Recompute,
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
    /// Probe at this smaller micro-batch (and twice it) and extrapolate
    /// ([`StepSettings::probe_micro_batch`]); `None` probes at the real one.
    pub probe_micro_batch: Option<usize>,
    /// LoRA adapters over a frozen base (QLoRA with [`LoraConfig::quantize_base`], LLaMA only:
    /// the probe's base is quantized as [`crate::Llama::quantize_base`] does); `None` trains
    /// every parameter.
    pub lora: Option<LoraConfig>,
}

impl EstimateInput {
    /// The input for training `model` in `dtype` as `trainer` says, with `optimizer`, on a
    /// corpus of `corpus_bytes` bytes split with `validation_fraction`; the runtime bytes are
    /// [`default_runtime_bytes`].
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a plain-backward trainer (only the segmented engine is
    /// modelled).
    pub fn for_trainer(
        model: impl Into<ModelShape>,
        dtype: DType,
        trainer: &TrainerConfig,
        optimizer: OptimizerConfig,
        corpus_bytes: usize,
        validation_fraction: f64,
    ) -> Result<Self> {
        if trainer.backward != BackwardMode::Segmented {
            return Err(Error::config("backward", "the memory estimate models the segmented backward only"));
        }
        Ok(Self {
            model: model.into(),
            dtype,
            micro_batch: trainer.micro_batch.get(),
            seq_len: trainer.seq_len.get(),
            accumulation_steps: trainer.accumulation_steps.get(),
            optimizer,
            recompute: trainer.recompute,
            corpus_bytes,
            validation_fraction,
            eval_windows: trainer.eval_windows,
            runtime_bytes: default_runtime_bytes(),
            probe_micro_batch: None,
            lora: None,
        })
    }
}

/// One segment's share of the activations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentEstimate {
    /// The segment's name (`embedding`, `h.{i}`, `head`, ...).
    pub name: String,
    /// Whether it is a block.
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
    /// Number of trainable parameters (elements).
    pub parameter_count: usize,
    /// Model parameters in their dtype, frozen weights included (as the Trainer's
    /// [`MemoryReport::parameters`] counts them).
    pub parameters: usize,
    /// The part of `parameters` that is frozen weights outside the trainable parameters (a
    /// LoRA model's base, dense or quantized; [`TrainableModel::frozen_segment_bytes`]).
    pub frozen_bytes: usize,
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

    /// The segments as recompute policies see them, with their probed sizes.
    pub fn segment_infos(&self) -> Vec<candle_ckpt::SegmentInfo> {
        self.segments
            .iter()
            .map(|s| candle_ckpt::SegmentInfo {
                name: s.name.clone(),
                is_block: s.is_block,
                activation_bytes: Some(s.activation_bytes),
                input_bytes: Some(s.input_bytes),
            })
            .collect()
    }
}

/// The model-independent settings of [`estimate_stacked`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepSettings {
    /// Samples per micro-batch.
    pub micro_batch: usize,
    /// Probe at this micro-batch and twice it, and extrapolate every record linearly to
    /// `micro_batch` (activations are linear in the batch; parameter gradients constant), when
    /// twice it is below `micro_batch`; `None` probes at `micro_batch` itself.
    pub probe_micro_batch: Option<usize>,
    /// Micro-batches per optimizer step (the backward starts from the loss times its
    /// reciprocal; the peak does not depend on it).
    pub accumulation_steps: usize,
    /// The optimizer.
    pub optimizer: OptimizerConfig,
    /// The recompute policy.
    pub recompute: Recompute,
    /// Bytes of training and validation data the run holds at a step's start (counted in
    /// `other`; [`corpus_data_bytes`] for the byte corpus).
    pub data_bytes: usize,
    /// Heap the process keeps whatever the model ([`default_runtime_bytes`]), counted in
    /// `other`.
    pub runtime_bytes: usize,
}

/// Predicts the memory of one training step of `input`: builds the model with one block on
/// the CPU at the real width, and [`estimate_stacked`] over the real depth.
///
/// # Errors
/// [`Error::InvalidConfig`] for a bad model config, a zero batch size, sequence length or
/// accumulation count, a non-float dtype, a validation fraction outside (0, 1), a bad
/// optimizer config or a binary without the counting allocator; [`Error::SequenceTooLong`];
/// any error of the probe.
pub fn estimate_memory(input: &EstimateInput) -> Result<MemoryEstimate> {
    let (b, t) = (input.micro_batch, input.seq_len);
    input.model.validate()?;
    if b == 0 {
        return Err(Error::config("micro_batch", "must be at least 1"));
    }
    if t == 0 {
        return Err(Error::config("seq_len", "must be at least 1"));
    }
    if t > input.model.context_length() {
        return Err(Error::SequenceTooLong { seq_len: t, context: input.model.context_length() });
    }
    if !input.dtype.is_float() {
        return Err(Error::config("dtype", format!("{:?} is not a float dtype to train in", input.dtype)));
    }
    if !(input.validation_fraction > 0.0 && input.validation_fraction < 1.0) {
        return Err(Error::config(
            "validation_fraction",
            format!("{} is not in (0, 1)", input.validation_fraction),
        ));
    }
    let settings = StepSettings {
        micro_batch: b,
        probe_micro_batch: input.probe_micro_batch,
        accumulation_steps: input.accumulation_steps,
        optimizer: input.optimizer,
        recompute: input.recompute,
        data_bytes: corpus_data_bytes(
            input.corpus_bytes,
            input.validation_fraction,
            input.eval_windows,
            b,
            t,
        ),
        runtime_bytes: input.runtime_bytes,
    };
    let (dev, dtype, blocks) = (Device::Cpu, input.dtype, input.model.blocks());
    let lora = input.lora.as_ref();
    if let Some(quantization) = lora.and_then(|l| l.quantize_base) {
        if !matches!(input.model, ModelShape::Llama(_)) {
            return Err(Error::config(
                "quantize_base",
                format!(
                    "a quantized base ({quantization}) is a LLaMA's; this model is {}",
                    input.model.family()
                ),
            ));
        }
        if quantization == crate::quant::BaseQuantization::Gguf {
            return Err(Error::config(
                "quantize_base",
                "`gguf` keeps a GGUF file's own blocks, which the estimator has no file of: give their type (q4_0, q4_1, q8_0)",
            ));
        }
    }
    match &input.model {
        ModelShape::Gpt(c) => {
            let model = crate::Gpt::new(GptConfig { n_layer: 1, ..*c }, dtype, &dev, 0)?;
            estimate_adapted(model, lora, |b| token_batch(c.vocab_size, b, t), blocks, &settings)
        }
        ModelShape::Llama(c) => {
            let mut model =
                crate::Llama::new(&LlamaConfig { num_hidden_layers: 1, ..c.clone() }, dtype, &dev, 0)?;
            if let Some(quantization) = lora.and_then(|l| l.quantize_base) {
                model = model.quantize_base(quantization)?;
            }
            estimate_adapted(model, lora, |b| token_batch(c.vocab_size, b, t), blocks, &settings)
        }
        ModelShape::Bert { config, num_labels } => {
            let one = BertConfig { num_hidden_layers: 1, ..config.clone() };
            let encoder = crate::models::Bert::new(&one, "", dtype, &dev, 0)?;
            let model = BertClassifier::new(encoder, *num_labels, 0)?;
            let batch = |b| classification_batch(config.vocab_size, *num_labels, b, t);
            estimate_adapted(model, lora, batch, blocks, &settings)
        }
    }
}

/// [`estimate_stacked`] of `model`, or of `model` under LoRA adapters when `lora` is given (the
/// probe then measures the adapted, possibly quantized, block: the adapters' activations and
/// the quantized layers' dequantization buffers included).
fn estimate_adapted<M, F>(
    model: M,
    lora: Option<&LoraConfig>,
    make_batch: F,
    blocks: usize,
    settings: &StepSettings,
) -> Result<MemoryEstimate>
where
    M: TrainableModel + crate::module::Module,
    M::Batch: Sized,
    F: Fn(usize) -> Result<M::Batch>,
{
    match lora {
        None => estimate_stacked(&model, make_batch, blocks, settings),
        Some(config) => {
            let model = LoraModel::new(model, config.clone(), 0)?;
            estimate_stacked(&model, make_batch, blocks, settings)
        }
    }
}

/// A batch of `b` sequences of `t` token ids below `vocab` (targets the inputs shifted by
/// one), as the corpus makes them.
fn token_batch(vocab: usize, b: usize, t: usize) -> Result<TokenBatch> {
    let ids: Vec<u32> = (0..b * t).map(|i| (i % vocab.max(1)) as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|i| ((i + 1) % vocab.max(1)) as u32).collect();
    Ok(TokenBatch {
        inputs: Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
        targets: Tensor::from_vec(targets, (b, t), &Device::Cpu)?,
    })
}

/// A classification batch of `b` unpadded sequences of `t` tokens.
fn classification_batch(
    vocab: usize,
    labels: usize,
    b: usize,
    t: usize,
) -> Result<crate::models::ClassificationBatch> {
    let dev = Device::Cpu;
    let ids: Vec<u32> = (0..b * t).map(|i| (i % vocab.max(1)) as u32).collect();
    let label: Vec<u32> = (0..b).map(|i| (i % labels.max(1)) as u32).collect();
    Ok(crate::models::ClassificationBatch {
        ids: Tensor::from_vec(ids, (b, t), &dev)?,
        token_types: Tensor::zeros((b, t), DType::U32, &dev)?,
        mask: Tensor::ones((b, t), DType::U32, &dev)?,
        labels: Tensor::from_vec(label, b, &dev)?,
    })
}

/// Predicts the memory of one training step of a stacked model of `blocks` identical blocks
/// from `probe_model`, the same model with exactly one block (the segments before it, the
/// block, the segments after it), and `make_batch`, which makes one micro-batch of the given
/// number of samples at the real sequence length. The model of the real depth is never built:
/// its parameters are the probe's plus `blocks - 1` times the block's; its activations are the
/// probe's records composed by [`candle_ckpt::simulate`] with the block's record repeated.
/// With [`StepSettings::probe_micro_batch`], the records are probed at that micro-batch and
/// twice it and extrapolated linearly to [`StepSettings::micro_batch`].
///
/// # Errors
/// [`Error::InvalidConfig`] when `probe_model` does not have exactly one block, `blocks` or
/// the accumulation count is zero, the counting allocator is not installed, or for a bad
/// optimizer config; any error of the model, the batch or the policy.
pub fn estimate_stacked<M, F>(
    probe_model: &M,
    make_batch: F,
    blocks: usize,
    settings: &StepSettings,
) -> Result<MemoryEstimate>
where
    M: TrainableModel,
    M::Batch: Sized,
    F: Fn(usize) -> Result<M::Batch>,
{
    if settings.accumulation_steps == 0 {
        return Err(Error::config("accumulation_steps", "must be at least 1"));
    }
    if blocks == 0 {
        return Err(Error::config("blocks", "the estimator needs at least one block"));
    }
    let n = probe_model.num_segments();
    let block_segments: Vec<usize> = (0..n).filter(|&i| probe_model.is_block(i)).collect();
    let [block] = block_segments[..] else {
        return Err(Error::config(
            "probe_model",
            format!("a probe model has exactly one block; this one has {}", block_segments.len()),
        ));
    };
    let meter = DeviceMeter::for_device(&probe_model.device());
    if !meter.is_available() {
        return Err(Error::config(
            "estimate",
            "the estimator measures a probe with the counting allocator, which this binary does not install",
        ));
    }

    // Model state from the shapes.
    let dtype_bytes = |v: &candle::Var| v.elem_count() * v.dtype().size_in_bytes();
    let all: Vec<candle::Var> =
        probe_model.parameters().iter().map(|p| p.var().cloned()).collect::<Result<_>>()?;
    let block_params: Vec<candle::Var> = probe_model
        .segment_parameters(block)
        .into_iter()
        .map(|p| p.var().cloned())
        .collect::<candle::Result<_>>()?;
    let extra = blocks - 1;
    let sum = |f: &dyn Fn(&candle::Var) -> usize| {
        all.iter().map(f).sum::<usize>() + extra * block_params.iter().map(f).sum::<usize>()
    };
    // Frozen weights (a LoRA base, a quantized base's blocks): the one-block model's, and the
    // block's once more per further block.
    let frozen_bytes =
        probe_model.resident_parameter_bytes().saturating_sub(probe_model.parameters().size_in_bytes())
            + extra * probe_model.frozen_segment_bytes(block);
    let parameters = sum(&|v| dtype_bytes(v)) + frozen_bytes;
    let elements = sum(&|v| v.elem_count());
    let half = sum(&|v| if v.dtype() == DType::F32 { 0 } else { v.elem_count() });
    let sizes: Vec<usize> = all
        .iter()
        .map(|v| v.elem_count())
        .chain((0..extra).flat_map(|_| block_params.iter().map(|v| v.elem_count())))
        .collect();
    let gradients = elements * 4;
    let master_weights = half * 4;
    let optimizer_state = match &settings.optimizer {
        OptimizerConfig::AdamW(c) => {
            c.validate()?;
            elements * 8
        }
        OptimizerConfig::AdamW8bit(c) => {
            c.validate()?;
            crate::optim::AdamW8bit::state_bytes_for(&sizes)
        }
        OptimizerConfig::Sgd(c) if c.momentum > 0.0 => elements * 4,
        OptimizerConfig::Sgd(_) => 0,
    };
    let tensors = all.len() + extra * block_params.len();

    let mut updater = LocalUpdater::from_config(probe_model.parameters(), &settings.optimizer)?;
    let mut probe_at = |micro_batch: usize| -> Result<(StepProbe, usize)> {
        // After one whole step of the probe model (allocations made once per process).
        let ctx = SegmentContext::train(0, 0, 0);
        let multiplier = 1.0 / settings.accumulation_steps as f64;
        let batch_start = meter.current_bytes();
        let batch = make_batch(micro_batch)?;
        let batch_bytes = meter.current_bytes().saturating_sub(batch_start);
        let mut hook_error = None;
        let mut hook = |g: candle_ckpt::SegmentGradients| {
            updater.accumulate(&g).map_err(|e| {
                let msg = e.to_string();
                hook_error = Some(e);
                candle::Error::Msg(msg)
            })
        };
        let keep_all = vec![Decision::Keep; n];
        let probed =
            candle_ckpt::forward_backward(probe_model, &batch, ctx, &keep_all, multiplier, &mut hook)
                .and_then(|_| probe_segments(probe_model, &batch, ctx, multiplier, &meter, &mut hook));
        if let Some(e) = hook_error {
            return Err(e);
        }
        Ok((probed?, batch_bytes))
    };
    let (probe, batch_bytes) = match settings.probe_micro_batch {
        Some(small) if small > 0 && 2 * small < settings.micro_batch => {
            let (a, a_batch) = probe_at(small)?;
            let (b, b_batch) = probe_at(2 * small)?;
            let scale = (settings.micro_batch - small) as f64 / small as f64;
            (extrapolate(&a, &b, scale), affine(a_batch as i64, b_batch as i64, scale) as usize)
        }
        _ => probe_at(settings.micro_batch)?,
    };
    // The optimizer step's transient (its largest per-parameter temporary).
    let start = meter.reset_peak();
    updater.step(1e-3, Some(1.0))?;
    let update_peak = meter.peak_bytes().saturating_sub(start);
    drop(updater);

    // The real depth: the block's record repeated.
    let stem = probe.segments[block].name.strip_suffix('0').map(str::to_string);
    let mut segments = Vec::with_capacity(n - 1 + blocks);
    segments.extend(probe.segments[..block].iter().cloned());
    for i in 0..blocks {
        let mut record = probe.segments[block].clone();
        record.name = match &stem {
            Some(stem) => format!("{stem}{i}"),
            None => format!("{}#{i}", record.name),
        };
        segments.push(record);
    }
    segments.extend(probe.segments[block + 1..].iter().cloned());
    let infos: Vec<_> = segments.iter().map(candle_ckpt::SegmentProbe::info).collect();
    let decisions = settings.recompute.decide(&infos)?;
    let full = StepProbe { first_input_bytes: probe.first_input_bytes, segments };
    let step = simulate(&full, &decisions)?;
    let activations = (batch_bytes + step.peak).max(update_peak);

    let other =
        tensors * BYTES_PER_PARAMETER_TENSOR + BYTES_FIXED + settings.data_bytes + settings.runtime_bytes;
    let segments = full
        .segments
        .iter()
        .zip(&step.segments)
        .map(|(p, s)| SegmentEstimate {
            name: p.name.clone(),
            is_block: p.is_block,
            recomputed: s.recomputed,
            activation_bytes: p.kept_bytes,
            input_bytes: p.input_bytes,
            backward_peak_bytes: batch_bytes + s.backward_peak,
        })
        .collect();
    Ok(MemoryEstimate {
        parameter_count: elements,
        parameters,
        frozen_bytes,
        gradients,
        master_weights,
        optimizer_state,
        activations,
        other,
        peak: parameters + gradients + master_weights + optimizer_state + activations + other,
        segments,
    })
}

/// `a + (b - a) * scale`: a value measured at a micro-batch `m` (`a`) and `2m` (`b`),
/// extrapolated to `m + scale * m`.
fn affine(a: i64, b: i64, scale: f64) -> i64 {
    (a as f64 + (b - a) as f64 * scale).round() as i64
}

/// Every record of `a` (probed at a micro-batch `m`) and `b` (at `2m`) extrapolated to
/// `m + scale * m`.
fn extrapolate(a: &StepProbe, b: &StepProbe, scale: f64) -> StepProbe {
    let u = |x: usize, y: usize| affine(x as i64, y as i64, scale).max(0) as usize;
    StepProbe {
        first_input_bytes: u(a.first_input_bytes, b.first_input_bytes),
        segments: a
            .segments
            .iter()
            .zip(&b.segments)
            .map(|(x, y)| candle_ckpt::SegmentProbe {
                name: x.name.clone(),
                is_block: x.is_block,
                input_bytes: u(x.input_bytes, y.input_bytes),
                kept_bytes: u(x.kept_bytes, y.kept_bytes),
                keep_forward_peak: u(x.keep_forward_peak, y.keep_forward_peak),
                dropped_forward_peak: u(x.dropped_forward_peak, y.dropped_forward_peak),
                output_bytes: u(x.output_bytes, y.output_bytes),
                keep_backward_peak: u(x.keep_backward_peak, y.keep_backward_peak),
                keep_backward_change: affine(x.keep_backward_change, y.keep_backward_change, scale),
                recompute_backward_peak: u(x.recompute_backward_peak, y.recompute_backward_peak),
                recompute_backward_change: affine(
                    x.recompute_backward_change,
                    y.recompute_backward_change,
                    scale,
                ),
            })
            .collect(),
    }
}

/// Heap the process keeps besides the model, its state and the data, estimated for this
/// machine: Candle's CPU matmul (the `gemm` crate) gives every thread that runs one a
/// scratch buffer the size of the L2 cache, kept for the thread's life. With Candle's thread
/// count `n` above 1 (`RAYON_NUM_THREADS`, else the cores), that is the `n` worker threads and
/// the calling thread (which runs the small matmuls itself) unless the caller is itself one of
/// the workers ([`crate::cpu_runtime::run_on_pool`], as the CLI runs); with one thread, the
/// calling thread alone. The L2 size is read from `/sys/devices/system/cpu/cpu0/cache` (1 MiB
/// where that cannot be read).
pub fn default_runtime_bytes() -> usize {
    let threads = candle::utils::get_num_threads();
    let on_pool = rayon::current_thread_index().is_some();
    let buffers = if threads > 1 && !on_pool { threads + 1 } else { threads.max(1) };
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

/// Bookkeeping bytes per parameter tensor (its name, handle, the updater's index entry and
/// the model's segment lists).
const BYTES_PER_PARAMETER_TENSOR: usize = 660;
/// Bookkeeping bytes of the model, trainer and updater structures.
const BYTES_FIXED: usize = 46 << 10;
/// Heap bookkeeping of one tensor handle (the shared tensor, its shape and strides).
const BYTES_PER_TENSOR: usize = 240;

/// Bytes the byte corpus holds at a step's start: the text of `corpus_bytes` bytes (the
/// training split keeps the file's allocation, the validation split is a copy) and the
/// validation batches (up to `eval_windows` windows of `seq_len` tokens, inputs and targets
/// as U32, in batches of `micro_batch`). 0 for an empty corpus.
pub fn corpus_data_bytes(
    corpus_bytes: usize,
    validation_fraction: f64,
    eval_windows: usize,
    micro_batch: usize,
    seq_len: usize,
) -> usize {
    if corpus_bytes == 0 || micro_batch == 0 || seq_len == 0 {
        return 0;
    }
    let len = corpus_bytes;
    let n_val = ((len as f64 * validation_fraction).round() as usize).clamp(1, len);
    let windows = (n_val.saturating_sub(1) / seq_len).min(eval_windows).max(1);
    let batches = windows.div_ceil(micro_batch);
    len + n_val + windows * seq_len * 8 + batches * 2 * BYTES_PER_TENSOR
}
