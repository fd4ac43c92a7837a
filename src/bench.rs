//! The benchmark harness: every technique against the FP32 baseline, on a grid of models.
//!
//! Each configuration trains a fresh model for `warmup + steps` optimizer steps on the bundled
//! corpus and reports the peak bytes of a step (exact: the counting allocator's heap bytes on
//! CPU, the memory pool's bytes in use on CUDA; with the breakdown by category), the median/min/max step time over the measured steps, tokens per
//! second, the final validation loss, and ratios against the `fp32` baseline of the same model
//! measured in the same run. `zero1`-`zero3` train on 2 in-process ranks (threads sharing
//! the device and the memory counter: their peak is the process's, both ranks together).

use std::fmt::Write as _;

use anyhow::{bail, Context};
use candle::Device;
use candle_ckpt::Recompute;
use candle_shard::driver::{fit_in_process, InProcessConfig};
use candle_shard::ZeroStage;
use candle_train::estimate::{estimate_memory, EstimateInput, ModelShape};
use candle_train::memory;
use candle_train::trainer::median;
use candle_train::{
    AdamWConfig, BackwardMode, Corpus, DeviceMeter, Gpt, GptConfig, Llama, LlamaConfig, LocalUpdater,
    OptimizerConfig, Precision, Split, TrainableModel, Trainer, TrainerConfig,
};
use serde::Serialize;

/// One benchmark configuration: a technique or a combination, applied to any model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchConfig {
    /// Its name on the command line and in the tables.
    pub name: &'static str,
    /// What it does.
    pub description: &'static str,
    /// Precision (F16 brings dynamic loss scaling).
    pub precision: Precision,
    /// Recompute policy.
    pub recompute: Recompute,
    /// Micro-batches per step (the global batch is cut into this many).
    pub accumulation_steps: usize,
    /// Segmented engine or plain Candle backward.
    pub backward: BackwardMode,
    /// FP32 matmuls in TF32 on CUDA (cuBLAS reduced precision; PyTorch's `allow_tf32`). No
    /// effect on CPU.
    pub tf32: bool,
    /// AdamW with 8-bit moments instead of FP32 ones.
    pub adamw8bit: bool,
    /// The optimizer offloaded (rayon step on the host; pinned transfers on a GPU).
    pub offload: bool,
    /// Gradients, master weights and optimizer state as tensors on the model's device even on
    /// the CPU (the tensor-op optimizers; on a GPU every row but `offload` keeps its state on
    /// the device anyway, with the fused kernels).
    pub state_on_device: bool,
    /// ZeRO data parallelism on in-process ranks (threads of this process, sharing its device
    /// and its memory counter): `(stage, ranks)`.
    pub zero: Option<(u8, usize)>,
}

/// The name of the baseline every ratio is against.
pub const BASELINE: &str = "fp32";

const fn config(
    name: &'static str,
    description: &'static str,
    precision: Precision,
    recompute: Recompute,
    accumulation_steps: usize,
    backward: BackwardMode,
) -> BenchConfig {
    BenchConfig {
        name,
        description,
        precision,
        recompute,
        accumulation_steps,
        backward,
        tf32: false,
        adamw8bit: false,
        offload: false,
        state_on_device: false,
        zero: None,
    }
}

/// Every registered configuration, baseline first.
pub fn configurations() -> Vec<BenchConfig> {
    use BackwardMode::{Plain, Segmented};
    use Precision::{Bf16 as BF16, F16, F32};
    vec![
        config(
            BASELINE,
            "FP32, segmented backward, no recompute, one micro-batch",
            F32,
            Recompute::Never,
            1,
            Segmented,
        ),
        BenchConfig {
            tf32: true,
            ..config(
                "fp32-tf32",
                "FP32 with TF32 matmuls (CUDA only: the same as fp32 on CPU, left out of `all` there)",
                F32,
                Recompute::Never,
                1,
                Segmented,
            )
        },
        config(
            "candle-plain",
            "FP32, one plain loss.backward() as Candle code does",
            F32,
            Recompute::Never,
            1,
            Plain,
        ),
        config("recompute-all", "FP32, every block recomputed", F32, Recompute::All, 1, Segmented),
        config(
            "recompute-sqrt",
            "FP32, about sqrt(n) blocks kept, the rest recomputed",
            F32,
            Recompute::Sqrt,
            1,
            Segmented,
        ),
        config(
            "recompute-every2",
            "FP32, every 2nd block recomputed",
            F32,
            Recompute::EveryK(2),
            1,
            Segmented,
        ),
        config(
            "accum4",
            "FP32, global batch as 4 accumulated micro-batches",
            F32,
            Recompute::Never,
            4,
            Segmented,
        ),
        config(
            "bf16",
            "BF16 compute, FP32 master weights (no loss scaling)",
            BF16,
            Recompute::Never,
            1,
            Segmented,
        ),
        config(
            "f16",
            "FP16 compute, FP32 master weights, dynamic loss scaling",
            F16,
            Recompute::Never,
            1,
            Segmented,
        ),
        config(
            "bf16+recompute-all+accum4",
            "BF16, every block recomputed, 4 micro-batches",
            BF16,
            Recompute::All,
            4,
            Segmented,
        ),
        BenchConfig {
            adamw8bit: true,
            ..config("adamw8bit", "FP32, AdamW with 8-bit moments", F32, Recompute::Never, 1, Segmented)
        },
        BenchConfig {
            state_on_device: true,
            ..config(
                "device-state",
                "FP32, state as tensors on the device (the tensor-op optimizer on CPU; fused kernels on a GPU)",
                F32,
                Recompute::Never,
                1,
                Segmented,
            )
        },
        BenchConfig {
            offload: true,
            ..config(
                "offload",
                "FP32, optimizer offloaded (step on the host's cores; pinned transfers on a GPU)",
                F32,
                Recompute::Never,
                1,
                Segmented,
            )
        },
        BenchConfig {
            adamw8bit: true,
            offload: true,
            ..config(
                "bf16+recompute-all+adamw8bit+offload",
                "BF16, every block recomputed, 8-bit AdamW offloaded",
                BF16,
                Recompute::All,
                1,
                Segmented,
            )
        },
        BenchConfig {
            zero: Some((1, 2)),
            ..config(
                "zero1",
                "FP32, ZeRO stage 1 on 2 in-process ranks (peak: the process, both ranks)",
                F32,
                Recompute::Never,
                1,
                Segmented,
            )
        },
        BenchConfig {
            zero: Some((2, 2)),
            ..config(
                "zero2",
                "FP32, ZeRO stage 2 on 2 in-process ranks (peak: the process, both ranks)",
                F32,
                Recompute::Never,
                1,
                Segmented,
            )
        },
        BenchConfig {
            zero: Some((3, 2)),
            ..config(
                "zero3",
                "FP32, ZeRO stage 3 on 2 in-process ranks (peak: the process, both ranks)",
                F32,
                Recompute::Never,
                1,
                Segmented,
            )
        },
    ]
}

/// Looks up configurations by name; `all` selects every one.
///
/// # Errors
/// An unknown name, listing the known ones.
pub fn select_configurations(names: &[String]) -> anyhow::Result<Vec<BenchConfig>> {
    let all = configurations();
    if names.is_empty() || names.iter().any(|n| n == "all") {
        return Ok(all);
    }
    let mut chosen = Vec::new();
    for name in names {
        match all.iter().find(|c| c.name == name) {
            Some(c) => chosen.push(*c),
            None => {
                let known: Vec<&str> = all.iter().map(|c| c.name).collect();
                bail!("unknown benchmark configuration `{name}`: known ones are {}", known.join(", "));
            }
        }
    }
    Ok(chosen)
}

/// A named model shape.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchModel {
    /// Its name in the tables (`L4-W128` for GPT, `LLaMA-L4-W128`).
    pub name: String,
    /// Its family and shape (GPT or LLaMA: the bench trains on the byte corpus).
    pub shape: ModelShape,
}

impl BenchModel {
    /// A byte-level GPT with `layers` blocks of width `width` (heads of 32 dimensions, at least
    /// one) and context `context`.
    pub fn gpt(layers: usize, width: usize, context: usize) -> Self {
        let config = GptConfig {
            n_layer: layers,
            n_embd: width,
            n_head: (width / 32).max(1),
            n_ctx: context,
            ..GptConfig::default()
        };
        Self { name: format!("L{layers}-W{width}"), shape: ModelShape::Gpt(config) }
    }

    /// A byte-level LLaMA (vocabulary 256, untied head) with `layers` decoder layers of width
    /// `width`: query heads of 32 dimensions (at least one), half as many key/value heads when
    /// that divides them, a SwiGLU block of 8/3 the width (rounded up to a multiple of 8), and
    /// context `context`.
    pub fn llama(layers: usize, width: usize, context: usize) -> Self {
        let heads = (width / 32).max(1);
        let config = LlamaConfig {
            vocab_size: 256,
            hidden_size: width,
            intermediate_size: (width * 8 / 3).div_ceil(8) * 8,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: if heads % 2 == 0 { heads / 2 } else { heads },
            max_position_embeddings: context,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            hidden_act: "silu".into(),
            ..LlamaConfig::tiny()
        };
        Self { name: format!("LLaMA-L{layers}-W{width}"), shape: ModelShape::Llama(config) }
    }
}

/// Settings shared by every run of a benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Sequences per optimizer step (the global batch).
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Measured steps (after warm-up).
    pub steps: usize,
    /// Warm-up steps, not timed.
    pub warmup: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Validation windows for the final loss.
    pub eval_windows: usize,
    /// Device.
    pub device: Device,
}

/// Step-time statistics, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepTime {
    /// Median over the measured steps.
    pub median: f64,
    /// Fastest measured step.
    pub min: f64,
    /// Slowest measured step.
    pub max: f64,
}

/// One run's results (the harness's JSON schema).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchRow {
    /// Configuration name.
    pub config: String,
    /// Model name.
    pub model: String,
    /// What produced the row: `candle-fit` (or `pytorch` for `benches/pytorch_reference.py`).
    pub framework: String,
    /// Device (`cpu`, `cuda:0`).
    pub device: String,
    /// `f32`, `bf16`, `f16`.
    pub precision: String,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per step.
    pub accum_steps: usize,
    /// Ranks.
    pub world_size: usize,
    /// Peak live bytes of a step (the largest over the measured steps), as `memory_source`
    /// counts them.
    pub peak_bytes: usize,
    /// What `peak_bytes` counts: `heap` (the counting allocator, CPU), `cuda-pool` (the CUDA
    /// memory pool's bytes in use, as `torch.cuda.max_memory_allocated`).
    pub memory_source: String,
    /// Whether FP32 matmuls ran in TF32.
    pub tf32: bool,
    /// The peak by category.
    pub bytes_by_category: std::collections::BTreeMap<String, usize>,
    /// The estimator's prediction of the peak, when available.
    pub predicted_peak_bytes: Option<usize>,
    /// Step time over the measured steps.
    pub step_time_s: StepTime,
    /// Training tokens per second at the median step time.
    pub tokens_per_s: f64,
    /// Validation loss after the run (nats per byte).
    pub final_loss: f64,
    /// Peak over the same model's baseline peak in this run.
    pub peak_vs_baseline: Option<f64>,
    /// Median step time over the baseline's.
    pub time_vs_baseline: Option<f64>,
    /// Host <-> device bytes of the last measured step, by cause (all zero on the CPU device;
    /// `null` where not counted, as in PyTorch rows).
    pub transfers_per_step: Option<candle_train::Transfers>,
}

fn device_name(device: &Device) -> String {
    match device.location() {
        candle::DeviceLocation::Cpu => "cpu".into(),
        candle::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Runs one configuration on one model.
///
/// # Errors
/// When the global batch does not divide into the configuration's micro-batches, or on any
/// training error.
pub fn run_one(
    model: &BenchModel,
    config: &BenchConfig,
    options: &BenchOptions,
    corpus: &Corpus,
) -> anyhow::Result<BenchRow> {
    let trainer_config = trainer_config(config, options)?;
    let micro_batch = trainer_config.micro_batch.get();
    let predicted_peak_bytes = predict_peak(model, config, options, &trainer_config, corpus)?;
    let trainer = Trainer::new(trainer_config);
    let (dtype, device, seed) = (config.precision.dtype(), &options.device, options.seed);
    // A process-wide cuBLAS setting: set for this run only.
    candle::cuda::set_gemm_reduced_precision_f32(config.tf32);
    let (report, world_size) = match &model.shape {
        ModelShape::Gpt(c) => fit_model(config, &trainer, corpus, |_| Gpt::new(*c, dtype, device, seed))?,
        ModelShape::Llama(c) => fit_model(config, &trainer, corpus, |_| Llama::new(c, dtype, device, seed))?,
        ModelShape::Bert { .. } => bail!("the bench trains on the byte corpus: GPT and LLaMA only"),
    };
    candle::cuda::set_gemm_reduced_precision_f32(false);
    let report =
        report.with_context(|| format!("configuration `{}` on model {}", config.name, model.name))?;
    let measured = &report.history[options.warmup..];
    let times: Vec<f64> = measured.iter().map(|r| r.step_time_s).collect();
    let median = median(&times);
    let (min, max) = times.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
    let tokens = (options.batch * options.seq_len) as f64;
    Ok(BenchRow {
        config: config.name.into(),
        model: model.name.clone(),
        framework: "candle-fit".into(),
        device: device_name(&options.device),
        precision: config.precision.name().into(),
        micro_batch,
        accum_steps: config.accumulation_steps,
        world_size,
        peak_bytes: report.memory.peak,
        memory_source: DeviceMeter::for_device(&options.device).source().into(),
        tf32: config.tf32 && options.device.is_cuda(),
        bytes_by_category: report.memory.categories().iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        predicted_peak_bytes,
        step_time_s: StepTime { median, min, max },
        tokens_per_s: tokens / median,
        final_loss: report.final_val_loss,
        peak_vs_baseline: None,
        time_vs_baseline: None,
        transfers_per_step: report.history.last().map(|r| r.transfers),
    })
}

/// Trains the model `make_model` builds under `config` (on in-process ranks for ZeRO): the
/// report of rank 0 and the number of ranks.
fn fit_model<M, F>(
    config: &BenchConfig,
    trainer: &Trainer,
    corpus: &Corpus,
    make_model: F,
) -> anyhow::Result<(anyhow::Result<candle_train::TrainReport>, usize)>
where
    M: TrainableModel<Batch = candle_train::TokenBatch> + Send,
    F: Fn(usize) -> candle_train::Result<M> + Sync,
{
    Ok(match config.zero {
        None => {
            let report = make_model(0).and_then(|model| {
                let mut updater = if config.state_on_device {
                    LocalUpdater::on_device(model.parameters(), &optimizer(config))?
                } else {
                    LocalUpdater::from_config(model.parameters(), &optimizer(config))?
                };
                if config.offload {
                    updater = updater.offloaded()?;
                }
                trainer.fit(&model, corpus, &mut updater)
            });
            (report.map_err(anyhow::Error::from), 1)
        }
        Some((stage, world_size)) => {
            let in_process = InProcessConfig {
                world_size: std::num::NonZeroUsize::new(world_size).context("no ranks")?,
                stage: ZeroStage::from_number(stage)?,
                timeout: std::time::Duration::from_secs(600),
            };
            let runs = fit_in_process(&in_process, trainer, corpus, &optimizer(config), make_model);
            let report = runs
                .map_err(anyhow::Error::from)
                .and_then(|runs| runs.into_iter().next().map(|r| r.report).context("no rank ran"));
            (report, world_size)
        }
    })
}

fn optimizer(config: &BenchConfig) -> OptimizerConfig {
    let adamw = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    if config.adamw8bit {
        OptimizerConfig::AdamW8bit(adamw)
    } else {
        OptimizerConfig::AdamW(adamw)
    }
}

fn trainer_config(config: &BenchConfig, options: &BenchOptions) -> anyhow::Result<TrainerConfig> {
    if options.batch % config.accumulation_steps != 0 {
        bail!(
            "configuration `{}` cuts the batch into {} micro-batches, which does not divide the batch of {}",
            config.name,
            config.accumulation_steps,
            options.batch
        );
    }
    let total_steps = options.warmup.checked_add(options.steps).ok_or_else(|| {
        anyhow::anyhow!("invalid `--warmup`/`--steps`: {} + {} steps overflow", options.warmup, options.steps)
    })?;
    Ok(TrainerConfig::builder()
        .micro_batch(options.batch / config.accumulation_steps)
        .accumulation_steps(config.accumulation_steps)
        .steps(total_steps)
        .seq_len(options.seq_len)
        .lr(options.lr)
        .warmup_steps(total_steps / 4)
        .eval_interval(0)
        .eval_windows(options.eval_windows)
        .seed(options.seed)
        .recompute(config.recompute)
        .backward(config.backward)
        .loss_scaling(config.precision.default_loss_scaling())
        .build()?)
}

/// The estimator's peak for a run, or `None` where it does not model the run (plain backward,
/// devices other than the CPU, ZeRO ranks, the device-resident store's lazily allocated
/// accumulators and tensor-op temporaries).
fn predict_peak(
    model: &BenchModel,
    config: &BenchConfig,
    options: &BenchOptions,
    trainer: &TrainerConfig,
    corpus: &Corpus,
) -> anyhow::Result<Option<usize>> {
    if config.backward != BackwardMode::Segmented
        || !options.device.is_cpu()
        || config.zero.is_some()
        || config.state_on_device
    {
        return Ok(None);
    }
    let corpus_bytes = corpus.split(Split::Train).len() + corpus.split(Split::Validation).len();
    let validation_fraction = corpus.split(Split::Validation).len() as f64 / corpus_bytes as f64;
    let input = EstimateInput::for_trainer(
        model.shape.clone(),
        config.precision.dtype(),
        trainer,
        optimizer(config),
        corpus_bytes,
        validation_fraction,
    )?;
    Ok(Some(estimate_memory(&input)?.peak))
}

/// The predicted peak of every run of a grid, before any runs: (model, configuration, bytes).
///
/// # Errors
/// A configuration that does not divide the batch, or a model the estimator refuses.
pub fn predict_grid(
    models: &[BenchModel],
    configs: &[BenchConfig],
    options: &BenchOptions,
    corpus: &Corpus,
) -> anyhow::Result<Vec<(String, String, Option<usize>)>> {
    let mut out = Vec::new();
    for model in models {
        for config in configs {
            let trainer = trainer_config(config, options)?;
            out.push((
                model.name.clone(),
                config.name.to_string(),
                predict_peak(model, config, options, &trainer, corpus)?,
            ));
        }
    }
    Ok(out)
}

/// Fills in each row's ratios against its model's baseline row.
pub fn add_ratios(rows: &mut [BenchRow]) {
    let baselines: Vec<(String, usize, f64)> = rows
        .iter()
        .filter(|r| r.config == BASELINE)
        .map(|r| (r.model.clone(), r.peak_bytes, r.step_time_s.median))
        .collect();
    for row in rows.iter_mut() {
        if let Some((_, peak, time)) = baselines.iter().find(|(m, _, _)| *m == row.model) {
            row.peak_vs_baseline = Some(row.peak_bytes as f64 / *peak as f64);
            row.time_vs_baseline = Some(row.step_time_s.median / time);
        }
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

/// The rows as a Markdown table.
pub fn markdown_table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| model | config | precision | micro x accum | peak MiB | vs fp32 | params | grads | master | optim | activations | predicted MiB | step ms (median, min-max) | vs fp32 | tokens/s | val loss |\n\
         |---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let cat = |k: &str| mib(r.bytes_by_category.get(k).copied().unwrap_or(0));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} x {} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.0} ({:.0}-{:.0}) | {} | {:.0} | {:.4} |",
            r.model,
            r.config,
            r.precision,
            r.micro_batch,
            r.accum_steps,
            mib(r.peak_bytes),
            ratio(r.peak_vs_baseline),
            cat("parameters"),
            cat("gradients"),
            cat("master_weights"),
            cat("optimizer_state"),
            cat("activations"),
            r.predicted_peak_bytes.map(|b| format!("{:.1}", mib(b))).unwrap_or_else(|| "-".into()),
            r.step_time_s.median * 1e3,
            r.step_time_s.min * 1e3,
            r.step_time_s.max * 1e3,
            ratio(r.time_vs_baseline),
            r.tokens_per_s,
            r.final_loss,
        );
    }
    out
}

/// Whether peaks are measured (the counting allocator is installed).
pub fn memory_is_measured() -> bool {
    memory::is_installed()
}

/// Bytes of memory the OS says are available (Linux `MemAvailable`), if it says.
pub fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
