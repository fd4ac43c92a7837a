//! `candle-fit finetune`: fine-tune a causal language model (a LLaMA-family or GPT-2 Hugging
//! Face folder, a GGUF file, or the packaged `smollm2`) on text, prompt/completion or chat
//! records, fully or with LoRA adapters, or a BERT sequence classifier (a
//! `BertForSequenceClassification` folder, or a `BertModel` folder given a new head) on
//! classification records, through the Trainer, and write a Hugging Face folder that
//! `candle-fit eval`/`generate` (and `transformers`) load, reloaded and compared bit for bit.
//!
//! Everything is validated before the model is loaded or training starts: the flags
//! ([`FinetuneOptions::validate`]), the data files (one line naming file, line and field), the
//! model (one that cannot train on the records is refused) and the output folder.

mod classifier;

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle::{DType, Device};
use candle_train::evaluate::Metrics;
use candle_train::generate::CausalLm;
use candle_train::lora::peft::PeftInfo;
use candle_train::lora::{LoraConfig, LoraModel};
use candle_train::models::{Gpt, Llama};
use candle_train::module::Module;
use candle_train::params::Parameters;
use candle_train::serve::Snapshot;
use candle_train::source::DataSource;
use candle_train::{
    Callback, Hooks, LanguageModel, LocalUpdater, LossScalerConfig, LrSchedule, OptimizerConfig, Precision,
    TrainReport, TrainableModel, Trainer, TrainerConfig, Updater,
};

use crate::ckpt::Recompute;
use crate::datasets::{
    encode_record, pack, read_records, ChatTemplate, Example, Format, Records, TokenDataset,
};
use crate::gguf_tokenizer::LmTokenizer;
use crate::model_source::{load_causal_lm_quantized, load_model, LoadedModel};
use candle_train::quant::BaseQuantization;

/// SmolLM2-Instruct's chat template (ChatML), used when a model's tokenizer ships none.
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The files `finetune` writes (and removes from an overwritten output folder first).
pub const OUTPUT_FILES: [&str; 7] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "adapter_config.json",
    "adapter_model.safetensors",
];

/// The learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Cosine decay to a tenth of the peak rate at the last step (the Trainer's default).
    Cosine,
    /// The peak rate throughout (no warm-up).
    Constant,
}

/// LoRA settings of a fine-tuning run.
#[derive(Debug, Clone)]
pub struct LoraOptions {
    /// The rank `r`.
    pub rank: usize,
    /// `alpha` (by default twice the rank).
    pub alpha: Option<f64>,
    /// Dropout on the adapters' input.
    pub dropout: f32,
    /// Module name patterns (`q_proj,v_proj` or `all-linear`); empty: the architecture's
    /// attention projections ([`HfCausalLm::LORA_TARGETS`]: `q_proj,v_proj` for the LLaMA
    /// family, `c_attn` for GPT-2).
    pub targets: Vec<String>,
    /// Also write the merged model as a Hugging Face folder.
    pub merge: bool,
    /// QLoRA: hold the frozen base's decoder-layer affine weights quantized (`--quantize-base`).
    pub quantize_base: Option<BaseQuantization>,
}

impl LoraOptions {
    /// The adapters' configuration: `alpha` twice the rank when not given, `default_targets`
    /// when no target is given, no rsLoRA (what `finetune` trains and `estimate` predicts).
    pub fn config(&self, default_targets: &[&str]) -> LoraConfig {
        let targets = match self.targets.is_empty() {
            true => default_targets.iter().map(|t| t.to_string()).collect(),
            false => self.targets.clone(),
        };
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha.unwrap_or(2.0 * self.rank as f64),
            dropout: self.dropout,
            targets,
            use_rslora: false,
            quantize_base: self.quantize_base,
        }
    }
}

/// Everything a `finetune` run is made of.
#[derive(Debug, Clone)]
pub struct FinetuneOptions {
    /// `--model`: a folder, a `.gguf` file or a packaged short name.
    pub model: String,
    /// Training records (JSONL: text, prompt/completion or chat messages for a causal language
    /// model; text + label, JSONL or CSV, for a classifier).
    pub data: PathBuf,
    /// Held-out records; without them the evaluations run on the training examples.
    pub valid: Option<PathBuf>,
    /// The output folder.
    pub out: PathBuf,
    /// Replace the contents of a non-empty output folder.
    pub overwrite: bool,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule after warm-up.
    pub schedule: Schedule,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub accumulation_steps: usize,
    /// Tokens per sequence (text is packed into windows of `seq_len + 1`, other records cut).
    pub seq_len: usize,
    /// Training precision.
    pub precision: Precision,
    /// Dynamic loss scaling (`None`: the precision's default, on for f16 only).
    pub loss_scaling: Option<bool>,
    /// Recomputation policy.
    pub recompute: Recompute,
    /// Global-norm clipping (`None`: off).
    pub max_grad_norm: Option<f64>,
    /// The optimizer.
    pub optimizer: OptimizerConfig,
    /// Step the optimizer on the host with its state there.
    pub offload_optimizer: bool,
    /// Training-state checkpoints go here.
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every this many steps.
    pub checkpoint_every: Option<usize>,
    /// Keep this many of the newest checkpoints.
    pub keep_checkpoints: usize,
    /// A limit on live heap bytes during a step (out of memory above it).
    pub max_memory: Option<usize>,
    /// Before training, pick the largest micro-batch that fits `max_memory`.
    pub find_micro_batch: bool,
    /// Halve the micro-batch and retry on an out-of-memory error.
    pub oom_recovery: bool,
    /// Continue from this checkpoint (or run directory).
    pub resume: Option<PathBuf>,
    /// Per-step metrics as JSON lines.
    pub metrics: Option<PathBuf>,
    /// Evaluate every this many steps (0: at the start and the end only).
    pub eval_interval: usize,
    /// Held-out sequences per evaluation.
    pub eval_samples: usize,
    /// Seed of data order and dropout.
    pub seed: u64,
    /// Show the progress bar.
    pub progress: bool,
    /// LoRA instead of full fine-tuning.
    pub lora: Option<LoraOptions>,
    /// ZeRO stage of data-parallel training (`None`: one rank, no sharding; stage 0 when only
    /// `world_size` is given).
    pub zero: Option<u8>,
    /// Data-parallel ranks as threads of this process (the micro-batch is the global one,
    /// split over them). A rank started by `candle-fit launch` (or torchrun, Slurm) takes its
    /// rank and world size from the environment instead and talks TCP.
    pub world_size: usize,
    /// Seconds a rank waits for its peers in a collective before failing.
    pub comm_timeout_s: u64,
    /// Where the model trains: `cpu`, `cuda` or `cuda:N` (a bare `cuda` in a launched rank
    /// takes its `LOCAL_RANK`'s GPU).
    pub device: String,
    /// The classes of a new head on a BERT encoder (`None`: one per label in the training
    /// records); with integer labels below it, the classes are `0..num_labels`.
    pub num_labels: Option<usize>,
}

/// The most data-parallel ranks `finetune` runs.
pub const MAX_RANKS: usize = 1024;

impl FinetuneOptions {
    /// Checks the flags and their combinations, before anything is read.
    ///
    /// # Errors
    /// One line naming the flag at fault.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, n) in [
            ("--steps", self.steps),
            ("--micro-batch", self.micro_batch),
            ("--accumulation-steps", self.accumulation_steps),
            ("--seq-len", self.seq_len),
            ("--eval-samples", self.eval_samples),
        ] {
            anyhow::ensure!(n > 0, "invalid `{name}`: must be at least 1");
        }
        anyhow::ensure!(self.lr.is_finite() && self.lr > 0.0, "invalid `--lr`: {} is not positive", self.lr);
        if let Some(max) = self.max_grad_norm {
            anyhow::ensure!(max.is_finite() && max > 0.0, "invalid `--max-grad-norm`: {max} is not positive");
        }
        anyhow::ensure!(
            self.checkpoint_every.is_none() || self.checkpoint_dir.is_some() || self.resume.is_some(),
            "`--checkpoint-every` needs `--checkpoint-dir` (or `--resume`) to say where checkpoints go"
        );
        anyhow::ensure!(
            !self.find_micro_batch || self.max_memory.is_some(),
            "`--find-micro-batch` needs `--max-memory` (the budget the micro-batch must fit)"
        );
        anyhow::ensure!(self.keep_checkpoints > 0, "invalid `--keep-checkpoints`: must be at least 1");
        anyhow::ensure!(
            (1..=MAX_RANKS).contains(&self.world_size),
            "invalid `--world-size`: {} is not between 1 and {MAX_RANKS}",
            self.world_size
        );
        anyhow::ensure!(
            self.zero.is_none_or(|z| z <= 3),
            "invalid `--zero`: {} is not a ZeRO stage (0, 1, 2 or 3)",
            self.zero.unwrap_or_default()
        );
        anyhow::ensure!(
            (1..=7 * 24 * 3600).contains(&self.comm_timeout_s),
            "invalid `--comm-timeout`: {} s is not between 1 s and a week",
            self.comm_timeout_s
        );
        // A launched process's ranks come from its environment.
        let ranks = launched_rank().map_or(self.world_size, |(_, world_size)| world_size);
        anyhow::ensure!(
            launched_rank().is_none() || self.world_size == 1,
            "invalid `--world-size`: the launcher sets the ranks (give their number to `launch --nproc`)"
        );
        if self.zero.is_some() || ranks > 1 {
            for (flag, given) in [
                ("--offload-optimizer", self.offload_optimizer),
                ("--find-micro-batch", self.find_micro_batch),
                ("--metrics", self.metrics.is_some() && ranks > 1),
            ] {
                anyhow::ensure!(
                    !given,
                    "`{flag}` is not available with `--zero` or several ranks yet (it works on one device's state)"
                );
            }
            anyhow::ensure!(
                self.micro_batch >= ranks,
                "invalid `--micro-batch`: {} sequences cannot be split over {ranks} ranks",
                self.micro_batch
            );
        }
        anyhow::ensure!(self.num_labels != Some(0), "invalid `--num-labels`: must be at least 1");
        if let Some(every) = self.checkpoint_every {
            anyhow::ensure!(every > 0, "invalid `--checkpoint-every`: must be at least 1");
        }
        if let Some(lora) = &self.lora {
            anyhow::ensure!(lora.rank > 0, "invalid `--lora-rank`: must be at least 1");
            anyhow::ensure!(
                (0.0..1.0).contains(&lora.dropout),
                "invalid `--lora-dropout`: {} is not in [0, 1)",
                lora.dropout
            );
            if let Some(alpha) = lora.alpha {
                anyhow::ensure!(
                    alpha.is_finite() && alpha > 0.0,
                    "invalid `--lora-alpha`: {alpha} is not positive"
                );
            }
            anyhow::ensure!(
                lora.targets.iter().all(|t| !t.trim().is_empty()),
                "invalid `--lora-targets`: an empty module name (give q_proj,v_proj, c_attn or all-linear)"
            );
        }
        if let Some(quantization) = self.lora.as_ref().and_then(|l| l.quantize_base) {
            anyhow::ensure!(
                quantization != BaseQuantization::Gguf || crate::model_source::is_gguf(&self.model),
                "invalid `--quantize-base gguf`: it keeps a GGUF file's own blocks, but --model `{}` is not a .gguf file (use nf4, q4_0, q4_1 or q8_0)",
                self.model
            );
            anyhow::ensure!(
                !self.lora.as_ref().is_some_and(|l| l.merge),
                "`--merge` with `--quantize-base`: the adapters cannot be merged into a quantized base (load the adapter folder with eval/generate, which merge it into the dense base)"
            );
        }
        for (name, path) in [("--data", Some(&self.data)), ("--valid", self.valid.as_ref())] {
            if let Some(path) = path {
                anyhow::ensure!(path.is_file(), "{name} {}: no such file", path.display());
            }
        }
        if self.out.exists() && launched_rank().is_none_or(|(rank, _)| rank == 0) {
            anyhow::ensure!(self.out.is_dir(), "--out {}: exists and is not a folder", self.out.display());
            let non_empty = std::fs::read_dir(&self.out)
                .with_context(|| format!("--out {}", self.out.display()))?
                .next()
                .is_some();
            anyhow::ensure!(
                !non_empty || self.overwrite,
                "--out {}: the folder is not empty (pass --overwrite to replace its files)",
                self.out.display()
            );
        }
        Ok(())
    }

    fn trainer_config(&self) -> anyhow::Result<TrainerConfig> {
        let loss_scaling = match self.loss_scaling {
            None => self.precision.default_loss_scaling(),
            Some(true) => Some(LossScalerConfig::default()),
            Some(false) => None,
        };
        let mut config = TrainerConfig::builder()
            .micro_batch(self.micro_batch)
            .accumulation_steps(self.accumulation_steps)
            .steps(self.steps)
            .seq_len(self.seq_len)
            .lr(self.lr)
            .warmup_steps(self.warmup_steps)
            .max_grad_norm(self.max_grad_norm)
            .eval_interval(self.eval_interval)
            .eval_windows(self.eval_samples)
            .seed(self.seed)
            .progress(self.progress)
            .metrics_path(self.metrics.clone())
            .recompute(self.recompute)
            .loss_scaling(loss_scaling)
            .max_memory(self.max_memory)
            .oom_recovery(self.oom_recovery)
            .find_micro_batch(self.find_micro_batch);
        if self.schedule == Schedule::Constant {
            config = config.schedule(LrSchedule::Constant { lr: self.lr });
        }
        let dir = match (&self.checkpoint_dir, &self.resume) {
            (Some(dir), _) => Some(dir.clone()),
            (None, Some(resume)) => Some(candle_train::checkpoint::run_dir_of(resume)),
            (None, None) => None,
        };
        if let Some(dir) = dir {
            config = config.checkpoint(dir, self.checkpoint_every.unwrap_or(100), self.keep_checkpoints);
        }
        Ok(config.build()?)
    }
}

/// The chat template of `tokenizer` (ChatML when it has none), with its bos/eos token text.
///
/// # Errors
/// When the template does not parse.
pub fn chat_template(tokenizer: &LmTokenizer) -> anyhow::Result<ChatTemplate> {
    let token = |id: Option<u32>| id.and_then(|id| tokenizer.token(id)).unwrap_or_default();
    let source = tokenizer.chat_template().unwrap_or(CHATML);
    let eos = match token(tokenizer.eos_id()) {
        e if e.is_empty() => "<|im_end|>".to_string(),
        e => e,
    };
    Ok(ChatTemplate::new(source, &token(tokenizer.bos_id()), &eos)?)
}

/// The language-model examples of a JSONL file: text records packed into windows of
/// `seq_len + 1` tokens, prompt/completion with the prompt masked, chat messages with loss on
/// the assistant turns; every example cut to `seq_len + 1` tokens.
///
/// # Errors
/// A record error names file, line and field; classification records are refused.
pub fn read_examples(path: &Path, tokenizer: &LmTokenizer, seq_len: usize) -> anyhow::Result<Vec<Example>> {
    let records = read_records(path, None)?;
    anyhow::ensure!(
        records.format != Format::Classification,
        "{}: classification records (text + label), but finetune trains a causal language model",
        path.display()
    );
    encode_records(path, &records, tokenizer, seq_len)
}

fn encode_records(
    path: &Path,
    records: &Records,
    tokenizer: &LmTokenizer,
    seq_len: usize,
) -> anyhow::Result<Vec<Example>> {
    let template = match records.format {
        Format::Chat => Some(chat_template(tokenizer)?),
        _ => None,
    };
    let window = seq_len + 1;
    let name = path.display().to_string();
    let mut examples = tokenize_records(&name, records, tokenizer, template.as_ref(), window)?;
    for example in &mut examples {
        example.truncate(window);
    }
    examples.retain(|e| e.counted_targets() > 0);
    anyhow::ensure!(!examples.is_empty(), "{}: no record has a token to train on", path.display());
    Ok(examples)
}

/// Each language-model record of the file `name` tokenized (a conversation through
/// `template`), text records packed into windows of `window` tokens.
///
/// # Errors
/// A record that does not tokenize, naming the file and line.
pub(crate) fn tokenize_records(
    name: &str,
    records: &Records,
    tokenizer: &LmTokenizer,
    template: Option<&ChatTemplate>,
    window: usize,
) -> anyhow::Result<Vec<Example>> {
    let encoded = records
        .records
        .iter()
        .map(|(line, record)| {
            encode_record(record, tokenizer, template).with_context(|| format!("{name}:{line}: tokenizing"))
        })
        .collect::<anyhow::Result<Vec<Example>>>()?;
    Ok(if records.format == Format::Text { pack(&encoded, window) } else { encoded })
}

/// What a run did.
#[derive(Debug)]
pub struct FinetuneOutcome {
    /// The Trainer's report.
    pub report: TrainReport,
    /// Trainable parameters (the adapters' under LoRA).
    pub trainable: usize,
    /// Whether the folder holds a full model that was reloaded and compared bit for bit.
    pub verified: bool,
}

/// Prints every evaluation (and the accuracy, for a classifier).
struct Report;

impl Callback for Report {
    fn on_evaluation(&mut self, step: u64, metrics: &Metrics) -> candle_train::Result<()> {
        let get = |name: &str| metrics.get(name).copied().unwrap_or(f64::NAN);
        let accuracy = metrics.get("accuracy").map(|a| format!("  accuracy {a:.4}")).unwrap_or_default();
        println!(
            "step {step:5}  held-out loss {:.4}  perplexity {:.3}{accuracy}",
            get("loss"),
            get("perplexity")
        );
        Ok(())
    }
}

/// The rank and world size of a process started by a launcher (`candle-fit launch`,
/// torchrun, Slurm) with more than one rank, from its environment.
fn launched_rank() -> Option<(usize, usize)> {
    let info = candle_shard::discovery::RankInfo::from_env().ok().flatten()?;
    (info.world_size > 1).then_some((info.rank, info.world_size))
}

/// Trains `model` on `data` as `options` say: on one device (evaluated by `hooks`' evaluator),
/// or as rank 0 of `--world-size` in-process ranks under ZeRO (the other ranks' copies from
/// `replica`), or as this process's rank of a launched group over TCP (both evaluated by the
/// loss). Returns the report, the trained model (whole, whatever the stage) and whether this
/// process writes the output (rank 0).
fn train_ranks<M, D, F>(
    model: M,
    options: &FinetuneOptions,
    data: &D,
    replica: F,
    hooks: Hooks<'_, M>,
) -> anyhow::Result<(TrainReport, M, bool)>
where
    M: TrainableModel<Batch = D::Batch> + Send,
    D: DataSource + Sync,
    F: Fn() -> candle_train::Result<M> + Sync,
{
    use candle_shard::driver::{fit_in_process, fit_rank, resume_in_process, resume_rank, InProcessConfig};
    use candle_shard::ZeroStage;
    let launched = candle_shard::discovery::RankInfo::from_env()?.filter(|i| i.world_size > 1);
    if options.zero.is_none() && options.world_size == 1 && launched.is_none() {
        let report = fit(&model, options, data, hooks)?;
        return Ok((report, model, true));
    }
    // `validate` refused what several ranks cannot do (offload, the search, a contradicting
    // `--world-size`).
    let stage = ZeroStage::from_number(options.zero.unwrap_or(0))?;
    let mut config = options.trainer_config()?;
    // One progress bar per rank would interleave on stderr.
    config.progress = false;
    let trainer = Trainer::new(config);
    let timeout = std::time::Duration::from_secs(options.comm_timeout_s);
    if let Some(info) = launched {
        let comm = Box::new(candle_shard::comm::TcpCommunicator::connect(&info, timeout)?);
        let run = match &options.resume {
            Some(dir) => resume_rank(stage, comm, &trainer, data, &options.optimizer, model, dir)?,
            None => fit_rank(stage, comm, &trainer, data, &options.optimizer, model)?,
        };
        return Ok((run.report, run.model, info.rank == 0));
    }
    let world_size = std::num::NonZeroUsize::new(options.world_size).context("--world-size")?;
    println!(
        "ZeRO {stage:?} on {world_size} in-process ranks (the micro-batch of {} split over them)",
        options.micro_batch
    );
    // Rank 0 trains the loaded model; the others train copies (rank 0's values are broadcast).
    let first = std::sync::Mutex::new(Some(model));
    let make = |rank: usize| match rank {
        0 => first
            .lock()
            .map_err(|_| candle_train::Error::config("finetune", "a rank panicked"))?
            .take()
            .ok_or_else(|| candle_train::Error::config("finetune", "rank 0's model was taken twice")),
        _ => replica(),
    };
    let config = InProcessConfig { world_size, stage, timeout };
    let runs = match &options.resume {
        Some(dir) => resume_in_process(&config, &trainer, data, &options.optimizer, dir, make)?,
        None => fit_in_process(&config, &trainer, data, &options.optimizer, make)?,
    };
    let run = runs.into_iter().next().context("no rank ran")?;
    Ok((run.report, run.model, true))
}

fn fit<M, D>(
    model: &M,
    options: &FinetuneOptions,
    data: &D,
    hooks: Hooks<'_, M>,
) -> anyhow::Result<TrainReport>
where
    M: TrainableModel<Batch = D::Batch>,
    D: DataSource,
{
    let mut updater = LocalUpdater::from_config(model.parameters(), &options.optimizer)?;
    if options.offload_optimizer {
        updater = updater.offloaded()?;
    }
    let trainer = Trainer::new(options.trainer_config()?);
    let hooks = hooks.callback(Report);
    let report = match &options.resume {
        Some(dir) => trainer.resume_with(model, data, &mut updater, dir, hooks)?,
        None => trainer.fit_with(model, data, &mut updater, hooks)?,
    };
    let state = updater.state_bytes();
    println!(
        "optimizer state {:.1} MiB (gradients, master weights, moments)",
        (state.gradients + state.master_weights + state.optimizer_state) as f64 / (1 << 20) as f64
    );
    Ok(report)
}

/// Prints the memory of the step with the highest peak, by category (the counting allocator's
/// live heap bytes).
fn print_memory(report: &TrainReport) {
    let m = &report.memory;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!("memory of the step with the highest peak (live heap, MiB):");
    println!("| parameters | gradients | master weights | optimizer state | activations | other | peak |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        mib(m.parameters),
        mib(m.gradients),
        mib(m.master_weights),
        mib(m.optimizer_state),
        mib(m.activations),
        mib(m.other),
        mib(m.peak)
    );
}

/// Checks that every parameter of `mine` equals the one named `saved_name(name)` in `theirs`
/// (a reload of the folder `dir`) bit for bit.
///
/// # Errors
/// When a parameter is missing from `theirs` or differs (named).
pub fn compare_parameters(
    mine: &Parameters,
    theirs: &Parameters,
    dir: &Path,
    saved_name: impl Fn(&str) -> String,
) -> anyhow::Result<()> {
    for mine in mine.iter() {
        let name = saved_name(&mine.name);
        let other = theirs.get(&name).with_context(|| format!("{}: no `{name}`", dir.display()))?;
        let bits = |t: &candle::Tensor| -> anyhow::Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect())
        };
        anyhow::ensure!(
            bits(&mine.tensor()?)? == bits(&other.tensor()?)?,
            "{}: reloaded `{}` differs from the trained one",
            dir.display(),
            mine.name
        );
    }
    Ok(())
}

/// Reloads the folder `dir` in `dtype` and checks every parameter equals `model`'s bit for bit.
///
/// # Errors
/// When the folder does not load or a parameter differs (named).
pub fn verify_reload<M: HfCausalLm>(model: &M, dir: &Path, dtype: DType) -> anyhow::Result<()> {
    let reloaded = M::load(dir, dtype)?;
    compare_parameters(
        TrainableModel::parameters(model),
        TrainableModel::parameters(&reloaded),
        dir,
        str::to_string,
    )
}

/// A causal language model `finetune` trains and writes as a Hugging Face folder.
pub trait HfCausalLm: LanguageModel + CausalLm + Module + Snapshot + Send + Sync + Sized {
    /// The LoRA targets when `--lora-targets` is not given (the query and value projections).
    const LORA_TARGETS: &'static [&'static str];

    /// Writes the model and `tokenizer` as a Hugging Face folder in `dir`.
    ///
    /// # Errors
    /// A file-system error, naming the file.
    fn save(&self, tokenizer: &LmTokenizer, dir: &Path) -> anyhow::Result<()>;

    /// The model of the folder `dir` (as [`HfCausalLm::save`] writes it) in `dtype` on the CPU.
    ///
    /// # Errors
    /// A file that does not load, naming it.
    fn load(dir: &Path, dtype: DType) -> anyhow::Result<Self>;
}

impl HfCausalLm for Llama {
    const LORA_TARGETS: &'static [&'static str] = &["q_proj", "v_proj"];

    fn save(&self, tokenizer: &LmTokenizer, dir: &Path) -> anyhow::Result<()> {
        crate::export::save_llama(self, tokenizer, dir)
    }

    fn load(dir: &Path, dtype: DType) -> anyhow::Result<Self> {
        Ok(crate::export::load_llama(dir, dtype, &Device::Cpu)?.0)
    }
}

impl HfCausalLm for Gpt {
    const LORA_TARGETS: &'static [&'static str] = &["c_attn"];

    fn save(&self, tokenizer: &LmTokenizer, dir: &Path) -> anyhow::Result<()> {
        crate::export::save_gpt2(self, tokenizer, dir)
    }

    fn load(dir: &Path, dtype: DType) -> anyhow::Result<Self> {
        Ok(crate::export::load_gpt2(dir, dtype, &Device::Cpu)?.0)
    }
}

/// Runs `finetune`: validates, loads, trains, writes `options.out`.
///
/// # Errors
/// A flag, data, model or output error (one line), or a training error.
pub fn run(options: &FinetuneOptions) -> anyhow::Result<FinetuneOutcome> {
    options.validate()?;
    // Records are parsed (and their fields checked) before the model loads.
    let train_records = read_records(&options.data, None)?;
    let valid_records = options.valid.as_ref().map(|p| read_records(p, None)).transpose()?;
    let classify = train_records.format == Format::Classification;
    if let (Some(path), Some(records)) = (&options.valid, &valid_records) {
        anyhow::ensure!(
            (records.format == Format::Classification) == classify,
            "--valid {}: {} records, but --data {} holds {} records",
            path.display(),
            records.format,
            options.data.display(),
            train_records.format
        );
    }
    anyhow::ensure!(
        classify || options.num_labels.is_none(),
        "`--num-labels` needs classification records (text + label) in --data {}",
        options.data.display()
    );
    let dtype = options.precision.dtype();
    let device = candle_train::device::parse_device(&options.device)
        .with_context(|| format!("invalid `--device` `{}`", options.device))?;
    if classify {
        return classifier::finetune_classifier(
            options,
            &train_records,
            valid_records.as_ref(),
            dtype,
            &device,
        );
    }
    let records = (&train_records, valid_records.as_ref());
    if let Some(quantization) = options.lora.as_ref().and_then(|l| l.quantize_base) {
        let (model, tokenizer) = load_causal_lm_quantized(&options.model, quantization, dtype, &device)?;
        let quantized = model.quantized_weights();
        let elements: usize = quantized.iter().map(|q| q.dims().0 * q.dims().1).sum();
        let bytes: usize = quantized.iter().map(|q| q.storage_bytes()).sum();
        println!(
            "QLoRA base: {} affine weights ({:.1}M values) held as {quantization} in {:.1} MiB",
            quantized.len(),
            elements as f64 / 1e6,
            bytes as f64 / (1 << 20) as f64
        );
        drop(quantized);
        return finetune_lm(model, &tokenizer, options, records);
    }
    match load_model(&options.model, dtype, &device)? {
        LoadedModel::CausalLm { model, tokenizer } => finetune_lm(model, &tokenizer, options, records),
        LoadedModel::Gpt2 { model, tokenizer } => finetune_lm(model, &tokenizer, options, records),
        LoadedModel::Classifier { .. } => anyhow::bail!(
            "--data {}: {} records, but --model {} is a BertForSequenceClassification (it trains on \
             text + label records)",
            options.data.display(),
            train_records.format,
            options.model
        ),
    }
}

/// Creates the output folder, removing the model and adapter files of an overwritten one.
fn prepare_output(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // An overwritten folder loses the files a model folder is read by, so that no stale model
    // (a full model beside a new adapter) is loaded from it; other files stay.
    for name in OUTPUT_FILES.iter().chain(&crate::export::BERT_TOKENIZER_FILES) {
        let path = out.join(name);
        if path.is_file() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

fn print_start(options: &FinetuneOptions, parameters: usize, examples: usize) {
    println!(
        "model {} ({:.1}M parameters, {}); {examples} training examples from {}{}",
        options.model,
        parameters as f64 / 1e6,
        options.precision.name(),
        options.data.display(),
        if options.valid.is_some() { "" } else { " (evaluated on the training examples: no --valid)" }
    );
}

/// Fine-tunes a causal language model on language-model records (`records`: the training and
/// held-out ones), fully or with LoRA, and writes its folder.
fn finetune_lm<M: HfCausalLm>(
    model: M,
    tokenizer: &LmTokenizer,
    options: &FinetuneOptions,
    (train_records, valid_records): (&Records, Option<&Records>),
) -> anyhow::Result<FinetuneOutcome> {
    let dtype = options.precision.dtype();
    let context = model.max_positions();
    anyhow::ensure!(
        options.seq_len <= context,
        "invalid `--seq-len`: {} is longer than the model's context ({context})",
        options.seq_len
    );
    let train = encode_records(&options.data, train_records, tokenizer, options.seq_len)?;
    let valid = match (&options.valid, valid_records) {
        (Some(path), Some(records)) => encode_records(path, records, tokenizer, options.seq_len)?,
        _ => train.clone(),
    };
    let name = options.data.display().to_string();
    let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
    let data = TokenDataset::new(&name, train, valid, pad)?;
    print_start(options, TrainableModel::parameters(&model).num_elements(), data.train().len());
    prepare_output(&options.out)?;
    // Under ZeRO the ranks other than 0 train copies of the base (their values are replaced
    // by rank 0's broadcast); one device keeps only the loaded model. A quantized base
    // (QLoRA) is immutable: the in-process ranks' copies share its blocks (`Snapshot`), and a
    // launched rank loaded its own.
    let sharded = options.zero.is_some() || options.world_size > 1;
    let source = if sharded { Some(model.snapshot()?) } else { None };
    let base_copy = || -> candle_train::Result<M> {
        source
            .as_ref()
            .ok_or_else(|| candle_train::Error::config("finetune", "no copy to replicate"))?
            .snapshot()
    };
    let Some(lora) = &options.lora else {
        let trainable = TrainableModel::parameters(&model).num_elements();
        let (report, model, writer) = train_ranks(model, options, &data, base_copy, Hooks::new())?;
        if !writer {
            return Ok(FinetuneOutcome { report, trainable, verified: false });
        }
        print_memory(&report);
        model.save(tokenizer, &options.out)?;
        verify_reload(&model, &options.out, dtype)?;
        println!("saved to {} (Hugging Face folder); reloaded: bit-identical", options.out.display());
        return Ok(FinetuneOutcome { report, trainable, verified: true });
    };
    let config = lora.config(M::LORA_TARGETS);
    let lora_model = LoraModel::new(model, config.clone(), options.seed)?;
    let trainable = lora_model.adapter_parameters().num_elements();
    println!("LoRA: {} adapted layers, {trainable} trainable parameters", lora_model.adapted_layers().len());
    let replica = || LoraModel::new(base_copy()?, config.clone(), options.seed);
    let (report, lora_model, writer) = train_ranks(lora_model, options, &data, replica, Hooks::new())?;
    if !writer {
        return Ok(FinetuneOutcome { report, trainable, verified: false });
    }
    print_memory(&report);
    // The base as `eval`/`generate` find it again from anywhere: a short name as given, a path
    // made absolute.
    let base = match std::fs::canonicalize(&options.model) {
        Ok(path) if Path::new(&options.model).exists() => path.display().to_string(),
        _ => options.model.clone(),
    };
    lora_model.save_peft(&options.out, &PeftInfo { base_model: Some(base), ..PeftInfo::default() })?;
    println!("adapter saved to {} (adapter_config.json, adapter_model.safetensors)", options.out.display());
    let mut verified = false;
    if lora.merge {
        let merged = lora_model.merge()?;
        merged.save(tokenizer, &options.out)?;
        verify_reload(&merged, &options.out, dtype)?;
        verified = true;
        println!("merged model saved to {}; reloaded: bit-identical", options.out.display());
    }
    Ok(FinetuneOutcome { report, trainable, verified })
}
