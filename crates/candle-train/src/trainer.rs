//! The Trainer: micro-batching and accumulation, the segmented forward/backward, the
//! optimizer step, evaluation, progress, metrics and memory sampling.

use std::cell::RefCell;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle::{Device, Tensor};
use candle_ckpt::{
    forward_backward, measure_segments, plain_forward_backward, segment_infos, Decision, Recompute,
    RecomputePolicy, SegmentContext, SegmentParameter, SegmentedModel,
};
use serde::{Deserialize, Serialize};

use crate::callback::{Callback, Progress as ProgressCallback};
use crate::checkpoint::{self, Checkpoint, Progress, RunIdentity, RunLock};
use crate::error::{classify_oom, Error, Result};
use crate::evaluate::{mean_loss, Evaluator, LossEvaluator, Metrics, LOSS};
use crate::lora::{LoraConfig, LoraModel};
use crate::loss_scale::{LossScaler, LossScalerConfig};
use crate::memory::{DeviceMeter, MemoryReport};
use crate::metrics::{MetricsWriter, StepRecord};
use crate::models::{BertClassifier, Gpt, TokenBatch};
use crate::params::Parameters;
use crate::schedule::LrSchedule;
use crate::source::{Counted, DataShape, DataSource};
use crate::updater::{StepReport, Updater};

/// A model the Trainer can train: any [`SegmentedModel`] (its own batch type) that lists its
/// parameters and names its settings.
pub trait TrainableModel: SegmentedModel {
    /// Its trainable parameters.
    fn parameters(&self) -> &Parameters;
    /// The longest sequence it accepts. By default, unbounded.
    fn context_length(&self) -> usize {
        usize::MAX
    }
    /// The device its parameters live on. By default the first parameter's
    /// ([`Parameters::device`]).
    fn device(&self) -> Device {
        self.parameters().device()
    }
    /// Its architecture and every setting that changes its trajectory (heads, dropout, norm
    /// epsilon, ...) as canonical JSON: a checkpoint resumes only into a model whose settings
    /// are equal ([`crate::checkpoint::RunIdentity::model`]). Serialize the whole config, so no
    /// field can be forgotten ([`canonical_json`]).
    fn settings(&self) -> String;
    /// Bytes of parameters resident now. By default all of them; a model whose parameters are
    /// sharded (ZeRO stage 3) holds only those gathered at the moment.
    fn resident_parameter_bytes(&self) -> usize {
        self.parameters().size_in_bytes()
    }
    /// Bytes of the weights segment `index` reads that [`TrainableModel::parameters`] does not
    /// list: frozen weights no updater holds state for (a LoRA model's frozen base, a quantized
    /// base's blocks). The memory estimator ([`crate::estimate::estimate_stacked`]) counts a
    /// block's once per block of the real depth. By default none.
    fn frozen_segment_bytes(&self, _index: usize) -> usize {
        0
    }
    /// The LoRA adapters the model trains, if it is a [`LoraModel`]
    /// (or wraps one): the Trainer checks them against [`TrainerConfig::lora`]. By default
    /// none.
    fn lora_config(&self) -> Option<&LoraConfig> {
        None
    }
}

/// A [`TrainableModel`] of token batches (GPT, LLaMA): what the byte corpus and the token
/// datasets feed.
pub trait LanguageModel: TrainableModel<Batch = TokenBatch> {}

impl<M: TrainableModel<Batch = TokenBatch> + ?Sized> LanguageModel for M {}

impl TrainableModel for Gpt {
    fn parameters(&self) -> &Parameters {
        Gpt::parameters(self)
    }

    fn context_length(&self) -> usize {
        self.config().n_ctx
    }

    fn settings(&self) -> String {
        canonical_json("gpt", self.config())
    }
}

impl TrainableModel for crate::models::Llama {
    fn parameters(&self) -> &Parameters {
        crate::models::Llama::parameters(self)
    }

    fn context_length(&self) -> usize {
        self.config().max_position_embeddings
    }

    fn settings(&self) -> String {
        canonical_json("llama", self.config())
    }

    /// The parameters' bytes and a quantized base's blocks.
    fn resident_parameter_bytes(&self) -> usize {
        let quantized: usize = self.quantized_weights().iter().map(|q| q.storage_bytes()).sum();
        self.parameters().size_in_bytes() + quantized
    }

    /// The quantized blocks of a decoder layer's affine weights (the only weights a quantized
    /// base holds outside its parameters).
    fn frozen_segment_bytes(&self, index: usize) -> usize {
        use crate::module::{Module, Stacked};
        let Some(layer) = index.checked_sub(1).and_then(|i| self.blocks().get(i)) else {
            return 0;
        };
        let mut bytes = 0;
        layer.visit_linears(&mut |l| bytes += l.quantized().map_or(0, |q| q.storage_bytes()));
        bytes
    }
}

impl TrainableModel for BertClassifier {
    fn parameters(&self) -> &Parameters {
        BertClassifier::parameters(self)
    }

    fn context_length(&self) -> usize {
        self.encoder().config().max_position_embeddings
    }

    fn settings(&self) -> String {
        let labels = self.parameters().get("classifier.weight").map_or(0, |p| p.dims()[0]);
        canonical_json(
            "bert_classifier",
            &serde_json::json!({"encoder": self.encoder().config(), "labels": labels}),
        )
    }
}

/// `{"config": config, "kind": kind}` as compact JSON (object keys sorted), the form run
/// identities compare.
pub fn canonical_json<T: Serialize>(kind: &str, config: &T) -> String {
    serde_json::to_string(&serde_json::json!({ "kind": kind, "config": config }))
        .unwrap_or_else(|e| format!("{{\"kind\": \"{kind}\", \"unserializable\": \"{e}\"}}"))
}

/// How a micro-batch's backward runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackwardMode {
    /// Segment by segment through candle-ckpt's engine, dropping each segment's graph when
    /// done, with the configured recompute policy.
    #[default]
    Segmented,
    /// One `loss.backward()` over the whole graph, as plain Candle code does (for comparison;
    /// the recompute policy is ignored).
    Plain,
}

/// The Trainer's settings. Build with [`TrainerConfig::builder`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    /// Sequences per micro-batch.
    pub micro_batch: NonZeroUsize,
    /// Micro-batches per optimizer step; the global batch is their product.
    pub accumulation_steps: NonZeroUsize,
    /// Optimizer steps to run.
    pub steps: NonZeroUsize,
    /// Tokens per sequence.
    pub seq_len: NonZeroUsize,
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this, if set.
    pub max_grad_norm: Option<f64>,
    /// Measure validation loss every this many steps (and always at the start and the end);
    /// 0 for start and end only.
    pub eval_interval: usize,
    /// Validation windows of `seq_len` tokens to evaluate on.
    pub eval_windows: usize,
    /// Update the progress bar's message every this many steps.
    pub log_interval: usize,
    /// Seed of the data order and of dropout.
    pub seed: u64,
    /// Draw a progress bar on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
    /// Append one JSON line per step to this file.
    pub metrics_path: Option<PathBuf>,
    /// Stop with an error after this many consecutive skipped (non-finite) steps.
    pub max_consecutive_skips: usize,
    /// Which segments are recomputed during backward instead of keeping their graph.
    pub recompute: Recompute,
    /// Segmented (the engine) or plain backward.
    pub backward: BackwardMode,
    /// Dynamic loss scaling (PyTorch GradScaler semantics), or `None`.
    pub loss_scaling: Option<LossScalerConfig>,
    /// Where and how often to write training-state checkpoints, if at all.
    pub checkpoint: Option<CheckpointConfig>,
    /// A limit on live heap bytes (the counting allocator's count), checked after every
    /// segment's forward (and recompute) and backward: going over it is an
    /// [`Error::OutOfMemory`]. A CUDA allocation failure is the same error.
    pub max_memory: Option<usize>,
    /// On an out-of-memory error, free the step, halve the micro-batch (to the largest divisor
    /// of the global batch at most half of it), multiply the accumulation steps to keep the
    /// global batch, and retry the step. One data-parallel rank only: on several, the error
    /// stops the run (the ranks would have to agree on the new split).
    pub oom_recovery: bool,
    /// Before training, pick the largest micro-batch (a divisor of the global batch, at most
    /// `micro_batch`) whose forward and backward stay within `max_memory`, measured.
    pub find_micro_batch: bool,
    /// Train LoRA adapters over a frozen (with [`LoraConfig::quantize_base`], quantized) base
    /// instead of every parameter: [`Trainer::adapt`] wraps the model, and every run refuses a
    /// model whose adapters are not these (so the updater, built from the model's parameters,
    /// cannot silently hold the whole model). `None` (the default) trains the model as given,
    /// which may itself be a [`LoraModel`] the caller wrapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

/// Where and how often the Trainer writes checkpoints (see [`crate::checkpoint`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    /// The run directory; checkpoints go to `step-NNNNNNNN/` inside it.
    pub dir: PathBuf,
    /// Write one every this many steps (and after the last step).
    pub every: usize,
    /// Keep this many of the newest checkpoints; older ones are removed.
    pub keep: usize,
    /// Replace another run's checkpoints found in `dir` (removed at the start); without it, a
    /// directory holding another run's checkpoints is refused (a resumed run's own are fine).
    #[serde(default)]
    pub overwrite: bool,
}

impl TrainerConfig {
    /// A builder with every default filled in.
    pub fn builder() -> TrainerBuilder {
        TrainerBuilder::default()
    }

    /// Sequences per optimizer step.
    pub fn global_batch(&self) -> usize {
        self.micro_batch.get() * self.accumulation_steps.get()
    }
}

/// Builds a [`TrainerConfig`], validating it in [`TrainerBuilder::build`].
#[derive(Debug, Clone)]
pub struct TrainerBuilder {
    micro_batch: usize,
    accumulation_steps: usize,
    steps: usize,
    seq_len: usize,
    schedule: Option<LrSchedule>,
    lr: f64,
    warmup_steps: usize,
    max_grad_norm: Option<f64>,
    eval_interval: usize,
    eval_windows: usize,
    log_interval: usize,
    seed: u64,
    progress: bool,
    metrics_path: Option<PathBuf>,
    max_consecutive_skips: usize,
    recompute: Recompute,
    backward: BackwardMode,
    loss_scaling: Option<LossScalerConfig>,
    checkpoint: Option<CheckpointConfig>,
    max_memory: Option<usize>,
    oom_recovery: bool,
    find_micro_batch: bool,
    lora: Option<LoraConfig>,
}

impl Default for TrainerBuilder {
    fn default() -> Self {
        Self {
            micro_batch: 16,
            accumulation_steps: 1,
            steps: 300,
            seq_len: 128,
            schedule: None,
            lr: 3e-3,
            warmup_steps: 30,
            max_grad_norm: Some(1.0),
            eval_interval: 100,
            eval_windows: 256,
            log_interval: 10,
            seed: 0,
            progress: false,
            metrics_path: None,
            max_consecutive_skips: 8,
            recompute: Recompute::Never,
            backward: BackwardMode::Segmented,
            loss_scaling: None,
            checkpoint: None,
            max_memory: None,
            oom_recovery: true,
            find_micro_batch: false,
            lora: None,
        }
    }
}

impl TrainerBuilder {
    /// Sequences per micro-batch. By default, 16.
    pub fn micro_batch(mut self, n: usize) -> Self {
        self.micro_batch = n;
        self
    }

    /// Micro-batches accumulated per optimizer step. By default, 1.
    pub fn accumulation_steps(mut self, n: usize) -> Self {
        self.accumulation_steps = n;
        self
    }

    /// Optimizer steps. By default, 300.
    pub fn steps(mut self, n: usize) -> Self {
        self.steps = n;
        self
    }

    /// Tokens per sequence. By default, 128.
    pub fn seq_len(mut self, n: usize) -> Self {
        self.seq_len = n;
        self
    }

    /// Peak learning rate of the default warm-up + cosine schedule. By default, 3e-3.
    pub fn lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }

    /// Warm-up steps of the default schedule. By default, 30 (capped at the run's length).
    pub fn warmup_steps(mut self, n: usize) -> Self {
        self.warmup_steps = n;
        self
    }

    /// An explicit schedule, replacing the default linear warm-up then cosine decay from `lr`
    /// to `lr / 10` over the run.
    pub fn schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = Some(schedule);
        self
    }

    /// Global-norm clipping threshold, or `None` for none. By default, 1.0.
    pub fn max_grad_norm(mut self, max: Option<f64>) -> Self {
        self.max_grad_norm = max;
        self
    }

    /// Validation every this many steps (0: start and end only). By default, 100.
    pub fn eval_interval(mut self, n: usize) -> Self {
        self.eval_interval = n;
        self
    }

    /// Validation windows. By default, 256.
    pub fn eval_windows(mut self, n: usize) -> Self {
        self.eval_windows = n;
        self
    }

    /// Progress message interval in steps. By default, 10.
    pub fn log_interval(mut self, n: usize) -> Self {
        self.log_interval = n;
        self
    }

    /// Seed of the data order and dropout. By default, 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Whether to draw a progress bar. By default, no.
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// JSONL metrics file. By default, none.
    pub fn metrics_path(mut self, path: Option<PathBuf>) -> Self {
        self.metrics_path = path;
        self
    }

    /// Consecutive non-finite steps tolerated before stopping. By default, 8.
    pub fn max_consecutive_skips(mut self, n: usize) -> Self {
        self.max_consecutive_skips = n;
        self
    }

    /// The recompute policy. By default, [`Recompute::Never`].
    pub fn recompute(mut self, policy: Recompute) -> Self {
        self.recompute = policy;
        self
    }

    /// Segmented or plain backward. By default, [`BackwardMode::Segmented`].
    pub fn backward(mut self, mode: BackwardMode) -> Self {
        self.backward = mode;
        self
    }

    /// Dynamic loss scaling, or `None` for none. By default, none; FP16 training needs it
    /// ([`crate::Precision::default_loss_scaling`]).
    pub fn loss_scaling(mut self, config: Option<LossScalerConfig>) -> Self {
        self.loss_scaling = config;
        self
    }

    /// Checkpoints into `dir` every `every` steps, keeping the newest `keep`. By default, none.
    pub fn checkpoint(mut self, dir: impl Into<PathBuf>, every: usize, keep: usize) -> Self {
        let overwrite = self.checkpoint.as_ref().is_some_and(|c| c.overwrite);
        self.checkpoint = Some(CheckpointConfig { dir: dir.into(), every, keep, overwrite });
        self
    }

    /// Whether checkpoints of another run in the checkpoint directory are replaced (removed at
    /// the start) instead of refused. By default, no. Call after [`TrainerBuilder::checkpoint`].
    pub fn overwrite_checkpoints(mut self, on: bool) -> Self {
        if let Some(ck) = self.checkpoint.as_mut() {
            ck.overwrite = on;
        }
        self
    }

    /// A limit on live heap bytes during a step, or `None`. By default, none.
    pub fn max_memory(mut self, bytes: Option<usize>) -> Self {
        self.max_memory = bytes;
        self
    }

    /// Whether to recover from out-of-memory errors by splitting the micro-batch. By default,
    /// yes.
    pub fn oom_recovery(mut self, on: bool) -> Self {
        self.oom_recovery = on;
        self
    }

    /// Whether to search the largest micro-batch that fits `max_memory` before training. By
    /// default, no.
    pub fn find_micro_batch(mut self, on: bool) -> Self {
        self.find_micro_batch = on;
        self
    }

    /// Train LoRA adapters (QLoRA with [`LoraConfig::quantize_base`]) instead of the whole
    /// model ([`TrainerConfig::lora`]; wrap the model with [`Trainer::adapt`]). By default,
    /// none.
    pub fn lora(mut self, config: Option<LoraConfig>) -> Self {
        self.lora = config;
        self
    }

    /// Validates the settings.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first bad field or contradiction.
    pub fn build(self) -> Result<TrainerConfig> {
        let nonzero = |field: &'static str, n: usize| {
            NonZeroUsize::new(n).ok_or_else(|| Error::config(field, "must be at least 1"))
        };
        let steps = nonzero("steps", self.steps)?;
        let schedule = match self.schedule {
            Some(s) => s,
            None => LrSchedule::WarmupCosine {
                peak_lr: self.lr,
                min_lr: self.lr / 10.0,
                warmup_steps: self.warmup_steps.min(self.steps) as u64,
                total_steps: self.steps as u64,
            },
        };
        schedule.validate()?;
        if let Some(scaling) = &self.loss_scaling {
            scaling.validate()?;
        }
        if let Some(max) = self.max_grad_norm {
            if !(max > 0.0 && max.is_finite()) {
                return Err(Error::config("max_grad_norm", format!("{max} is not a positive number")));
            }
        }
        let micro_batch = nonzero("micro_batch", self.micro_batch)?;
        let accumulation_steps = nonzero("accumulation_steps", self.accumulation_steps)?;
        if micro_batch.get().checked_mul(accumulation_steps.get()).is_none() {
            return Err(Error::config("accumulation_steps", "micro_batch x accumulation_steps overflows"));
        }
        if let Some(ck) = &self.checkpoint {
            nonzero("checkpoint_every", ck.every)?;
            nonzero("keep_checkpoints", ck.keep)?;
            if ck.dir.as_os_str().is_empty() {
                return Err(Error::config("checkpoint_dir", "is empty"));
            }
        }
        if self.max_memory == Some(0) {
            return Err(Error::config("max_memory", "must be at least 1 byte"));
        }
        if self.find_micro_batch && self.max_memory.is_none() {
            return Err(Error::config(
                "find_micro_batch",
                "needs a memory limit (`max_memory`) to search against",
            ));
        }
        if let Some(lora) = &self.lora {
            lora.validate()?;
        }
        Ok(TrainerConfig {
            micro_batch,
            accumulation_steps,
            steps,
            seq_len: nonzero("seq_len", self.seq_len)?,
            schedule,
            max_grad_norm: self.max_grad_norm,
            eval_interval: self.eval_interval,
            eval_windows: nonzero("eval_windows", self.eval_windows)?.get(),
            log_interval: self.log_interval.max(1),
            seed: self.seed,
            progress: self.progress,
            metrics_path: self.metrics_path,
            max_consecutive_skips: nonzero("max_consecutive_skips", self.max_consecutive_skips)?.get(),
            recompute: self.recompute,
            backward: self.backward,
            loss_scaling: self.loss_scaling,
            checkpoint: self.checkpoint,
            max_memory: self.max_memory,
            oom_recovery: self.oom_recovery,
            find_micro_batch: self.find_micro_batch,
            lora: self.lora,
        })
    }
}

/// Refuses a model whose adapters are not the Trainer's LoRA settings: without this, a model
/// the caller forgot to [`Trainer::adapt`] would train (and hold optimizer state for) every
/// parameter.
fn check_adapters(configured: Option<&LoraConfig>, model: Option<&LoraConfig>) -> Result<()> {
    match (configured, model) {
        (Some(want), None) => Err(Error::config(
            "lora",
            format!(
                "the Trainer is set to train LoRA adapters (rank {}, targets {}), but the model carries none: wrap it with Trainer::adapt before building the updater",
                want.rank,
                want.targets.join(",")
            ),
        )),
        (Some(want), Some(got)) if want != got => Err(Error::config(
            "lora",
            format!(
                "the model's adapters (rank {}, alpha {}, targets {}, base {}) are not the Trainer's (rank {}, alpha {}, targets {}, base {})",
                got.rank,
                got.alpha,
                got.targets.join(","),
                got.quantize_base.map_or("dense".to_string(), |q| q.to_string()),
                want.rank,
                want.alpha,
                want.targets.join(","),
                want.quantize_base.map_or("dense".to_string(), |q| q.to_string()),
            ),
        )),
        _ => Ok(()),
    }
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Validation loss before the first step (nats per counted unit; NaN when the evaluator
    /// reports no `loss`).
    pub initial_val_loss: f64,
    /// Validation loss after the last step.
    pub final_val_loss: f64,
    /// Mean training loss over the last `log_interval` steps.
    pub final_train_loss: f64,
    /// Median wall time of a step, seconds.
    pub median_step_time_s: f64,
    /// Training loss units (counted tokens, or samples) per second at the median step time.
    pub tokens_per_s: f64,
    /// The memory breakdown of the step with the highest peak.
    pub memory: MemoryReport,
    /// Steps skipped for non-finite gradients.
    pub skipped_steps: usize,
    /// The segments recomputed during backward.
    pub recomputed_segments: Vec<String>,
    /// The step this run started from (0, or the resumed checkpoint's).
    pub start_step: u64,
    /// The micro-batch at the end (smaller than configured after a search or a recovery).
    pub micro_batch: usize,
    /// The accumulation steps at the end.
    pub accumulation_steps: usize,
    /// The micro-batch search's measurements, when one ran.
    pub micro_batch_search: Option<MicroBatchSearch>,
    /// Micro-batch reductions after out-of-memory errors.
    pub oom_recoveries: Vec<OomRecovery>,
    /// The evaluator's metrics before the first step (`loss` is `initial_val_loss`).
    pub initial_metrics: Metrics,
    /// The evaluator's metrics after the last step.
    pub final_metrics: Metrics,
    /// The newest checkpoint written, if any.
    pub last_checkpoint: Option<PathBuf>,
    /// Wall time spent writing checkpoints, seconds.
    pub checkpoint_time_s: f64,
    /// One record per step run (from `start_step`).
    pub history: Vec<StepRecord>,
}

/// One micro-batch tried by the search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MicroBatchTrial {
    /// The micro-batch tried.
    pub micro_batch: usize,
    /// Its measured peak live bytes (forward and backward of one micro-batch), up to the
    /// point it stopped when it did not fit.
    pub peak_bytes: usize,
    /// Whether it stayed within the limit.
    pub fits: bool,
}

/// What the micro-batch search measured and chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MicroBatchSearch {
    /// The limit searched against.
    pub limit: usize,
    /// The candidates tried, largest first.
    pub trials: Vec<MicroBatchTrial>,
    /// The chosen micro-batch.
    pub micro_batch: usize,
    /// The accumulation steps that keep the global batch.
    pub accumulation_steps: usize,
}

/// A micro-batch reduction after an out-of-memory error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomRecovery {
    /// The optimizer step (1-based) that was retried.
    pub step: u64,
    /// The micro-batch that did not fit.
    pub from: usize,
    /// The micro-batch used from then on.
    pub to: usize,
    /// The error.
    pub error: String,
}

/// The largest divisor of `global` that is at most `micro / 2`, or `None` when `micro` is 1.
pub fn smaller_micro_batch(micro: usize, global: usize) -> Option<usize> {
    (1..=micro / 2).rev().find(|d| global % d == 0)
}

/// Delegates to a model, checking the live-heap peak against a limit after every segment's
/// forward (so also after every recompute); the first violation is kept as a typed error.
struct MemoryGuard<'a, M> {
    model: &'a M,
    limit: usize,
    device: String,
    meter: DeviceMeter,
    tripped: RefCell<Option<Error>>,
}

impl<'a, M: TrainableModel> MemoryGuard<'a, M> {
    fn new(model: &'a M, limit: Option<usize>) -> Self {
        let device = match model.device().location() {
            candle::DeviceLocation::Cpu => "cpu".to_string(),
            candle::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        };
        let meter = DeviceMeter::for_device(&model.device());
        Self { model, limit: limit.unwrap_or(usize::MAX), device, meter, tripped: RefCell::new(None) }
    }

    /// `Err` (and the typed error kept) when the step's peak so far is over the limit.
    fn check(&self, at: impl FnOnce() -> String) -> candle::Result<()> {
        if self.limit == usize::MAX {
            // No limit: skip reading the meter (on CUDA a read waits for the device).
            return Ok(());
        }
        let peak = self.meter.peak_bytes();
        if peak <= self.limit {
            return Ok(());
        }
        let error =
            Error::OutOfMemory { device: self.device.clone(), needed: peak, limit: self.limit, at: at() };
        let message = error.to_string();
        self.tripped.borrow_mut().get_or_insert(error);
        Err(candle::Error::Msg(message))
    }

    /// The kept out-of-memory error, if the limit was hit.
    fn take(&self) -> Option<Error> {
        self.tripped.borrow_mut().take()
    }
}

impl<M: TrainableModel> SegmentedModel for MemoryGuard<'_, M> {
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
        let output = self.model.forward_segment(index, input, batch, ctx)?;
        self.check(|| format!("forward of {}", self.model.segment_name(index)))?;
        Ok(output)
    }

    fn segment_parameters(&self, index: usize) -> Vec<SegmentParameter> {
        self.model.segment_parameters(index)
    }

    fn before_backward(&self, index: usize) -> candle::Result<()> {
        self.model.before_backward(index)
    }

    fn is_block(&self, index: usize) -> bool {
        self.model.is_block(index)
    }

    fn stateful_layer(&self, index: usize) -> Option<String> {
        self.model.stateful_layer(index)
    }
}

/// What a run does besides training: the evaluator (by default [`LossEvaluator`]: `loss` and
/// `perplexity`) and the caller's callbacks (by default none; the progress bar and the
/// metrics file of the config are added by the Trainer).
pub struct Hooks<'a, M: SegmentedModel> {
    evaluator: Box<dyn Evaluator<M> + 'a>,
    callbacks: Vec<Box<dyn Callback + 'a>>,
}

impl<M: SegmentedModel> std::fmt::Debug for Hooks<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").field("callbacks", &self.callbacks.len()).finish_non_exhaustive()
    }
}

impl<M: SegmentedModel> Default for Hooks<'_, M>
where
    M::Batch: Sized,
{
    fn default() -> Self {
        Self { evaluator: Box::new(LossEvaluator), callbacks: Vec::new() }
    }
}

impl<'a, M: SegmentedModel> Hooks<'a, M>
where
    M::Batch: Sized,
{
    /// The default evaluator and no callbacks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Evaluates with `evaluator` instead of [`LossEvaluator`].
    pub fn evaluator(mut self, evaluator: impl Evaluator<M> + 'a) -> Self {
        self.evaluator = Box::new(evaluator);
        self
    }

    /// Adds a callback (called after the Trainer's own, in the order added).
    pub fn callback(mut self, callback: impl Callback + 'a) -> Self {
        self.callbacks.push(Box::new(callback));
        self
    }
}

/// Runs training as configured.
#[derive(Debug, Clone)]
pub struct Trainer {
    config: TrainerConfig,
    policy: Arc<dyn RecomputePolicy>,
    data_rank: DataRank,
}

/// Which share of every micro-batch this trainer processes: rank `rank` of `world_size`
/// data-parallel ranks (0 of 1 without data parallelism).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRank {
    /// This rank.
    pub rank: usize,
    /// The number of data-parallel ranks.
    pub world_size: usize,
}

impl DataRank {
    /// The sample indices `start..end` of a micro-batch of `micro_batch` samples that this
    /// rank processes: a balanced contiguous split (the first `micro_batch % world_size` ranks
    /// take one more), so the union over ranks is the whole micro-batch, each sample once.
    pub fn samples(&self, micro_batch: usize) -> std::ops::Range<usize> {
        let (base, extra) = (micro_batch / self.world_size, micro_batch % self.world_size);
        let start = self.rank * base + self.rank.min(extra);
        start..start + base + usize::from(self.rank < extra)
    }
}

/// The median of `values` (the mean of the middle two for an even count; 0 when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]),
    }
}

impl Trainer {
    /// A trainer with validated settings; it recomputes as `config.recompute` says.
    pub fn new(config: TrainerConfig) -> Self {
        let policy = Arc::new(config.recompute);
        Self { config, policy, data_rank: DataRank { rank: 0, world_size: 1 } }
    }

    /// A trainer whose recompute decisions come from a policy of the caller's
    /// (`config.recompute` is then ignored).
    pub fn with_policy(config: TrainerConfig, policy: Arc<dyn RecomputePolicy>) -> Self {
        Self { config, policy, data_rank: DataRank { rank: 0, world_size: 1 } }
    }

    /// Makes this trainer rank `rank` of `world_size` data-parallel ranks: `micro_batch` stays
    /// the size of the global micro-batch, and this rank processes its share of the samples of
    /// each one ([`DataRank::samples`]), weighting its loss by its share, so that the sum of
    /// the ranks' gradients is the one-rank gradient of the global batch. The updater must
    /// reduce across ranks (candle-shard's). By default, rank 0 of 1.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `rank >= world_size` or when the micro-batch has fewer
    /// samples than there are ranks.
    pub fn data_parallel(mut self, rank: usize, world_size: usize) -> Result<Self> {
        if rank >= world_size {
            return Err(Error::config(
                "rank",
                format!("rank {rank} is not below the world size {world_size}"),
            ));
        }
        if self.config.micro_batch.get() < world_size {
            return Err(Error::config(
                "micro_batch",
                format!(
                    "a micro-batch of {} samples cannot be split over {world_size} ranks",
                    self.config.micro_batch
                ),
            ));
        }
        self.data_rank = DataRank { rank, world_size };
        Ok(self)
    }

    /// This trainer's data-parallel rank (0 of 1 by default).
    pub fn data_rank(&self) -> DataRank {
        self.data_rank
    }

    /// What this trainer asks of a data source: `seq_len`, up to `eval_windows` validation
    /// samples in batches of `micro_batch`.
    pub fn data_shape(&self) -> DataShape {
        let c = &self.config;
        DataShape { seq_len: c.seq_len.get(), eval_samples: c.eval_windows, eval_batch: c.micro_batch.get() }
    }

    /// The keep/recompute decision for each segment of `model` at this trainer's batch shape.
    /// A policy that needs segment sizes gets them measured on the first training micro-batch
    /// with the counting allocator.
    ///
    /// # Errors
    /// When the policy needs sizes and the counting allocator is not installed, or on a data
    /// or model error.
    pub fn plan<M, D>(&self, model: &M, data: &D) -> Result<Vec<Decision>>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        self.plan_for(model, data, self.config.micro_batch.get())
    }

    fn plan_for<M, D>(&self, model: &M, data: &D, micro_batch: usize) -> Result<Vec<Decision>>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        let infos = if self.policy.needs_sizes() {
            let meter = DeviceMeter::for_device(&model.device());
            if !meter.is_available() {
                return Err(Error::config(
                    "recompute",
                    "a byte-budget policy measures segment sizes with the counting allocator, which this binary does not install",
                ));
            }
            let seed = self.config.seed;
            let batch = data.batch(seed, 0, 0..micro_batch, &self.data_shape(), &model.device())?;
            measure_segments(model, &batch, SegmentContext::train(seed, 0, 0), &|| meter.current_bytes())?
        } else {
            segment_infos(model)
        };
        Ok(self.policy.decide(&infos)?)
    }

    /// The settings.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// `model` under the LoRA adapters of [`TrainerConfig::lora`] (its base frozen, `A` drawn
    /// from the run's seed): build the updater from the result's parameters (the adapters).
    /// For QLoRA the base must already hold its weights in the configured format
    /// ([`crate::Llama::quantize_base`], [`crate::models::GgufFile::llama_quantized`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the Trainer has no LoRA settings, and as
    /// [`LoraModel::new`] (a target matching no layer, a base not held as configured).
    pub fn adapt<M: crate::module::Module>(&self, model: M) -> Result<LoraModel<M>> {
        let Some(config) = &self.config.lora else {
            return Err(Error::config(
                "lora",
                "the Trainer was built without LoRA settings (TrainerBuilder::lora)",
            ));
        };
        LoraModel::new(model, config.clone(), self.config.seed)
    }

    /// The mean validation loss (per counted unit) over `batches`, without dropout.
    ///
    /// # Errors
    /// On a model error.
    pub fn evaluate<M>(model: &M, batches: &[Counted<M::Batch>]) -> Result<f64>
    where
        M: SegmentedModel,
        M::Batch: Sized,
    {
        mean_loss(model, batches)
    }

    /// Runs one optimizer step's forward and backward over its micro-batches, accumulating
    /// into `updater` the gradient of `loss * loss_scale`, each micro-batch's mean loss weighted
    /// by its share of the global batch's counted units ([`DataSource::count`]), and returns
    /// the mean loss. On data-parallel ranks ([`Trainer::data_parallel`]) it runs this rank's
    /// samples only, accumulates its share of the gradient, and returns the mean loss of its
    /// own samples. Does not step the optimizer. `decisions` come from [`Trainer::plan`];
    /// `loss_scale` is 1 without loss scaling. The memory limit, if set, is checked; there is
    /// no recovery here.
    ///
    /// # Errors
    /// [`Error::OutOfMemory`] over the limit, or a data, model or updater error.
    pub fn accumulate_step<M, D>(
        &self,
        model: &M,
        data: &D,
        updater: &mut dyn Updater,
        step: u64,
        decisions: &[Decision],
        loss_scale: f64,
    ) -> Result<f64>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        let c = &self.config;
        let split =
            MicroSplit { micro_batch: c.micro_batch.get(), accumulation_steps: c.accumulation_steps.get() };
        let step_loss = self.accumulate(
            model,
            data,
            updater,
            step,
            decisions,
            loss_scale,
            split,
            split.accumulation_steps,
        )?;
        Ok(step_loss.loss)
    }

    /// The first `run_micros` micro-batches of step `step` under `split`, each weighted
    /// `loss_scale x its count / the global batch's count`.
    #[allow(clippy::too_many_arguments)]
    fn accumulate<M, D>(
        &self,
        model: &M,
        data: &D,
        updater: &mut dyn Updater,
        step: u64,
        decisions: &[Decision],
        loss_scale: f64,
        split: MicroSplit,
        run_micros: usize,
    ) -> Result<StepLoss>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        let c = &self.config;
        let shape = self.data_shape();
        let b = split.micro_batch;
        let device = model.device();
        let guard = MemoryGuard::new(model, c.max_memory);
        let samples = self.data_rank.samples(b);
        let global = data.count(c.seed, step, 0..b * split.accumulation_steps, &shape)?;
        if global == 0 {
            return Err(Error::NothingCounted { step: step + 1 });
        }
        let (mut losses, mut counts) = (Vec::with_capacity(run_micros), Vec::with_capacity(run_micros));
        for micro in 0..run_micros {
            let range: Range<usize> = micro * b + samples.start..micro * b + samples.end;
            let count = data.count(c.seed, step, range.clone(), &shape)?;
            let batch = data.batch(c.seed, step, range, &shape, &device)?;
            let mut ctx = SegmentContext::train(c.seed, step, micro as u64);
            if self.data_rank.world_size > 1 {
                // Dropout draws this rank's rows of the whole micro-batch's masks.
                ctx = ctx.with_window(samples.start, samples.len(), b);
            }
            let mut hook_error = None;
            let hook = |grads: candle_ckpt::SegmentGradients| {
                let segment = grads.segment;
                let result = updater.accumulate(&grads).map_err(|e| {
                    let msg = e.to_string();
                    hook_error = Some(e);
                    candle::Error::Msg(msg)
                });
                drop(grads);
                result?;
                guard.check(|| format!("backward of {}", model.segment_name(segment)))
            };
            // The micro-batch's mean loss times its share of the global batch's units: the sum
            // over micro-batches (and ranks) is the mean over the whole global batch.
            let multiplier = loss_scale * (count as f64 / global as f64);
            let result = match c.backward {
                BackwardMode::Segmented => forward_backward(&guard, &batch, ctx, decisions, multiplier, hook),
                BackwardMode::Plain => plain_forward_backward(&guard, &batch, ctx, multiplier, hook),
            };
            if let Some(e) = guard.take().or(hook_error) {
                return Err(e);
            }
            let loss = result.map_err(|e| classify_oom(e.into(), &guard.device, "a training step"))?;
            losses.push(loss.to_dtype(candle::DType::F64)?.to_scalar::<f64>()?);
            counts.push(count);
        }
        Ok(StepLoss { loss: weighted_mean(&losses, &counts), count: counts.iter().sum(), global })
    }

    /// Searches the largest micro-batch that fits `max_memory`: for each divisor of the global
    /// batch from `micro_batch` down, runs the forward and backward of step 0's first
    /// micro-batch and measures the peak with the counting allocator; the first that stays
    /// within the limit wins. The updater's gradients are zeroed after; nothing else changes.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] without a limit or without the counting allocator,
    /// [`Error::OutOfMemory`] when even a micro-batch of 1 does not fit, or a model error.
    pub fn find_micro_batch<M, D>(
        &self,
        model: &M,
        data: &D,
        updater: &mut dyn Updater,
    ) -> Result<MicroBatchSearch>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        let c = &self.config;
        let limit = c.max_memory.ok_or_else(|| Error::config("find_micro_batch", "needs `max_memory`"))?;
        let meter = DeviceMeter::for_device(&model.device());
        if !meter.is_available() {
            return Err(Error::config(
                "find_micro_batch",
                "the search measures memory with the counting allocator, which this binary does not install",
            ));
        }
        let global = c.global_batch();
        let mut trials = Vec::new();
        let mut last_error = None;
        let candidates = (1..=c.micro_batch.get()).rev().filter(|d| global % d == 0);
        for micro_batch in candidates {
            let split = MicroSplit { micro_batch, accumulation_steps: global / micro_batch };
            let decisions = self.plan_for(model, data, micro_batch)?;
            meter.reset_peak();
            let outcome = self.accumulate(model, data, updater, 0, &decisions, 1.0, split, 1);
            let peak_bytes = meter.peak_bytes();
            updater.zero_grad();
            match outcome {
                Ok(_) => {
                    trials.push(MicroBatchTrial { micro_batch, peak_bytes, fits: true });
                    return Ok(MicroBatchSearch {
                        limit,
                        trials,
                        micro_batch,
                        accumulation_steps: split.accumulation_steps,
                    });
                }
                Err(e) if e.is_out_of_memory() => {
                    trials.push(MicroBatchTrial { micro_batch, peak_bytes, fits: false });
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::config("micro_batch", "no candidate micro-batch")))
    }

    /// The settings of this run that a checkpoint must share to be continued: every field of
    /// the config is named here (a new one is a compile error until it is placed), plus the
    /// model's and the optimizer's own settings, whole, and the data's fingerprint.
    fn identity<M, D>(&self, model: &M, data: &D, updater: &dyn Updater) -> RunIdentity
    where
        M: TrainableModel,
        D: DataSource + ?Sized,
    {
        let TrainerConfig {
            micro_batch: _,        // in the identity as the global batch; the split is progress
            accumulation_steps: _, // (the same data and gradients up to summation order)
            steps: _,              // the schedule holds the run's length where it matters
            seq_len: _,            // in the data's fingerprint, where the source uses it
            schedule,
            max_grad_norm,
            eval_interval: _, // evaluation does not touch the weights, the data or the RNG
            eval_windows: _,
            log_interval: _,
            seed,
            progress: _,
            metrics_path: _,
            max_consecutive_skips: _, // stops a run; never changes a step
            recompute: _,             // recompute replays the same randomness (`SegmentContext::rng`)
            backward,
            loss_scaling,
            checkpoint: _,
            max_memory: _, // out-of-memory recovery changes only the split (in progress)
            oom_recovery: _,
            find_micro_batch: _,
            lora: _, // the model's settings hold its adapters (checked equal in preflight)
        } = &self.config;
        RunIdentity {
            seed: *seed,
            global_batch: self.config.global_batch(),
            schedule: *schedule,
            max_grad_norm: *max_grad_norm,
            loss_scaling: *loss_scaling,
            optimizer: updater.optimizer().name().to_string(),
            optimizer_settings: updater.optimizer().settings(),
            model: model.settings(),
            backward: format!("{backward:?}").to_lowercase(),
            data: data.fingerprint(&self.data_shape()),
        }
    }

    /// Trains `model` on `data` from scratch, stepping through `updater`, evaluating with
    /// [`LossEvaluator`].
    ///
    /// # Errors
    /// [`Error::SequenceTooLong`] if `seq_len` exceeds the model's context, a data source's
    /// refusal of the shape (e.g. [`Error::CorpusTooShort`]), [`Error::TooManyNonFiniteSteps`]
    /// after too many consecutive skipped steps, [`Error::OutOfMemory`] when recovery is off or
    /// the micro-batch is already 1, and any model, updater, checkpoint or I/O error.
    pub fn fit<M, D>(&self, model: &M, data: &D, updater: &mut dyn Updater) -> Result<TrainReport>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        self.fit_with(
            model,
            data,
            updater,
            Hooks { evaluator: Box::new(LossEvaluator), callbacks: Vec::new() },
        )
    }

    /// As [`Trainer::fit`], evaluating with `hooks`' evaluator and calling its callbacks.
    ///
    /// # Errors
    /// As [`Trainer::fit`], and any error of the evaluator or a callback.
    pub fn fit_with<M, D>(
        &self,
        model: &M,
        data: &D,
        updater: &mut dyn Updater,
        hooks: Hooks<'_, M>,
    ) -> Result<TrainReport>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        self.preflight(model, data)?;
        let claim = self.claim_run_dir(model, data, updater, None)?;
        self.run(model, data, updater, None, claim, hooks)
    }

    /// Continues the run saved in checkpoint `path` (a checkpoint directory, or a run
    /// directory whose newest checkpoint is taken): restores parameters, master weights,
    /// optimizer state, loss scaler, micro-batch split and counters, then trains to
    /// `steps`. The result is bit-identical to the uninterrupted run (same device and build).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when the checkpoint is missing, torn, corrupted, of another
    /// format version, or written by a run with other settings or data (each named),
    /// [`Error::StateMismatch`] for another model's state; nothing is changed then. Then as
    /// [`Trainer::fit`].
    pub fn resume<M, D>(
        &self,
        model: &M,
        data: &D,
        updater: &mut dyn Updater,
        path: &Path,
    ) -> Result<TrainReport>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        let hooks = Hooks { evaluator: Box::new(LossEvaluator), callbacks: Vec::new() };
        self.resume_with(model, data, updater, path, hooks)
    }

    /// As [`Trainer::resume`], evaluating with `hooks`' evaluator and calling its callbacks.
    ///
    /// # Errors
    /// As [`Trainer::resume`], and any error of the evaluator or a callback.
    pub fn resume_with<M, D>(
        &self,
        model: &M,
        data: &D,
        updater: &mut dyn Updater,
        path: &Path,
        hooks: Hooks<'_, M>,
    ) -> Result<TrainReport>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        let ckpt = Checkpoint::open(path)?;
        // Shapes first: another model's checkpoint is named as such, not as other settings.
        ckpt.check_model(model.parameters())?;
        self.identity(model, data, updater).check_continues(&ckpt.manifest.run, &ckpt.path)?;
        // Everything the run would refuse is refused before the restore changes anything.
        self.preflight(model, data)?;
        let p = &ckpt.manifest.progress;
        let total = self.config.steps.get() as u64;
        if p.step > total {
            return Err(Error::checkpoint(
                &ckpt.path,
                format!("it is at step {}, past this run's {total} steps", p.step),
            ));
        }
        if let (Some(config), Some(state)) = (self.config.loss_scaling, &p.loss_scaler) {
            LossScaler::new(config)?.load_state(state)?;
        }
        let claim = self.claim_run_dir(model, data, updater, Some(&ckpt))?;
        ckpt.restore(model.parameters(), updater)?;
        self.run(model, data, updater, Some(ckpt), claim, hooks)
    }

    /// The checks on the model, data and device that need no state: done before a resume
    /// changes anything, and again at the start of every run.
    fn preflight<M, D>(&self, model: &M, data: &D) -> Result<()>
    where
        M: TrainableModel,
        D: DataSource + ?Sized,
    {
        let c = &self.config;
        let seq_len = c.seq_len.get();
        if seq_len > model.context_length() {
            return Err(Error::SequenceTooLong { seq_len, context: model.context_length() });
        }
        data.check(&self.data_shape())?;
        check_adapters(c.lora.as_ref(), model.lora_config())?;
        if let (Some(metrics), Some(input)) = (&c.metrics_path, data.path()) {
            let same =
                |a: &Path, b: &Path| a.canonicalize().ok().is_some_and(|a| b.canonicalize().ok() == Some(a));
            if same(metrics, input) {
                return Err(Error::config(
                    "metrics_path",
                    format!("{} is the training data; it would be overwritten", metrics.display()),
                ));
            }
        }
        if c.max_memory.is_some() && !DeviceMeter::for_device(&model.device()).is_available() {
            return Err(Error::config(
                "max_memory",
                "the limit is checked against the counting allocator, which this binary does not install",
            ));
        }
        Ok(())
    }

    /// Takes the checkpoint directory for this run (rank 0 only; the others share rank 0's):
    /// its lock (held until the run ends), and a refusal of another run's checkpoints there
    /// unless `overwrite` (then `run` removes them, crash-safely, once a resume has restored
    /// everything). Another run's: any checkpoint for a fresh run; for a resumed one, those
    /// whose manifest names other settings.
    fn claim_run_dir<M, D>(
        &self,
        model: &M,
        data: &D,
        updater: &dyn Updater,
        resuming: Option<&Checkpoint>,
    ) -> Result<Option<RunDirClaim>>
    where
        M: TrainableModel,
        D: DataSource + ?Sized,
    {
        let Some(ck) = &self.config.checkpoint else { return Ok(None) };
        if self.data_rank.rank != 0 {
            return Ok(None);
        }
        let lock = RunLock::acquire(&ck.dir)?;
        let identity = self.identity(model, data, updater);
        let mut foreign = Vec::new();
        for (_, dir) in checkpoint::list_checkpoints(&ck.dir)? {
            let theirs = match resuming {
                None => true,
                Some(_) => match Checkpoint::open(&dir) {
                    Ok(other) => identity.check_continues(&other.manifest.run, &other.path).is_err(),
                    // Unreadable: not provably this run's.
                    Err(_) => true,
                },
            };
            if theirs && resuming.is_none_or(|r| r.path != dir) {
                foreign.push(dir);
            }
        }
        if let Some(first) = foreign.first() {
            if !ck.overwrite {
                return Err(Error::checkpoint(
                    &ck.dir,
                    format!(
                        "it holds checkpoints of another run ({} of them, e.g. {}): resume that run, choose another directory, or overwrite them explicitly (`--overwrite`)",
                        foreign.len(),
                        first.display()
                    ),
                ));
            }
        }
        Ok(Some(RunDirClaim { _lock: lock, foreign }))
    }

    /// Refuses what several data-parallel ranks cannot do yet, and removes another run's
    /// checkpoints when `overwrite` allowed it.
    fn prepare_run(&self, updater: &dyn Updater, claim: Option<&RunDirClaim>) -> Result<()> {
        let c = &self.config;
        if updater.world_size() > 1 || self.data_rank.world_size > 1 {
            // Each rank would decide on its own and the ranks' micro-batches would part.
            if c.find_micro_batch {
                return Err(Error::config(
                    "find_micro_batch",
                    "is not supported on several data-parallel ranks yet",
                ));
            }
            if c.checkpoint.is_some() && !updater.sharded_checkpoints() {
                return Err(Error::config(
                    "checkpoint",
                    "checkpoints of sharded (data-parallel) runs are not supported yet",
                ));
            }
        }
        if let (Some(claim), Some(ck)) = (claim, &c.checkpoint) {
            if !claim.foreign.is_empty() {
                tracing::warn!(
                    dir = %ck.dir.display(),
                    count = claim.foreign.len(),
                    "removing another run's checkpoints (overwrite)"
                );
                checkpoint::remove_checkpoints(&ck.dir, &claim.foreign)?;
            }
        }
        Ok(())
    }

    /// The state a run starts from: fresh, or the resumed checkpoint's progress.
    fn start_state(&self, resumed: Option<Checkpoint>) -> Result<RunState> {
        let c = &self.config;
        let mut state = RunState {
            split: MicroSplit {
                micro_batch: c.micro_batch.get(),
                accumulation_steps: c.accumulation_steps.get(),
            },
            scaler: c.loss_scaling.map(LossScaler::new).transpose()?,
            skipped: 0,
            consecutive_skips: 0,
            start_step: 0,
            last_checkpoint: None,
            decisions: Vec::new(),
            // Grown as steps run: a huge `steps` must not reserve memory up front.
            history: Vec::with_capacity(c.steps.get().min(1 << 12)),
            worst: MemoryReport::default(),
            oom_recoveries: Vec::new(),
            checkpoint_time_s: 0.0,
            counted_units: 0,
        };
        if let Some(ckpt) = resumed {
            let p = &ckpt.manifest.progress;
            state.split = MicroSplit { micro_batch: p.micro_batch, accumulation_steps: p.accumulation_steps };
            match (state.scaler.as_mut(), &p.loss_scaler) {
                (Some(scaler), Some(saved)) => scaler.load_state(saved)?,
                (None, None) => {}
                _ => {
                    return Err(Error::checkpoint(
                        &ckpt.path,
                        "loss scaling is on in one of the run and the checkpoint and off in the other",
                    ))
                }
            }
            (state.skipped, state.consecutive_skips, state.start_step) =
                (p.skipped_steps, p.consecutive_skips, p.step);
            state.last_checkpoint = Some(ckpt.path);
        }
        Ok(state)
    }

    /// The forward and backward of step `step`'s global batch, retried with a smaller
    /// micro-batch after an out-of-memory error (recovery on, one rank); the loss of the whole
    /// global batch (summed over ranks) and its counted units.
    fn forward_backward_step<M, D>(
        &self,
        model: &M,
        data: &D,
        updater: &mut dyn Updater,
        step: u64,
        loss_scale: f64,
        state: &mut RunState,
    ) -> Result<(f64, usize)>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        let c = &self.config;
        let global = c.global_batch();
        let meter = DeviceMeter::for_device(&model.device());
        let step_loss = loop {
            let split = state.split;
            let k = split.accumulation_steps;
            match self.accumulate(model, data, updater, step, &state.decisions, loss_scale, split, k) {
                Ok(loss) => break loss,
                Err(e) if e.is_out_of_memory() && c.oom_recovery && self.data_rank.world_size == 1 => {
                    // The step's graphs are gone with the error; drop its partial sums.
                    updater.zero_grad();
                    let Some(smaller) = smaller_micro_batch(split.micro_batch, global) else {
                        return Err(e);
                    };
                    tracing::warn!(
                        step = step + 1,
                        from = split.micro_batch,
                        to = smaller,
                        error = %e,
                        "out of memory: retrying the step with a smaller micro-batch"
                    );
                    state.oom_recoveries.push(OomRecovery {
                        step: step + 1,
                        from: split.micro_batch,
                        to: smaller,
                        error: e.to_string(),
                    });
                    state.split = MicroSplit { micro_batch: smaller, accumulation_steps: global / smaller };
                    state.decisions = self.plan_for(model, data, smaller)?;
                    meter.reset_peak();
                }
                Err(e) => return Err(e),
            }
        };
        let mut loss = step_loss.loss;
        if self.data_rank.world_size > 1 {
            // Every rank reports (and decides on) the loss of the whole global batch.
            loss = updater.sum_over_ranks(loss * (step_loss.count as f64 / step_loss.global as f64))?;
        }
        Ok((loss, step_loss.global))
    }

    /// Unscales (under loss scaling) and steps the optimizer, or skips the step on inf/NaN
    /// and backs the scale off.
    fn update(
        &self,
        updater: &mut dyn Updater,
        scaler: Option<&mut LossScaler>,
        lr: f64,
    ) -> Result<StepReport> {
        let c = &self.config;
        match scaler {
            None => updater.step(lr, c.max_grad_norm),
            Some(scaler) => {
                // Unscale once, in FP32; skip the whole step (optimizer, its step count and so
                // the schedule) on inf/NaN; then update the scale.
                let found_inf = updater.unscale(scaler.inv_scale_f32())?;
                scaler.update(found_inf)?;
                if found_inf {
                    updater.zero_grad();
                    Ok(StepReport { grad_norm: f64::INFINITY, stepped: false, clip_coef: 1.0 })
                } else {
                    updater.step(lr, c.max_grad_norm)
                }
            }
        }
    }

    /// Counts a skipped step; too many non-finite ones in a row stop the run.
    fn count_skips(&self, state: &mut RunState, report: &StepReport, loss: f64, done: u64) -> Result<()> {
        if report.stepped && loss.is_finite() {
            state.consecutive_skips = 0;
        } else if state.scaler.is_some() && report.grad_norm.is_infinite() && loss.is_finite() {
            // An overflow of the scaled gradient: the scaler backed off; a scale that keeps
            // overflowing ends in the scaler's minimum-scale error.
            state.skipped += 1;
        } else {
            state.skipped += 1;
            state.consecutive_skips += 1;
            tracing::warn!(
                step = done,
                loss,
                grad_norm = report.grad_norm,
                "non-finite loss or gradient: step skipped"
            );
            if state.consecutive_skips >= self.config.max_consecutive_skips {
                return Err(Error::TooManyNonFiniteSteps {
                    count: state.consecutive_skips,
                    step: done,
                    last_checkpoint: state.last_checkpoint.clone(),
                });
            }
        }
        Ok(())
    }

    /// Writes a checkpoint after step `done` when one is due (only after a good step: after a
    /// skipped one the previous checkpoint stays the newest).
    fn checkpoint_if_due(
        &self,
        parameters: &Parameters,
        updater: &mut dyn Updater,
        identity: &RunIdentity,
        state: &mut RunState,
        done: u64,
    ) -> Result<Option<PathBuf>> {
        let Some(ck) = &self.config.checkpoint else { return Ok(None) };
        let is_last = done == self.config.steps.get() as u64;
        if state.consecutive_skips != 0 || !(done % ck.every as u64 == 0 || is_last) {
            return Ok(None);
        }
        let started = Instant::now();
        let progress = Progress {
            step: done,
            optimizer_step: updater.optimizer().step_count(),
            skipped_steps: state.skipped,
            consecutive_skips: state.consecutive_skips,
            micro_batch: state.split.micro_batch,
            accumulation_steps: state.split.accumulation_steps,
            loss_scaler: state.scaler.as_ref().map(LossScaler::state),
        };
        let path = if updater.sharded_checkpoints() {
            updater.save_sharded(&ck.dir, ck.keep, parameters, progress, identity.clone())?
        } else {
            checkpoint::save(&ck.dir, ck.keep, parameters, updater, progress, identity.clone())?
        };
        state.checkpoint_time_s += started.elapsed().as_secs_f64();
        state.last_checkpoint = Some(path.clone());
        Ok(Some(path))
    }

    fn run<M, D>(
        &self,
        model: &M,
        data: &D,
        updater: &mut dyn Updater,
        resumed: Option<Checkpoint>,
        claim: Option<RunDirClaim>,
        hooks: Hooks<'_, M>,
    ) -> Result<TrainReport>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        let c = &self.config;
        self.preflight(model, data)?;
        self.prepare_run(updater, claim.as_ref())?;
        let Hooks { evaluator, callbacks: user_callbacks } = hooks;
        let mut callbacks: Vec<Box<dyn Callback + '_>> =
            vec![Box::new(ProgressCallback::new(c.progress, c.log_interval)?)];
        // A resumed run keeps the records up to its step and appends, so the file equals the
        // uninterrupted run's.
        let start = resumed.as_ref().map_or(0, |ckpt| ckpt.manifest.progress.step);
        match (c.metrics_path.as_deref(), start) {
            (None, _) => {}
            (Some(path), 0) => callbacks.push(Box::new(MetricsWriter::create(path)?)),
            (Some(path), step) => callbacks.push(Box::new(MetricsWriter::resume(path, step)?)),
        }
        callbacks.extend(user_callbacks);
        let mut state = self.start_state(resumed)?;
        let outcome = self.train_loop(model, data, updater, &*evaluator, &mut callbacks, &mut state);
        let failed = outcome.is_err();
        for callback in &mut callbacks {
            let ended = callback.on_end(failed);
            if !failed {
                ended?;
            }
        }
        outcome
    }

    fn train_loop<M, D>(
        &self,
        model: &M,
        data: &D,
        updater: &mut dyn Updater,
        evaluator: &dyn Evaluator<M>,
        callbacks: &mut [Box<dyn Callback + '_>],
        state: &mut RunState,
    ) -> Result<TrainReport>
    where
        M: TrainableModel<Batch = D::Batch>,
        D: DataSource + ?Sized,
    {
        let c = &self.config;
        let meter = DeviceMeter::for_device(&model.device());
        let identity = self.identity(model, data, updater);
        let device = model.device();
        let micro_batch_search = if c.find_micro_batch && state.start_step == 0 {
            let search = self.find_micro_batch(model, data, updater)?;
            state.split =
                MicroSplit { micro_batch: search.micro_batch, accumulation_steps: search.accumulation_steps };
            Some(search)
        } else {
            None
        };
        let val_batches = data.validation(&self.data_shape(), &device)?;
        state.decisions = self.plan_for(model, data, state.split.micro_batch)?;
        let recomputed_segments = (0..model.num_segments())
            .filter(|&i| c.backward == BackwardMode::Segmented && state.decisions[i] == Decision::Recompute)
            .map(|i| model.segment_name(i))
            .collect();
        let total = c.steps.get() as u64;
        let evaluate = |step: u64, callbacks: &mut [Box<dyn Callback + '_>]| -> Result<Metrics> {
            let metrics = evaluator.evaluate(model, &val_batches)?;
            for callback in callbacks.iter_mut() {
                callback.on_evaluation(step, &metrics)?;
            }
            Ok(metrics)
        };
        let initial_metrics = evaluate(state.start_step, callbacks)?;
        for callback in callbacks.iter_mut() {
            callback.on_start(state.start_step, total)?;
        }
        updater.zero_grad();
        let mut last_metrics = None;
        for step in state.start_step..total {
            let start_bytes = meter.reset_peak();
            let param_bytes = model.resident_parameter_bytes();
            let started = Instant::now();
            let lr = c.schedule.lr(updater.optimizer().step_count());
            let loss_scale = state.scaler.as_ref().map_or(1.0, LossScaler::scale);
            let (loss, units) = self.forward_backward_step(model, data, updater, step, loss_scale, state)?;
            let report = self.update(updater, state.scaler.as_mut(), lr)?;
            // Queued device work belongs to this step's time (a no-op on CPU).
            device.synchronize()?;
            let step_time_s = started.elapsed().as_secs_f64();
            let peak = meter.peak_bytes();
            let bytes = updater.state_bytes();
            let mut transfers = updater.take_transfers();
            if !device.is_cpu() {
                // Each micro-batch's loss is read back (as an f64).
                transfers.scalars += 8 * state.split.accumulation_steps as u64;
            }
            let mut mem = MemoryReport::new(
                param_bytes,
                bytes.gradients,
                bytes.master_weights,
                bytes.optimizer_state,
                start_bytes,
                peak,
            );
            mem.transfers = transfers;
            if mem.peak >= state.worst.peak {
                state.worst = mem;
            }
            let done = step + 1;
            self.count_skips(state, &report, loss, done)?;
            let val_metrics = if done == total || (c.eval_interval > 0 && done % c.eval_interval as u64 == 0)
            {
                Some(evaluate(done, callbacks)?)
            } else {
                None
            };
            let val_loss = val_metrics.as_ref().map(metric_loss);
            if val_metrics.is_some() {
                last_metrics = val_metrics;
            }
            let record = StepRecord {
                step: done,
                loss,
                lr,
                grad_norm: report.grad_norm,
                stepped: report.stepped,
                step_time_s,
                tokens_per_s: units as f64 / step_time_s,
                peak_bytes: peak,
                loss_scale: state.scaler.is_some().then_some(loss_scale),
                val_loss,
                transfers,
            };
            state.counted_units += units as u128;
            for callback in callbacks.iter_mut() {
                callback.on_step(&record)?;
            }
            state.history.push(record);
            if let Some(path) = self.checkpoint_if_due(model.parameters(), updater, &identity, state, done)? {
                for callback in callbacks.iter_mut() {
                    callback.on_checkpoint(done, &path)?;
                }
            }
        }
        // The last step's evaluation is the final one (nothing changed since).
        let final_metrics = match last_metrics {
            Some(metrics) if state.history.last().is_some_and(|r| r.step == total) => metrics,
            _ => evaluate(total.max(state.start_step), callbacks)?,
        };
        Ok(self.report(state, initial_metrics, final_metrics, recomputed_segments, micro_batch_search))
    }

    fn report(
        &self,
        state: &mut RunState,
        initial_metrics: Metrics,
        final_metrics: Metrics,
        recomputed_segments: Vec<String>,
        micro_batch_search: Option<MicroBatchSearch>,
    ) -> TrainReport {
        let history = std::mem::take(&mut state.history);
        let tail = &history[history.len().saturating_sub(self.config.log_interval)..];
        let final_train_loss = tail.iter().map(|r| r.loss).sum::<f64>() / tail.len().max(1) as f64;
        let times: Vec<f64> = history.iter().map(|r| r.step_time_s).collect();
        let median_step_time_s = median(&times);
        // The mean counted units of a step (the global batch's tokens for fixed windows).
        let units_per_step =
            if history.is_empty() { 0.0 } else { state.counted_units as f64 / history.len() as f64 };
        TrainReport {
            initial_val_loss: metric_loss(&initial_metrics),
            final_val_loss: metric_loss(&final_metrics),
            final_train_loss,
            median_step_time_s,
            tokens_per_s: if median_step_time_s > 0.0 { units_per_step / median_step_time_s } else { 0.0 },
            memory: state.worst,
            skipped_steps: state.skipped,
            recomputed_segments,
            start_step: state.start_step,
            micro_batch: state.split.micro_batch,
            accumulation_steps: state.split.accumulation_steps,
            micro_batch_search,
            oom_recoveries: std::mem::take(&mut state.oom_recoveries),
            initial_metrics,
            final_metrics,
            last_checkpoint: state.last_checkpoint.take(),
            checkpoint_time_s: state.checkpoint_time_s,
            history,
        }
    }
}

/// The `loss` of an evaluation (NaN when the evaluator reports none).
fn metric_loss(metrics: &Metrics) -> f64 {
    metrics.get(LOSS).copied().unwrap_or(f64::NAN)
}

/// The mean of `losses` weighted by `counts`; with equal counts the plain mean (the sum divided
/// by their number, so uniform batches keep the unweighted mean's rounding).
fn weighted_mean(losses: &[f64], counts: &[usize]) -> f64 {
    if counts.windows(2).all(|w| w[0] == w[1]) {
        return losses.iter().sum::<f64>() / losses.len().max(1) as f64;
    }
    let total: usize = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    losses.iter().zip(counts).map(|(l, &n)| l * n as f64).sum::<f64>() / total as f64
}

/// One step's (or one search trial's) losses: the mean over this rank's micro-batches
/// (weighted by their counts), this rank's counted units, and the global batch's.
#[derive(Debug, Clone, Copy)]
struct StepLoss {
    loss: f64,
    count: usize,
    global: usize,
}

/// What changes as a run goes: the split, the loss scaler, counters, the history.
#[derive(Debug)]
struct RunState {
    split: MicroSplit,
    scaler: Option<LossScaler>,
    skipped: usize,
    consecutive_skips: usize,
    start_step: u64,
    last_checkpoint: Option<PathBuf>,
    decisions: Vec<Decision>,
    history: Vec<StepRecord>,
    worst: MemoryReport,
    oom_recoveries: Vec<OomRecovery>,
    checkpoint_time_s: f64,
    counted_units: u128,
}

/// A run's hold on its checkpoint directory: the lock, and the other run's checkpoints that
/// `overwrite` replaces.
#[derive(Debug)]
struct RunDirClaim {
    _lock: RunLock,
    foreign: Vec<PathBuf>,
}

/// A micro-batch size and the number of them per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MicroSplit {
    micro_batch: usize,
    accumulation_steps: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Corpus, GptConfig, LocalUpdater, OptimizerConfig};

    /// Every field of `value` (a serialized config), each changed in turn: numbers doubled plus
    /// one, booleans flipped, strings extended.
    fn each_field_changed(value: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        if let Some(map) = value.as_object() {
            for (key, field) in map {
                let changed = match field {
                    serde_json::Value::Bool(b) => serde_json::Value::Bool(!b),
                    serde_json::Value::Number(n) => {
                        serde_json::json!(n.as_f64().unwrap_or(0.0) * 2.0 + 1.0)
                    }
                    serde_json::Value::String(s) => serde_json::Value::String(format!("{s}x")),
                    _ => continue,
                };
                let mut copy = value.clone();
                copy[key] = changed;
                out.push((key.clone(), copy));
            }
        }
        out
    }

    #[test]
    fn equal_counts_keep_the_plain_mean_and_uneven_ones_weight_it() {
        let losses = [0.1, 0.2, 0.4];
        assert_eq!(weighted_mean(&losses, &[5, 5, 5]).to_bits(), ((0.1 + 0.2 + 0.4) / 3.0f64).to_bits());
        assert!((weighted_mean(&losses, &[1, 0, 3]) - (0.1 + 1.2) / 4.0).abs() < 1e-15);
        assert_eq!(weighted_mean(&losses, &[0, 0, 0]).to_bits(), ((0.1 + 0.2 + 0.4) / 3.0f64).to_bits());
    }

    #[test]
    fn every_field_of_the_model_and_optimizer_configs_changes_the_run_identity() -> Result<()> {
        let configs: Vec<(&str, serde_json::Value)> = vec![
            (
                "gpt",
                serde_json::to_value(GptConfig::default())
                    .map_err(|e| Error::config("test", e.to_string()))?,
            ),
            (
                "adamw",
                serde_json::to_value(crate::AdamWConfig::default())
                    .map_err(|e| Error::config("test", e.to_string()))?,
            ),
            (
                "sgd",
                serde_json::to_value(crate::SgdConfig::default())
                    .map_err(|e| Error::config("test", e.to_string()))?,
            ),
        ];
        for (kind, config) in configs {
            let fields = each_field_changed(&config);
            assert!(fields.len() >= 4, "{kind}: {config}");
            for (field, changed) in fields {
                assert_ne!(
                    canonical_json(kind, &changed),
                    canonical_json(kind, &config),
                    "{kind}.{field} is not in the identity"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn the_run_identity_holds_exactly_the_trainer_settings_that_change_the_trajectory() -> Result<()> {
        let model = Gpt::new(
            GptConfig { n_ctx: 8, n_embd: 8, n_layer: 1, n_head: 2, ..GptConfig::default() },
            candle::DType::F32,
            &Device::Cpu,
            0,
        )?;
        let corpus = Corpus::from_bytes(Path::new("t"), b"abcdefghijklmnopqrstuvwxyz ".repeat(40), 0.2)?;
        let updater =
            LocalUpdater::from_config(model.parameters(), &OptimizerConfig::AdamW(Default::default()))?;
        let base = TrainerConfig::builder().steps(10).micro_batch(2).seq_len(8).build()?;
        let identity = |c: TrainerConfig| Trainer::new(c).identity(&model, &corpus, &updater);
        let reference = identity(base.clone());
        type Change = fn(&mut TrainerConfig);
        // Changes that must change the identity...
        let changing: [(&str, Change); 7] = [
            ("seq_len", |c| c.seq_len = NonZeroUsize::MIN),
            ("global batch", |c| c.accumulation_steps = NonZeroUsize::MIN.saturating_add(1)),
            ("schedule", |c| c.schedule = LrSchedule::Constant { lr: 0.5 }),
            ("max_grad_norm", |c| c.max_grad_norm = None),
            ("seed", |c| c.seed = 7),
            ("backward", |c| c.backward = BackwardMode::Plain),
            ("loss_scaling", |c| c.loss_scaling = Some(LossScalerConfig::default())),
        ];
        for (what, change) in changing {
            let mut c = base.clone();
            change(&mut c);
            assert_ne!(identity(c), reference, "{what} must be part of the run identity");
        }
        // ...and changes that must not (they never change a step's result).
        let neutral: [(&str, Change); 9] = [
            ("eval_interval", |c| c.eval_interval = 3),
            ("eval_windows", |c| c.eval_windows = 5),
            ("log_interval", |c| c.log_interval = 3),
            ("progress", |c| c.progress = true),
            ("metrics_path", |c| c.metrics_path = Some("m.jsonl".into())),
            ("max_consecutive_skips", |c| c.max_consecutive_skips = 2),
            ("recompute", |c| c.recompute = Recompute::All),
            ("max_memory", |c| c.max_memory = Some(1 << 30)),
            ("oom_recovery", |c| c.oom_recovery = !c.oom_recovery),
        ];
        for (what, change) in neutral {
            let mut c = base.clone();
            change(&mut c);
            assert_eq!(identity(c), reference, "{what} must not be part of the run identity");
        }
        Ok(())
    }
}
