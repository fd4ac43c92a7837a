//! The `candle-fit` command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_fit::ckpt::Recompute;
use candle_fit::train::cpu_runtime;
use candle_fit::train::device::parse_device;
use candle_fit::train::memory::{self, mib, CountingAllocator};
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LocalUpdater, LossScalerConfig, OptimizerConfig, Precision,
    SgdConfig, Trainer, TrainerConfig,
};
use candle_fit::{BUNDLED_CORPUS, BUNDLED_CORPUS_NAME};
use clap::{Parser, Subcommand, ValueEnum};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

#[derive(Parser, Debug)]
#[command(name = "candle-fit", version, about = "Train transformers on Candle that would not otherwise fit")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a GPT on a UTF-8 text file (by default the bundled Austen novel) and report
    /// validation loss, speed and memory.
    Train(TrainArgs),
    /// Run every technique against the FP32 baseline on a grid of models and print peak
    /// memory (by category), step time, tokens/s and loss.
    Bench(BenchArgs),
    /// Measure the CPU optimizer step (AdamW, 8-bit AdamW) in parameters per second against
    /// the machine's copy bandwidth, with one thread and with all cores.
    BenchOptimizer(OptimBenchArgs),
    /// Predict the peak memory of a `train` run, and its breakdown, from a probe of one block
    /// (takes the same flags as `train`, plus `--model gpt|llama|bert` and their shapes).
    Estimate(EstimateArgs),
    /// Start N local processes of `candle-fit train ...` as the ranks of one data-parallel
    /// group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set as torchrun does),
    /// communicating over TCP: `candle-fit launch --nproc 2 -- train --zero 1`.
    Launch(LaunchArgs),
    /// Loss and perplexity (and accuracy, for a classifier) of a model on a data file:
    /// `candle-fit eval --model DIR|FILE.gguf|smollm2 --data FILE.jsonl`.
    Eval(EvalArgs),
    /// Continue a prompt with a causal language model, streaming the text to stdout:
    /// `candle-fit generate --model DIR|FILE.gguf|smollm2 --prompt TEXT` (or `--messages
    /// FILE.json`, a chat through the tokenizer's chat template).
    Generate(GenerateArgs),
    /// Fine-tune a LLaMA-family language model (fully or with LoRA) on a JSONL file and write a
    /// Hugging Face folder: `candle-fit finetune --model smollm2 --data train.jsonl --out DIR`.
    Finetune(FinetuneArgs),
}

#[derive(clap::Args, Debug)]
#[command(allow_negative_numbers = true)]
struct FinetuneArgs {
    /// A model folder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
    /// Qwen3ForCausalLM, GPT2LMHeadModel; BertForSequenceClassification or BertModel for
    /// classification records), a .gguf file, or a packaged model's short name (smollm2).
    #[arg(long)]
    model: String,
    /// Training records, JSONL: {"text"}, {"prompt","completion"} (loss on the completion) or
    /// {"messages":[...]} (chat template applied, loss on the assistant turns); for a BERT
    /// classifier {"text","label"} JSONL or a text,label CSV.
    #[arg(long)]
    data: PathBuf,
    /// Held-out records (same formats) for the periodic evaluation; without it the
    /// evaluations run on the training examples.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// The output folder: a Hugging Face model folder (with LoRA: the PEFT adapter files, and
    /// the merged model with --merge).
    #[arg(long)]
    out: PathBuf,
    /// Replace the files of a non-empty output folder.
    #[arg(long)]
    overwrite: bool,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Schedule after warm-up: cosine (decay to a tenth of --lr) or constant.
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Warm-up steps (linear).
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    micro_batch: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    accumulation_steps: usize,
    /// Tokens per sequence (text is packed into windows; other records are cut to it).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Precision: f32, bf16 (FP32 master weights) or f16 (FP32 master weights, loss scaling).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Dynamic loss scaling: on, off, or auto (on for f16 only).
    #[arg(long, default_value = "auto")]
    loss_scaling: String,
    /// Recomputation: never, all, every:K, sqrt or budget:BYTES.
    #[arg(long, default_value = "never")]
    recompute: String,
    /// Clip the global gradient norm to this positive number (0 disables clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    optimizer: OptimizerKind,
    /// Weight decay (decoupled for AdamW, L2 for SGD), on matrices only.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Step the optimizer on the host with master weights and state there.
    #[arg(long)]
    offload_optimizer: bool,
    /// Write training-state checkpoints into this run directory.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every this many steps (and after the last) [default: 100].
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Keep this many of the newest checkpoints.
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Continue from this checkpoint (or the newest in this run directory).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[command(flatten)]
    memory: MemoryArgs,
    /// Write per-step metrics as JSON lines to this file.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Evaluate every this many steps (0: at the start and the end only).
    #[arg(long, default_value_t = 0)]
    eval_interval: usize,
    /// Held-out sequences per evaluation.
    #[arg(long, default_value_t = 64)]
    eval_samples: usize,
    /// Seed of data order, adapters' initialisation and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    lora: LoraArgs,
    /// With LoRA: also write the merged model into the output folder.
    #[arg(long)]
    merge: bool,
    /// Classes of the new head on a BertModel folder [default: one per label in --data]; with
    /// integer labels below it, the classes are 0..N.
    #[arg(long)]
    num_labels: Option<usize>,
    #[command(flatten)]
    ranks: RankArgs,
    /// Device: cpu, cuda or cuda:N (a bare cuda in a launched rank takes its LOCAL_RANK's GPU;
    /// needs a build with the cuda feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// LoRA and QLoRA, as `finetune` trains and `estimate` predicts them.
#[derive(clap::Args, Debug)]
struct LoraArgs {
    /// Train LoRA adapters of this rank on a frozen base instead of every weight.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha (the update is scaled by alpha / rank) [default: twice the rank].
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Dropout on the adapters' input.
    #[arg(long)]
    lora_dropout: Option<f32>,
    /// Adapted modules (comma-separated), or all-linear [default: q_proj,v_proj for the LLaMA
    /// family, c_attn for GPT-2].
    #[arg(long, value_delimiter = ',')]
    lora_targets: Option<Vec<String>>,
    /// QLoRA (with --lora-rank): hold the frozen base's decoder-layer weights quantized: nf4
    /// (bitsandbytes' NF4 with double quantization), q4_0, q4_1, q8_0 (GGML blocks), or gguf
    /// (a .gguf model's own blocks, never dequantized; finetune only).
    #[arg(long)]
    quantize_base: Option<String>,
}

impl LoraArgs {
    /// The LoRA settings the flags give (`merge`: finetune's `--merge`), or `None` without
    /// `--lora-rank`, when every other LoRA flag is refused.
    fn options(&self, merge: bool) -> anyhow::Result<Option<candle_fit::finetune::LoraOptions>> {
        let quantize_base = self
            .quantize_base
            .as_deref()
            .map(|q| q.parse::<candle_fit::train::quant::BaseQuantization>())
            .transpose()
            .map_err(|e| anyhow::anyhow!("invalid `--quantize-base`: {e}"))?;
        let Some(rank) = self.lora_rank else {
            anyhow::ensure!(
                quantize_base.is_none(),
                "`--quantize-base` needs `--lora-rank`: QLoRA trains LoRA adapters over the quantized base, and full fine-tuning cannot update quantized weights"
            );
            for (flag, given) in [
                ("--lora-alpha", self.lora_alpha.is_some()),
                ("--lora-dropout", self.lora_dropout.is_some()),
                ("--lora-targets", self.lora_targets.is_some()),
                ("--merge", merge),
            ] {
                anyhow::ensure!(!given, "`{flag}` needs `--lora-rank`");
            }
            return Ok(None);
        };
        Ok(Some(candle_fit::finetune::LoraOptions {
            rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout.unwrap_or(0.0),
            targets: self.lora_targets.clone().unwrap_or_default(),
            merge,
            quantize_base,
        }))
    }
}

fn finetune(args: FinetuneArgs) -> anyhow::Result<()> {
    use candle_fit::finetune::{run, FinetuneOptions, Schedule};
    let precision: Precision = args.precision.parse()?;
    let loss_scaling = match args.loss_scaling.as_str() {
        "auto" => None,
        "on" => Some(true),
        "off" => Some(false),
        other => anyhow::bail!("invalid `--loss-scaling`: `{other}` is not one of on, off, auto"),
    };
    let schedule = match args.schedule.as_str() {
        "cosine" => Schedule::Cosine,
        "constant" => Schedule::Constant,
        other => anyhow::bail!("invalid `--schedule`: `{other}` is not one of cosine, constant"),
    };
    let recompute: Recompute =
        args.recompute.parse().map_err(|e| anyhow::anyhow!("invalid `--recompute`: {e}"))?;
    let max_memory = args.memory.limit()?;
    let lora = args.lora.options(args.merge)?;
    let optimizer = match args.optimizer {
        OptimizerKind::Adamw => {
            OptimizerConfig::AdamW(AdamWConfig { weight_decay: args.weight_decay, ..Default::default() })
        }
        OptimizerKind::Adamw8bit => {
            OptimizerConfig::AdamW8bit(AdamWConfig { weight_decay: args.weight_decay, ..Default::default() })
        }
        OptimizerKind::Sgd => {
            OptimizerConfig::Sgd(SgdConfig { weight_decay: args.weight_decay, ..Default::default() })
        }
    };
    let options = FinetuneOptions {
        model: args.model,
        data: args.data,
        valid: args.valid,
        out: args.out,
        overwrite: args.overwrite,
        steps: args.steps,
        lr: args.lr,
        schedule,
        warmup_steps: args.warmup_steps,
        micro_batch: args.micro_batch,
        accumulation_steps: args.accumulation_steps,
        seq_len: args.seq_len,
        precision,
        loss_scaling,
        recompute,
        max_grad_norm: (args.max_grad_norm != 0.0).then_some(args.max_grad_norm),
        optimizer,
        offload_optimizer: args.offload_optimizer,
        checkpoint_dir: args.checkpoint_dir,
        checkpoint_every: args.checkpoint_every,
        keep_checkpoints: args.keep_checkpoints,
        max_memory,
        find_micro_batch: args.memory.find_micro_batch,
        oom_recovery: !args.memory.no_oom_recovery,
        resume: args.resume,
        metrics: args.metrics,
        eval_interval: args.eval_interval,
        eval_samples: args.eval_samples,
        seed: args.seed,
        progress: !args.quiet,
        lora,
        zero: args.ranks.zero,
        world_size: args.ranks.world_size,
        comm_timeout_s: args.ranks.comm_timeout,
        device: args.device,
        num_labels: args.num_labels,
    };
    let outcome = run(&options)?;
    let report = &outcome.report;
    println!(
        "RESULT steps={} trainable={} loss_before={:.4} loss_after={:.4} s_per_step={:.2} peak={} verified={}",
        options.steps,
        outcome.trainable,
        report.initial_val_loss,
        report.final_val_loss,
        report.median_step_time_s,
        mib(report.memory.peak),
        outcome.verified
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// A model folder written by candle-fit (or transformers), a .gguf file, or a packaged
    /// model's short name (smollm2).
    #[arg(long)]
    model: String,
    /// The text to continue.
    #[arg(long, required_unless_present = "messages", conflicts_with = "messages")]
    prompt: Option<String>,
    /// Send the prompt as one user message through the tokenizer's chat template (with the
    /// assistant's opening appended).
    #[arg(long)]
    chat: bool,
    /// A JSON file of chat messages, `[{"role": "system"|"user"|"assistant", "content": ...}]`
    /// (or `{"messages": [...]}`), rendered through the tokenizer's chat template with the
    /// assistant's opening appended, as `--chat` renders `--prompt`.
    #[arg(long, value_name = "FILE")]
    messages: Option<std::path::PathBuf>,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens up to this cumulative probability.
    #[arg(long)]
    top_p: Option<f64>,
    /// The sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Re-run the whole sequence for every token instead of using the key/value cache.
    #[arg(long)]
    no_cache: bool,
    /// Print to stderr, at the end, the prompt's processing and the decoding speed in tokens/s
    /// (the prompt's forward up to the first new token; then one forward per later token).
    #[arg(long)]
    timings: bool,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// A model folder written by candle-fit (or transformers), a .gguf file, or a packaged
    /// model's short name (smollm2).
    #[arg(long)]
    model: String,
    /// JSONL (text, prompt/completion, chat messages, or text + label) or CSV (text, label).
    #[arg(long)]
    data: PathBuf,
    /// Tokens per sequence (text is packed into windows of this many tokens plus one).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 4)]
    batch: usize,
}

#[derive(clap::Args, Debug)]
struct OptimBenchArgs {
    /// Parameter counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10_000_000usize, 100_000_000])]
    params: Vec<usize>,
    /// Timed passes per measurement (the median is reported), after one untimed pass.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn bench_optimizer(args: OptimBenchArgs) -> anyhow::Result<()> {
    use candle_fit::optim_bench::{markdown_table, run, OptimBenchOptions};
    let rows = run(&OptimBenchOptions { sizes: args.params, repeats: args.repeats })?;
    print!("{}", markdown_table(&rows));
    if let Some(path) = &args.json {
        candle_fit::train::io::write_atomic(path, serde_json::to_string_pretty(&rows)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct LaunchArgs {
    /// Processes (ranks) to start on this machine.
    #[arg(long)]
    nproc: usize,
    /// Port of rank 0's rendezvous on 127.0.0.1; by default a free one.
    #[arg(long)]
    master_port: Option<u16>,
    /// The command each rank runs (`train ...`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// The variable through which `launch` tells its ranks its pid: a rank whose parent is no
/// longer that process (the launcher died, even of SIGKILL) stops at once instead of training
/// on as an orphan.
const LAUNCHER_PID_VAR: &str = "CANDLE_FIT_LAUNCHER_PID";

/// How a rank ended, for the launcher's report: an exit code, or the signal that killed it.
fn describe_exit(status: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let name = match signal {
                1 => " (SIGHUP)",
                2 => " (SIGINT)",
                6 => " (SIGABRT)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            return format!("was killed by signal {signal}{name}");
        }
    }
    format!("exited with status {}", status.code().unwrap_or(1))
}

/// In a rank started by `launch`: a thread that ends this process when the launcher is gone.
fn watch_launcher() {
    #[cfg(unix)]
    {
        let Some(launcher) = std::env::var(LAUNCHER_PID_VAR).ok().and_then(|v| v.parse::<u32>().ok()) else {
            return;
        };
        std::thread::spawn(move || loop {
            if std::os::unix::process::parent_id() != launcher {
                eprintln!("error: the launcher (pid {launcher}) is gone; this rank stops");
                std::process::exit(3);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
    }
}

/// Starts `--nproc` copies of this binary with launcher variables and supervises them: when one
/// fails the others are stopped (after a grace period in which they fail by themselves), and
/// the report names the rank that failed first, preferring a rank killed by a signal (a cause)
/// over the ranks that then lost their peer (its consequences). The ranks stop by themselves if
/// the launcher dies.
fn launch(args: LaunchArgs) -> anyhow::Result<()> {
    use std::process::Command as Process;
    use std::time::{Duration, Instant};

    if args.nproc == 0 || args.nproc > MAX_RANKS {
        anyhow::bail!("invalid `--nproc`: {} is not between 1 and {MAX_RANKS}", args.nproc);
    }
    let port = match args.master_port {
        Some(p) => p,
        None => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
    };
    let exe = std::env::current_exe()?;
    let mut children = Vec::with_capacity(args.nproc);
    for rank in 0..args.nproc {
        let child = Process::new(&exe)
            .args(&args.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", args.nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(LAUNCHER_PID_VAR, std::process::id().to_string())
            .spawn();
        match child {
            Ok(child) => children.push(Some(child)),
            Err(e) => {
                for child in children.iter_mut().flatten() {
                    child.kill().ok();
                    child.wait().ok();
                }
                return Err(e).with_context(|| format!("starting rank {rank}"));
            }
        }
    }
    // (rank, how it ended, whether by a signal, when it was seen)
    let mut failures: Vec<(usize, String, bool, Instant)> = Vec::new();
    loop {
        let mut running = 0;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait()? {
                Some(status) => {
                    if !status.success() {
                        #[cfg(unix)]
                        let signalled = std::os::unix::process::ExitStatusExt::signal(&status).is_some();
                        #[cfg(not(unix))]
                        let signalled = false;
                        failures.push((rank, describe_exit(status), signalled, Instant::now()));
                    }
                    *slot = None;
                }
                None => running += 1,
            }
        }
        if running == 0 {
            break;
        }
        // Peers of a failed rank fail by themselves within their timeout; do not wait for it.
        if let Some((_, _, _, at)) = failures.first() {
            if at.elapsed() > Duration::from_secs(5) {
                for child in children.iter_mut().flatten() {
                    child.kill().ok();
                    child.wait().ok();
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // A rank killed by a signal is the cause; otherwise the first seen. Others are listed.
    let first = failures.iter().position(|f| f.2).unwrap_or(0);
    match failures.get(first) {
        Some((rank, how, _, _)) => {
            let others: Vec<String> = failures
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != first)
                .map(|(_, (r, how, _, _))| format!("rank {r} {how}"))
                .collect();
            let also =
                if others.is_empty() { String::new() } else { format!(" (then {})", others.join(", ")) };
            anyhow::bail!("rank {rank} of {} {how}{also}", args.nproc)
        }
        None => Ok(()),
    }
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Model family: gpt or llama (byte-level, on the corpus).
    #[arg(long, value_enum, default_value_t = Family::Gpt)]
    model: Family,
    /// Configurations to run (comma-separated), or `all`. `candle-fit bench --list` names them.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    configs: Vec<String>,
    /// List the configurations and exit.
    #[arg(long)]
    list: bool,
    /// Numbers of blocks to try (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    layers: Vec<usize>,
    /// Widths to try (comma-separated); heads are width / 32.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    width: Vec<usize>,
    /// Sequences per optimizer step (global batch); several (comma-separated) make a grid.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    batch: Vec<usize>,
    /// Tokens per sequence (also the models' context length); several (comma-separated) make
    /// a grid.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    seq_len: Vec<usize>,
    /// Measured steps per run (at least 5 for a meaningful median).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Warm-up steps per run, not timed.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Validation windows for the final loss.
    #[arg(long, default_value_t = 32)]
    eval_windows: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the Markdown table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Draw memory by category and step time per run into this SVG file.
    #[arg(long)]
    chart: Option<PathBuf>,
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use candle_fit::bench::{
        add_ratios, configurations, markdown_table, predict_grid, run_one, select_configurations,
    };
    use candle_fit::bench::{BenchModel, BenchOptions};
    if args.list {
        for c in configurations() {
            println!("{:<28} {}", c.name, c.description);
        }
        return Ok(());
    }
    let mut configs = select_configurations(&args.configs)?;
    let device = parse_device(&args.device)?;
    if device.is_cpu() && args.configs.iter().any(|n| n == "all") {
        // TF32 exists only on CUDA: on CPU the run would repeat fp32.
        configs.retain(|c| !c.tf32);
    }
    if args.steps == 0 {
        anyhow::bail!("invalid `--steps`: must be at least 1");
    }
    for (field, values) in [("--batch", &args.batch), ("--seq-len", &args.seq_len)] {
        if values.is_empty() || values.contains(&0) {
            anyhow::bail!("invalid `{field}`: give one or more positive values");
        }
    }
    if let Some(bad) = args.layers.iter().chain(&args.width).find(|&&v| v == 0) {
        anyhow::bail!("invalid `--layers`/`--width`: {bad} is not a positive size");
    }
    let corpus = Corpus::from_bytes(BUNDLED_CORPUS_NAME.as_ref(), BUNDLED_CORPUS.to_vec(), 0.1)?;
    // The grid: every (sequence length, batch) for every (layers, width). With more than one
    // sequence length or batch, model names carry them (`L4-W128-S256-B8`), so each grid
    // point has its own baseline.
    let named = args.seq_len.len() > 1 || args.batch.len() > 1;
    let mut grid = Vec::new();
    for &seq_len in &args.seq_len {
        for &batch in &args.batch {
            let options = BenchOptions {
                batch,
                seq_len,
                steps: args.steps,
                warmup: args.warmup,
                lr: args.lr,
                seed: args.seed,
                eval_windows: args.eval_windows.max(1),
                device: device.clone(),
            };
            let mut models = Vec::new();
            for &layers in &args.layers {
                for &width in &args.width {
                    let gpt = BenchModel::gpt(layers, width, seq_len);
                    let mut model = match args.model {
                        Family::Gpt => gpt.clone(),
                        Family::Llama => BenchModel::llama(layers, width, seq_len),
                        Family::Bert => anyhow::bail!(
                            "invalid `--model bert`: the bench trains on the byte corpus (gpt or llama); `estimate --model bert` predicts a BERT classifier"
                        ),
                    };
                    model.shape.validate()?;
                    if let candle_fit::train::estimate::ModelShape::Gpt(config) = &gpt.shape {
                        // A lower bound of the step's bytes, for the GPT of this shape.
                        check_sizes(config, candle::DType::F32, batch, seq_len, true)?;
                    }
                    if named {
                        model.name = format!("{}-S{seq_len}-B{batch}", model.name);
                    }
                    models.push(model);
                }
            }
            grid.push((options, models));
        }
    }
    // Say before trying when a run cannot fit.
    if let Some(available) = candle_fit::bench::available_memory() {
        for (options, models) in &grid {
            for (model, config, peak) in predict_grid(models, &configs, options, &corpus)? {
                if let Some(peak) = peak.filter(|&p| p > available) {
                    anyhow::bail!(
                        "configuration `{config}` on model {model} needs about {} but only {} is available: shrink the grid",
                        mib(peak),
                        mib(available)
                    );
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (options, models) in &grid {
        for model in models {
            // One discarded run first: the allocator's first use of a model's sizes (page
            // faults, glibc's adaptive mmap threshold) would otherwise be charged to whichever
            // configuration runs first.
            if let Some(first) = configs.first() {
                eprintln!("warming up on {} ...", model.name);
                run_one(model, first, options, &corpus)?;
            }
            for config in &configs {
                eprintln!("running {} on {} ...", config.name, model.name);
                rows.push(run_one(model, config, options, &corpus)?);
            }
        }
    }
    add_ratios(&mut rows);
    let table = markdown_table(&rows);
    println!("{table}");
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&rows)?;
        candle_fit::train::io::write_atomic(path, json.as_bytes())?;
    }
    if let Some(path) = &args.markdown {
        candle_fit::train::io::write_atomic(path, table.as_bytes())?;
    }
    if let Some(path) = &args.chart {
        candle_fit::chart::write_chart(&rows, path)?;
    }
    Ok(())
}

/// The model families `estimate` knows.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// GPT-2 (pre-norm, tied embedding), on the byte corpus.
    Gpt,
    /// LLaMA (RMSNorm, rotary, grouped-query attention, SwiGLU), on the byte corpus.
    Llama,
    /// A BERT sequence classifier (post-norm encoder, mean pooling, linear head).
    Bert,
}

#[derive(clap::Args, Debug)]
struct EstimateArgs {
    /// Model family: gpt, llama or bert (a BERT sequence classifier).
    #[arg(long, value_enum, default_value_t = Family::Gpt)]
    model: Family,
    /// Key/value heads (LLaMA) [default: --heads].
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Width of the feed-forward block (LLaMA, BERT) [default: 8/3 x --width rounded up to a
    /// multiple of 8 for LLaMA, 4 x --width for BERT].
    #[arg(long)]
    intermediate: Option<usize>,
    /// Vocabulary size (LLaMA, BERT; GPT trains on bytes: 256).
    #[arg(long, default_value_t = 256)]
    vocab: usize,
    /// Outputs of the classifier head (BERT).
    #[arg(long, default_value_t = 2)]
    labels: usize,
    /// Probe the block at this micro-batch and twice it and extrapolate linearly to
    /// --micro-batch (cheaper for big batches) instead of probing at --micro-batch.
    #[arg(long)]
    probe_micro_batch: Option<usize>,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    train: TrainArgs,
}

impl EstimateArgs {
    /// The model the flags describe.
    fn shape(&self, gpt: &GptConfig) -> anyhow::Result<candle_fit::train::estimate::ModelShape> {
        use candle_fit::train::estimate::ModelShape;
        use candle_fit::train::models::BertConfig;
        use candle_fit::train::LlamaConfig;
        let a = &self.train;
        if self.model == Family::Llama && a.dropout != 0.0 {
            anyhow::bail!("invalid `--dropout`: LLaMA has no dropout");
        }
        let shape = match self.model {
            Family::Gpt => ModelShape::Gpt(*gpt),
            Family::Llama => ModelShape::Llama(LlamaConfig {
                vocab_size: self.vocab,
                hidden_size: a.width,
                intermediate_size: self.intermediate.unwrap_or_else(|| (a.width * 8 / 3).div_ceil(8) * 8),
                num_hidden_layers: a.layers,
                num_attention_heads: a.heads,
                num_key_value_heads: self.kv_heads.unwrap_or(a.heads),
                max_position_embeddings: a.context,
                rms_norm_eps: 1e-5,
                rope_theta: 10_000.0,
                tie_word_embeddings: false,
                hidden_act: "silu".into(),
                ..LlamaConfig::tiny()
            }),
            Family::Bert => ModelShape::Bert {
                config: BertConfig {
                    vocab_size: self.vocab,
                    hidden_size: a.width,
                    num_hidden_layers: a.layers,
                    num_attention_heads: a.heads,
                    intermediate_size: self.intermediate.unwrap_or(4 * a.width),
                    max_position_embeddings: a.context,
                    type_vocab_size: 2,
                    layer_norm_eps: 1e-12,
                    hidden_dropout_prob: a.dropout,
                    attention_probs_dropout_prob: a.dropout,
                    hidden_act: "gelu".into(),
                    ..BertConfig::tiny()
                },
                num_labels: self.labels,
            },
        };
        shape.validate()?;
        Ok(shape)
    }
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum OptimizerKind {
    Adamw,
    /// AdamW with 8-bit moments (blockwise dynamic quantization).
    #[value(name = "adamw8bit")]
    Adamw8bit,
    Sgd,
}

#[derive(clap::Args, Debug)]
#[command(allow_negative_numbers = true)]
struct TrainArgs {
    /// UTF-8 text to train on; by default the bundled Pride and Prejudice.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Fraction of the corpus (its end) held out for validation.
    #[arg(long, default_value_t = 0.1)]
    validation_fraction: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 16)]
    micro_batch: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    accumulation_steps: usize,
    /// Tokens (bytes) per sequence; at most the context length.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Peak learning rate (linear warm-up, then cosine decay to a tenth of it).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 30)]
    warmup_steps: usize,
    /// Clip the global gradient norm to this positive number (0 disables clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    optimizer: OptimizerKind,
    /// Run the optimizer step on the host's cores (rayon), with master weights and optimizer
    /// state in host memory; on a GPU, gradients and parameters move through pinned buffers.
    /// Bit-identical to the default step. One device only (not with `--zero`).
    #[arg(long)]
    offload_optimizer: bool,
    /// Weight decay (decoupled for AdamW, L2 for SGD), on matrices only.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 128)]
    width: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Context length of the model.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Dropout probability.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Recomputation: never, all (every block), every:K, sqrt (keep about sqrt(n) blocks) or
    /// budget:BYTES (K/M/G suffixes; keep graphs within the budget, measured).
    #[arg(long, default_value = "never")]
    recompute: String,
    /// Precision: f32 (the baseline), bf16 (FP32 master weights) or f16 (FP32 master weights
    /// and dynamic loss scaling).
    #[arg(long, alias = "dtype", default_value = "f32")]
    precision: String,
    /// Dynamic loss scaling: on, off, or auto (on for f16 only).
    #[arg(long, default_value = "auto")]
    loss_scaling: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of initialisation, data order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Validate every this many steps (0: only at the start and the end).
    #[arg(long, default_value_t = 100)]
    eval_interval: usize,
    /// Validation windows.
    #[arg(long, default_value_t = 256)]
    eval_windows: usize,
    /// Write per-step metrics as JSON lines to this file (with --resume: its records up to the
    /// resumed step are kept and the new ones appended, so it equals an uninterrupted run's).
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Save the trained weights (Hugging Face GPT-2 names) to this safetensors file.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Write training-state checkpoints (weights, master weights, optimizer, loss scaler,
    /// progress; atomic and checksummed) into this run directory.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every this many steps (and after the last) [default: 100].
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Keep this many of the newest checkpoints.
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// Continue the run saved in this checkpoint, or in the newest checkpoint of this run
    /// directory; later checkpoints go to the same run directory unless --checkpoint-dir says
    /// otherwise. The run's settings must match the checkpoint's.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Replace another run's checkpoints in the checkpoint directory (they are removed at the
    /// start); without it such a directory is refused.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    memory: MemoryArgs,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    ranks: RankArgs,
}

/// The memory limit and what happens at it, as `train` and `finetune` take them.
#[derive(clap::Args, Debug, Clone)]
struct MemoryArgs {
    /// Limit live heap bytes during a step (K/M/G suffixes): going over it is an out-of-memory
    /// error, which halves the micro-batch and retries unless --no-oom-recovery.
    #[arg(long)]
    max_memory: Option<String>,
    /// Before training, pick the largest micro-batch that fits --max-memory (`train`: or the
    /// available memory), keeping the global batch.
    #[arg(long)]
    find_micro_batch: bool,
    /// Stop on an out-of-memory error instead of retrying with a smaller micro-batch.
    #[arg(long)]
    no_oom_recovery: bool,
}

impl MemoryArgs {
    /// `--max-memory` in bytes.
    fn limit(&self) -> anyhow::Result<Option<usize>> {
        self.max_memory
            .as_ref()
            .map(|text| {
                candle_fit::ckpt::parse_bytes(text).filter(|&b| b > 0).ok_or_else(|| {
                    anyhow::anyhow!("invalid `--max-memory`: `{text}` is not a positive byte count (digits with an optional K, M or G)")
                })
            })
            .transpose()
    }
}

/// Data parallelism, as `train`, `estimate` and `finetune` take it.
#[derive(clap::Args, Debug, Clone)]
struct RankArgs {
    /// ZeRO stage for data-parallel training over `--world-size` ranks: 0 (gradients
    /// all-reduced), 1 (optimizer state and master weights sharded), 2 (gradients sharded
    /// too, reduced per segment during backward) or 3 (parameters sharded too, each segment's
    /// gathered just before its forward or recompute and released after). By default, a single
    /// process without sharding (stage 0 when only `--world-size` is given).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=3))]
    zero: Option<u8>,
    /// Data-parallel ranks, run as threads of this process (in-process communicator). The
    /// micro-batch is the global one, split over the ranks. A process started by `candle-fit
    /// launch` (or torchrun, Slurm) takes its rank and world size from the launcher instead.
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// Seconds a rank waits for its peers in a collective before failing.
    #[arg(long, default_value_t = 300)]
    comm_timeout: u64,
}

/// Everything a training run is made of, validated, before anything is allocated.
struct Plan {
    precision: Precision,
    recompute: Recompute,
    device: candle::Device,
    model_config: GptConfig,
    trainer_config: TrainerConfig,
    optimizer: OptimizerConfig,
    corpus: Corpus,
}

fn plan(args: &TrainArgs) -> anyhow::Result<Plan> {
    let precision: Precision = args.precision.parse()?;
    let loss_scaling = match args.loss_scaling.as_str() {
        "auto" => precision.default_loss_scaling(),
        "on" => Some(LossScalerConfig::default()),
        "off" => None,
        other => anyhow::bail!("invalid `--loss-scaling`: `{other}` is not one of on, off, auto"),
    };
    let device = parse_device(&args.device)?;
    let recompute: Recompute =
        args.recompute.parse().map_err(|e| anyhow::anyhow!("invalid `--recompute`: {e}"))?;
    let mut max_memory = args.memory.limit()?;
    if args.memory.find_micro_batch && max_memory.is_none() {
        max_memory = Some(candle_fit::bench::available_memory().ok_or_else(|| {
            anyhow::anyhow!(
                "`--find-micro-batch` needs `--max-memory`: the available memory cannot be read here"
            )
        })?);
    }
    let checkpoint_dir = match (&args.checkpoint_dir, &args.resume) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(resume)) => Some(candle_fit::train::checkpoint::run_dir_of(resume)),
        (None, None) => None,
    };
    if checkpoint_dir.is_none() && args.checkpoint_every.is_some() {
        anyhow::bail!(
            "`--checkpoint-every` needs `--checkpoint-dir` (or `--resume`) to say where checkpoints go"
        );
    }
    let model_config = GptConfig {
        vocab_size: 256,
        n_ctx: args.context,
        n_embd: args.width,
        n_layer: args.layers,
        n_head: args.heads,
        dropout: args.dropout,
        layer_norm_eps: 1e-5,
    };
    model_config.validate()?;
    let trainer_config = TrainerConfig::builder()
        .micro_batch(args.micro_batch)
        .accumulation_steps(args.accumulation_steps)
        .steps(args.steps)
        .seq_len(args.seq_len)
        .lr(args.lr)
        .warmup_steps(args.warmup_steps)
        // 0 disables clipping; anything else must be a positive number (checked in build).
        .max_grad_norm((args.max_grad_norm != 0.0).then_some(args.max_grad_norm))
        .eval_interval(args.eval_interval)
        .eval_windows(args.eval_windows)
        .seed(args.seed)
        .progress(!args.quiet)
        .metrics_path(args.metrics.clone())
        .recompute(recompute)
        .loss_scaling(loss_scaling)
        .max_memory(max_memory)
        .oom_recovery(!args.memory.no_oom_recovery)
        .find_micro_batch(args.memory.find_micro_batch);
    let trainer_config = match checkpoint_dir {
        Some(dir) => trainer_config
            .checkpoint(dir, args.checkpoint_every.unwrap_or(100), args.keep_checkpoints)
            .overwrite_checkpoints(args.overwrite),
        None => trainer_config,
    }
    .build()?;
    if args.seq_len > args.context {
        return Err(candle_fit::train::Error::SequenceTooLong {
            seq_len: args.seq_len,
            context: args.context,
        }
        .into());
    }
    let corpus = match &args.corpus {
        Some(path) => Corpus::from_file(path, args.validation_fraction)?,
        None => Corpus::from_bytes(
            BUNDLED_CORPUS_NAME.as_ref(),
            BUNDLED_CORPUS.to_vec(),
            args.validation_fraction,
        )?,
    };
    corpus.check_seq_len(args.seq_len)?;
    let optimizer = match args.optimizer {
        OptimizerKind::Adamw => {
            OptimizerConfig::AdamW(AdamWConfig { weight_decay: args.weight_decay, ..Default::default() })
        }
        OptimizerKind::Adamw8bit => {
            OptimizerConfig::AdamW8bit(AdamWConfig { weight_decay: args.weight_decay, ..Default::default() })
        }
        OptimizerKind::Sgd => {
            OptimizerConfig::Sgd(SgdConfig { weight_decay: args.weight_decay, ..Default::default() })
        }
    };
    check_counts(args)?;
    Ok(Plan { precision, recompute, device, model_config, trainer_config, optimizer, corpus })
}

/// The largest number of ranks or processes started on one machine.
const MAX_RANKS: usize = 1024;
/// The longest collective timeout (a week): longer would overflow deadlines.
const MAX_COMM_TIMEOUT_S: u64 = 7 * 24 * 3600;
/// Sizes beyond this many bytes are refused even where nothing is allocated (`estimate`): no
/// machine has them, and the estimator's arithmetic stays far from overflowing.
const MAX_MODELLED_BYTES: u128 = 1 << 56;

/// Counts of `train`/`estimate` that are not sizes: ranks and the collective timeout.
fn check_counts(args: &TrainArgs) -> anyhow::Result<()> {
    if args.ranks.world_size > MAX_RANKS {
        anyhow::bail!("invalid `--world-size`: {} is more than {MAX_RANKS} ranks", args.ranks.world_size);
    }
    if args.ranks.comm_timeout == 0 || args.ranks.comm_timeout > MAX_COMM_TIMEOUT_S {
        anyhow::bail!(
            "invalid `--comm-timeout`: {} s is not between 1 and {MAX_COMM_TIMEOUT_S} s (a week)",
            args.ranks.comm_timeout
        );
    }
    Ok(())
}

/// A lower bound, in bytes, of what one step of `model` on `micro_batch` sequences of `seq_len`
/// allocates at once (overflow-free, in u128): its weights in `dtype`, one F32 activation of the
/// residual stream and one attention score matrix (both exist whatever the recompute policy);
/// and what the estimator would model with every layer's activations kept.
fn step_bytes_lower_bound(
    model: &GptConfig,
    dtype: candle::DType,
    micro_batch: usize,
    seq_len: usize,
) -> (u128, u128) {
    let (mb, seq, width) = (micro_batch as u128, seq_len as u128, model.n_embd as u128);
    let params = model.checked_num_parameters().map_or(u128::MAX, |n| n as u128);
    let weights = params.saturating_mul(dtype.size_in_bytes() as u128);
    let activation = mb.saturating_mul(seq).saturating_mul(width).saturating_mul(4);
    let scores =
        mb.saturating_mul(model.n_head as u128).saturating_mul(seq).saturating_mul(seq).saturating_mul(4);
    let once = weights.saturating_add(activation).saturating_add(scores);
    let all_layers =
        weights.saturating_add((model.n_layer as u128).saturating_mul(activation.saturating_add(scores)));
    (once, all_layers)
}

/// Refuses a run whose sizes cannot fit this machine (a lower bound against the available
/// memory) or, for `estimate`, cannot exist on any machine; before anything is allocated.
fn check_sizes(
    model: &GptConfig,
    dtype: candle::DType,
    micro_batch: usize,
    seq_len: usize,
    train: bool,
) -> anyhow::Result<()> {
    let (once, all_layers) = step_bytes_lower_bound(model, dtype, micro_batch, seq_len);
    if all_layers > MAX_MODELLED_BYTES {
        anyhow::bail!(
            "invalid sizes: a step of {} layers of width {} on {micro_batch} sequences of {seq_len} tokens is far beyond any machine (over {} bytes)",
            model.n_layer,
            model.n_embd,
            MAX_MODELLED_BYTES
        );
    }
    if let Some(available) = candle_fit::bench::available_memory().filter(|_| train) {
        if once > available as u128 {
            anyhow::bail!(
                "invalid sizes: a step of this model on {micro_batch} sequences of {seq_len} tokens needs at least {} (weights, one activation, one attention score matrix), but only {} is available: shrink --micro-batch, --seq-len, --width or --layers",
                mib(usize::try_from(once).unwrap_or(usize::MAX)),
                mib(available)
            );
        }
    }
    Ok(())
}

/// The outputs of a `train` run (`--save`, `--metrics`, the checkpoint directory) checked
/// before anything runs: none is an input (`--corpus`, `--resume`) or another output, and each
/// can be written (a probe file is created and removed next to it), so a run does not fail after
/// its training is done.
fn check_outputs(args: &TrainArgs, checkpoint_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::path::{Path, PathBuf};
    /// The absolute, symlink-resolved form of `path` (its parent resolved when it does not exist).
    fn resolved(path: &Path) -> PathBuf {
        if let Ok(p) = path.canonicalize() {
            return p;
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        match (parent.canonicalize(), path.file_name()) {
            (Ok(p), Some(name)) => p.join(name),
            _ => std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf()),
        }
    }
    let files = [("--save", args.save.as_deref()), ("--metrics", args.metrics.as_deref())];
    let inputs = [("--corpus", args.corpus.as_deref()), ("--resume", args.resume.as_deref())];
    let all = [files[0], files[1], ("--checkpoint-dir", checkpoint_dir)];
    let outputs: Vec<(&str, PathBuf)> = all.iter().filter_map(|(f, p)| Some((*f, resolved((*p)?)))).collect();
    for (flag, out) in &outputs {
        for (input_flag, input) in inputs.iter().filter_map(|(f, p)| Some((*f, resolved((*p)?)))) {
            // The checkpoint directory may be the run directory of `--resume`; nothing may be
            // written over the corpus or into a checkpoint directory (`--resume`'s or one of
            // its run directory's).
            let in_checkpoint = || {
                out.ancestors().skip(1).any(|a| {
                    a.starts_with(&input) && a.join(candle_fit::train::checkpoint::MANIFEST_FILE).is_file()
                })
            };
            let clash = if *flag == "--checkpoint-dir" {
                input_flag == "--corpus" && input == *out
            } else {
                *out == input || (input_flag == "--resume" && in_checkpoint())
            };
            if clash {
                anyhow::bail!(
                    "invalid `{flag}`: {} is the input of `{input_flag}`; it would be overwritten",
                    out.display()
                );
            }
        }
    }
    if let [(a, x), (b, y), ..] = outputs.as_slice() {
        if x == y && *b != "--checkpoint-dir" {
            anyhow::bail!("invalid `{b}`: {} is also the output of `{a}`", y.display());
        }
    }
    for (flag, path) in files {
        let Some(path) = path else { continue };
        if path.is_dir() {
            anyhow::bail!("invalid `{flag}`: {} is a directory, not a file", path.display());
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        probe_writable(flag, parent)?;
    }
    if let Some(dir) = checkpoint_dir {
        // An explicit `--checkpoint-dir` is created; the run directory of `--resume` must exist
        // (if it does not, resuming fails with its own message).
        if args.checkpoint_dir.is_some() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("invalid `--checkpoint-dir`: cannot create {}", dir.display()))?;
        }
        if dir.is_dir() {
            probe_writable("--checkpoint-dir", dir)?;
        }
    }
    Ok(())
}

/// Creates and removes a probe file in `dir`: `Ok` when files can be written there.
fn probe_writable(flag: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let probe = dir.join(format!(".candle-fit-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("invalid `{flag}`: cannot write in {}", dir.display()))?;
    std::fs::remove_file(&probe).with_context(|| format!("removing {}", probe.display()))?;
    Ok(())
}

/// Prints the predicted memory of a training run, from a probe of one block.
fn estimate(all: EstimateArgs) -> anyhow::Result<()> {
    use candle_fit::finetune::HfCausalLm;
    use candle_fit::train::estimate::{estimate_memory, EstimateInput, ModelShape};
    let args = &all.train;
    let p = plan(args)?;
    check_sizes(&p.model_config, p.precision.dtype(), args.micro_batch, args.seq_len, false)?;
    let shape = all.shape(&p.model_config)?;
    let lora = all.lora.options(false)?;
    if args.ranks.zero.is_some() || args.ranks.world_size > 1 {
        if all.model != Family::Gpt {
            anyhow::bail!("`estimate --zero`/`--world-size` models GPT only");
        }
        anyhow::ensure!(
            lora.is_none(),
            "`estimate --zero`/`--world-size` models full training only, not `--lora-rank`"
        );
        return estimate_sharded(args, &p);
    }
    // The byte corpus is what GPT and LLaMA train on here; a BERT classifier reads its own file.
    let corpus_bytes = if all.model == Family::Bert {
        0
    } else {
        p.corpus.split(candle_fit::train::Split::Train).len()
            + p.corpus.split(candle_fit::train::Split::Validation).len()
    };
    let mut input = EstimateInput::for_trainer(
        shape,
        p.precision.dtype(),
        &p.trainer_config,
        p.optimizer,
        corpus_bytes,
        args.validation_fraction,
    )?;
    if args.ranks.zero.is_some() || args.ranks.world_size > 1 {
        return estimate_sharded(args, &p);
    }
    input.probe_micro_batch = all.probe_micro_batch;
    anyhow::ensure!(
        lora.is_none() || all.model != Family::Bert,
        "`--lora-rank`: LoRA is not available for a BERT classifier, as in `finetune` (its head must train in full, PEFT's modules_to_save, which the LoRA layer does not implement)"
    );
    // The targets finetune adapts by default.
    input.lora = lora.as_ref().map(|l| match &input.model {
        ModelShape::Llama(_) => l.config(<candle_fit::train::Llama as HfCausalLm>::LORA_TARGETS),
        _ => l.config(<candle_fit::train::Gpt as HfCausalLm>::LORA_TARGETS),
    });
    let e = estimate_memory(&input)?;
    let base_parameters = match &input.model {
        ModelShape::Gpt(c) => Some(c.num_parameters()),
        ModelShape::Llama(c) => Some(c.num_parameters()),
        ModelShape::Bert { .. } => None,
    };
    println!(
        "predicted peak heap of a training step: {} ({} {} layers, width {}, {} parameters, {}, micro-batch {} x {} accumulation, seq {}, recompute {})",
        mib(e.peak),
        input.model.family().to_uppercase(),
        args.layers,
        args.width,
        e.parameter_count,
        p.precision,
        args.micro_batch,
        args.accumulation_steps,
        args.seq_len,
        p.recompute
    );
    if let Some(l) = &input.lora {
        println!(
            "  LoRA rank {} alpha {} on {} over a frozen {} base: {} trainable parameters; the frozen base holds {}",
            l.rank,
            l.alpha,
            l.targets.join(","),
            l.quantize_base.map_or_else(|| p.precision.to_string(), |q| q.to_string()),
            e.parameter_count,
            mib(e.frozen_bytes)
        );
    }
    for (name, bytes) in e.report().categories() {
        println!("  {name:<20} {}", mib(bytes));
    }
    if let Some(n) = base_parameters {
        println!(
            "  per model parameter  {:.3} bytes of model state, {:.3} bytes at the peak ({n} parameters)",
            (e.parameters + e.gradients + e.master_weights + e.optimizer_state) as f64 / n as f64,
            e.peak as f64 / n as f64
        );
    }
    println!("  per segment (kept in forward / peak during its backward):");
    for s in &e.segments {
        let how = if s.recomputed { "recomputed" } else { "kept" };
        println!(
            "    {:<18} {:<10} {:>12} {:>12}",
            s.name,
            how,
            mib(s.activation_bytes),
            mib(s.backward_peak_bytes)
        );
    }
    Ok(())
}

/// `estimate --zero K --world-size N`: rank 0's model state, exact from the shapes (as the
/// sharded updaters allocate it), against REFERENCE.md's formula, and the activations of its
/// share of the micro-batch from the single-device estimator.
fn estimate_sharded(args: &TrainArgs, p: &Plan) -> anyhow::Result<()> {
    use candle_fit::shard::estimate::{rank_state, ShardLayout};
    use candle_fit::shard::ZeroStage;
    use candle_fit::train::estimate::{estimate_memory, EstimateInput};
    let stage = ZeroStage::from_number(args.ranks.zero.unwrap_or(0))?;
    let world_size = args.ranks.world_size;
    if world_size == 0 {
        anyhow::bail!("invalid `--world-size`: must be at least 1");
    }
    let micro_batch = p.trainer_config.micro_batch.get();
    if micro_batch < world_size {
        anyhow::bail!(
            "invalid `--micro-batch`: {micro_batch} samples cannot be split over {world_size} ranks"
        );
    }
    let dtype = p.precision.dtype();
    let layout = ShardLayout::gpt(&p.model_config, dtype);
    let state = rank_state(&layout, stage, world_size, 0, &p.optimizer)?;
    let share = micro_batch.div_ceil(world_size);
    let mut config = p.trainer_config.clone();
    config.micro_batch = std::num::NonZeroUsize::new(share).ok_or_else(|| anyhow::anyhow!("empty share"))?;
    let corpus_bytes = p.corpus.split(candle_fit::train::Split::Train).len()
        + p.corpus.split(candle_fit::train::Split::Validation).len();
    let input = EstimateInput::for_trainer(
        p.model_config,
        dtype,
        &config,
        p.optimizer,
        corpus_bytes,
        args.validation_fraction,
    )?;
    let e = estimate_memory(&input)?;
    let params = p.model_config.num_parameters() as f64;
    let n = world_size as f64;
    // REFERENCE.md, Adam: 2-byte weights and gradients in half precision, 4-byte in FP32.
    let formula = match (stage, dtype == candle::DType::F32) {
        (ZeroStage::Stage0, _) => 16.0 * params,
        (ZeroStage::Stage1, true) => 8.0 * params + 8.0 * params / n,
        (ZeroStage::Stage1, false) => 4.0 * params + 12.0 * params / n,
        (ZeroStage::Stage2, true) => 4.0 * params + 12.0 * params / n,
        (ZeroStage::Stage2, false) => 2.0 * params + 14.0 * params / n,
        (_, _) => 16.0 * params / n,
    };
    println!(
        "ZeRO {} on {world_size} ranks, rank 0 (GPT {} layers, width {}, {} parameters, {}, {}):",
        stage as u8,
        args.layers,
        args.width,
        p.model_config.num_parameters(),
        p.precision,
        optimizer_name(&p.optimizer)
    );
    println!("  parameters           {}", mib(state.parameters));
    if stage == ZeroStage::Stage3 {
        println!(
            "  gathered (at most)   {} (one segment's buffers, around its use)",
            mib(state.gathered_peak)
        );
    }
    println!("  gradients            {}", mib(state.gradients));
    println!("  master_weights       {}", mib(state.master_weights));
    println!("  optimizer_state      {}", mib(state.optimizer_state));
    println!("  model state          {}", mib(state.total()));
    if matches!(p.optimizer, OptimizerConfig::AdamW(_)) {
        println!(
            "  REFERENCE.md formula {} (ratio {:.4})",
            mib(formula as usize),
            state.total() as f64 / formula
        );
    }
    println!(
        "  activations          {} (its share: {share} of the {micro_batch} sequences of a micro-batch; single-device estimator)",
        mib(e.activations)
    );
    println!(
        "  predicted peak heap  {} (model state, gathered parameters, activations, other)",
        mib(state.total() + state.gathered_peak + e.activations + e.other)
    );
    Ok(())
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    watch_launcher();
    // Launched by `candle-fit launch`, torchrun or Slurm: one rank of a multi-process group.
    let launched = candle_fit::shard::discovery::RankInfo::from_env()?;
    if args.ranks.zero.is_some()
        || args.ranks.world_size != 1
        || launched.as_ref().is_some_and(|i| i.world_size > 1)
    {
        if args.offload_optimizer {
            anyhow::bail!(
                "invalid `--offload-optimizer`: the offloaded optimizer steps one device's state; it is not available with `--zero` or several ranks yet"
            );
        }
        return train_sharded(args, launched);
    }
    let Plan { precision, recompute, device, model_config, trainer_config, optimizer, corpus } = plan(&args)?;
    check_sizes(&model_config, precision.dtype(), args.micro_batch, args.seq_len, true)?;
    check_outputs(&args, trainer_config.checkpoint.as_ref().map(|c| c.dir.as_path()))?;
    let dtype = precision.dtype();
    let model = Gpt::new(model_config, dtype, &device, args.seed)?;
    let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
    if args.offload_optimizer {
        updater = updater.offloaded()?;
    }
    let trainer = Trainer::new(trainer_config);
    let c = trainer.config();

    println!(
        "corpus        {} ({} train / {} validation bytes)",
        corpus.path().display(),
        corpus.split(candle_fit::train::Split::Train).len(),
        corpus.split(candle_fit::train::Split::Validation).len()
    );
    println!(
        "model         GPT {} layers, width {}, {} heads, context {}: {} parameters ({precision}{} on {:?})",
        args.layers,
        args.width,
        args.heads,
        args.context,
        model.parameters().num_elements(),
        if c.loss_scaling.is_some() { ", loss scaling" } else { "" },
        device.location()
    );
    println!(
        "training      {} steps x {} sequences ({} micro-batch x {} accumulation) of {} bytes, {}{} lr {}",
        c.steps,
        c.global_batch(),
        c.micro_batch,
        c.accumulation_steps,
        c.seq_len,
        optimizer_name(&optimizer),
        if updater.is_offloaded() {
            " (offloaded)"
        } else if updater.is_device_resident() {
            " (state on the device)"
        } else {
            ""
        },
        args.lr
    );
    let report = match &args.resume {
        Some(path) => trainer.resume(&model, &corpus, &mut updater, path)?,
        None => trainer.fit(&model, &corpus, &mut updater)?,
    };
    if report.start_step > 0 {
        println!(
            "resumed       from step {} ({})",
            report.start_step,
            args.resume.as_deref().unwrap_or(std::path::Path::new("")).display()
        );
    }
    if let Some(search) = &report.micro_batch_search {
        let tried: Vec<String> = search
            .trials
            .iter()
            .map(|t| {
                format!(
                    "{} {} ({})",
                    t.micro_batch,
                    if t.fits { "fits" } else { "too big" },
                    mib(t.peak_bytes)
                )
            })
            .collect();
        println!(
            "micro-batch   {} x {} accumulation chosen under {}: {}",
            search.micro_batch,
            search.accumulation_steps,
            mib(search.limit),
            tried.join(", ")
        );
    }
    for r in &report.oom_recoveries {
        println!("out of memory at step {}: micro-batch {} -> {} ({})", r.step, r.from, r.to, r.error);
    }
    if recompute != Recompute::Never {
        println!("recomputed     {} ({})", report.recomputed_segments.join(", "), recompute);
    }
    let entropy = corpus.unigram_entropy();
    println!();
    println!(
        "unigram byte entropy of the corpus   {entropy:.4} nats/byte ({:.3} bits)",
        entropy / std::f64::consts::LN_2
    );
    println!("validation loss before training      {:.4} nats/byte", report.initial_val_loss);
    println!(
        "validation loss after {} steps       {:.4} nats/byte ({:.3} bits/byte, {:.1}% of the unigram entropy)",
        c.steps,
        report.final_val_loss,
        report.final_val_loss / std::f64::consts::LN_2,
        100.0 * report.final_val_loss / entropy
    );
    println!("training loss (last 10 steps)        {:.4}", report.final_train_loss);
    println!(
        "median step time                     {:.1} ms ({:.0} tokens/s)",
        report.median_step_time_s * 1e3,
        report.tokens_per_s
    );
    let meter = candle_fit::train::DeviceMeter::for_device(&device);
    if meter.is_available() {
        let m = report.memory;
        // The CPU heap, or the CUDA memory pool (`torch.cuda.max_memory_allocated`'s count).
        let what =
            if meter.source() == "heap" { "peak heap during a step  " } else { "peak CUDA memory in a step" };
        println!("{what}           {}", mib(m.peak));
        for (name, bytes) in m.categories() {
            println!("  {name:<34} {}", mib(bytes));
        }
    }
    if let Some(scale) = report.history.last().and_then(|r| r.loss_scale) {
        println!("loss scale at the last step          {scale}");
    }
    if let Some(path) = &report.last_checkpoint {
        println!(
            "last checkpoint                      {} ({:.2} s writing checkpoints)",
            path.display(),
            report.checkpoint_time_s
        );
    }
    if report.skipped_steps > 0 {
        println!("skipped steps (non-finite)           {}", report.skipped_steps);
    }
    if let Some(path) = &args.save {
        model
            .parameters()
            .save_safetensors(path)
            .with_context(|| format!("saving weights to {}", path.display()))?;
        println!("weights saved to {}", path.display());
    }
    Ok(())
}

/// `train` with ZeRO stage `--zero` on `--world-size` in-process ranks, or as one rank of a
/// multi-process group (`launched`: from `candle-fit launch`, torchrun or Slurm) over TCP.
fn train_sharded(
    args: TrainArgs,
    launched: Option<candle_fit::shard::discovery::RankInfo>,
) -> anyhow::Result<()> {
    use std::num::NonZeroUsize;
    use std::time::Duration;

    use candle_fit::shard::comm::{Op, TcpCommunicator};
    use candle_fit::shard::driver::{
        fit_in_process, fit_rank, resume_in_process, resume_rank, InProcessConfig,
    };
    use candle_fit::shard::ZeroStage;

    let stage = ZeroStage::from_number(args.ranks.zero.unwrap_or(0))?;
    let timeout = Duration::from_secs(args.ranks.comm_timeout);
    let launched = launched.filter(|i| i.world_size > 1 || args.ranks.world_size == 1);
    let world_size = match &launched {
        Some(info) if args.ranks.world_size != 1 && args.ranks.world_size != info.world_size => {
            anyhow::bail!(
                "invalid `--world-size`: {} contradicts the launcher's world size {}",
                args.ranks.world_size,
                info.world_size
            )
        }
        Some(info) => info.world_size,
        None => args.ranks.world_size,
    };
    let world_size = NonZeroUsize::new(world_size)
        .ok_or_else(|| anyhow::anyhow!("invalid `--world-size`: must be at least 1"))?;
    if args.metrics.is_some() && world_size.get() > 1 {
        anyhow::bail!("invalid `--metrics`: per-step metrics are not written by sharded runs yet");
    }
    let Plan { precision, device, model_config, mut trainer_config, optimizer, corpus, .. } = plan(&args)?;
    // All ranks of one process share its memory; a launched rank holds its share.
    let share =
        if launched.is_some() { args.micro_batch.div_ceil(world_size.get()) } else { args.micro_batch };
    check_sizes(&model_config, precision.dtype(), share, args.seq_len, true)?;
    check_outputs(&args, trainer_config.checkpoint.as_ref().map(|c| c.dir.as_path()))?;
    // One progress bar per rank would interleave on stderr.
    trainer_config.progress = false;
    let trainer = Trainer::new(trainer_config);
    let c = trainer.config();
    let rank = launched.as_ref().map_or(0, |i| i.rank);
    if rank == 0 {
        let how = if launched.is_some() { "processes (TCP)" } else { "in-process ranks" };
        println!(
            "training      ZeRO {stage:?} on {world_size} {how}: {} steps x {} sequences ({} micro-batch x {} accumulation) of {} bytes, {precision}, {}",
            c.steps,
            c.global_batch(),
            c.micro_batch,
            c.accumulation_steps,
            c.seq_len,
            optimizer_name(&optimizer),
        );
    }
    let make_model = |_rank| Gpt::new(model_config, precision.dtype(), &device, args.seed);
    let runs = match (&launched, &args.resume) {
        (Some(info), resume) => {
            let comm = Box::new(TcpCommunicator::connect(info, timeout)?);
            let model = make_model(info.rank)?;
            vec![match resume {
                Some(path) => resume_rank(stage, comm, &trainer, &corpus, &optimizer, model, path)?,
                None => fit_rank(stage, comm, &trainer, &corpus, &optimizer, model)?,
            }]
        }
        (None, resume) => {
            let config = InProcessConfig { world_size, stage, timeout };
            match resume {
                Some(path) => resume_in_process(&config, &trainer, &corpus, &optimizer, path, make_model)?,
                None => fit_in_process(&config, &trainer, &corpus, &optimizer, make_model)?,
            }
        }
    };
    let Some(first) = runs.first() else { anyhow::bail!("no rank ran") };
    let report = &first.report;
    if rank == 0 {
        if report.start_step > 0 {
            println!("resumed       from step {}", report.start_step);
        }
        println!("model         {} parameters", first.model.parameters().num_elements());
        println!("validation loss before training      {:.4} nats/byte", report.initial_val_loss);
        println!("validation loss after {} steps       {:.4} nats/byte", c.steps, report.final_val_loss);
        println!(
            "median step time                     {:.1} ms ({:.0} tokens/s, all ranks together)",
            report.median_step_time_s * 1e3,
            report.tokens_per_s
        );
    }
    for run in &runs {
        let s = run.state;
        let sent = run.comm.sent_bytes() - run.comm.op(Op::Broadcast).sent_bytes;
        // With one rank per process the counting allocator's peak is this rank's own.
        let peak = if launched.is_some() && memory::is_installed() {
            format!(" | peak heap during a step {}", mib(run.report.memory.peak))
        } else {
            String::new()
        };
        // Stage 3 holds parameters only while their segment runs (the returned model is whole).
        let parameters = if stage == ZeroStage::Stage3 {
            format!("0 resident (at most {} gathered)", mib(run.peak_gathered_bytes))
        } else {
            mib(run.model.parameters().size_in_bytes())
        };
        println!(
            "rank {:<3} parameters {parameters} gradients {} master {} optimizer {} | sent {} per step ({} collectives in all){peak}",
            run.rank,
            mib(s.gradients),
            mib(s.master_weights),
            mib(s.optimizer_state),
            mib((sent / c.steps.get() as u64) as usize),
            run.comm.calls()
        );
    }
    if rank != 0 {
        return Ok(());
    }
    if let Some(path) = &report.last_checkpoint {
        println!("last checkpoint                      {} (one file per rank)", path.display());
    }
    if let Some(path) = &args.save {
        first
            .model
            .parameters()
            .save_safetensors(path)
            .with_context(|| format!("saving weights to {}", path.display()))?;
        println!("weights saved to {}", path.display());
    }
    Ok(())
}

fn optimizer_name(config: &OptimizerConfig) -> &'static str {
    match config {
        OptimizerConfig::AdamW(_) => "AdamW",
        OptimizerConfig::AdamW8bit(_) => "8-bit AdamW",
        OptimizerConfig::Sgd(_) => "SGD",
    }
}

/// An error and its causes joined by `: `, skipping a cause whose text the message before it
/// already ends with (library errors that print their source, such as an OS error, would
/// otherwise print it twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    use candle_fit::evaluation::{evaluate_file, EvalConfig};
    let device = candle::Device::Cpu;
    let model = candle_fit::model_source::load_model(&args.model, candle::DType::F32, &device)?;
    println!(
        "model {} ({}, {:.1}M parameters, f32, cpu); data {}",
        args.model,
        model.architecture(),
        model.num_parameters() as f64 / 1e6,
        args.data.display()
    );
    let config = EvalConfig { seq_len: args.seq_len, batch: args.batch };
    let (metrics, count) = evaluate_file(&model, &args.data, config, &device)?;
    let unit = match model {
        candle_fit::model_source::LoadedModel::CausalLm { .. }
        | candle_fit::model_source::LoadedModel::Gpt2 { .. } => "tokens",
        candle_fit::model_source::LoadedModel::Classifier { .. } => "samples",
    };
    let line: Vec<String> = metrics.iter().map(|(name, value)| format!("{name}={value:.4}")).collect();
    println!("{} {unit}={count}", line.join(" "));
    Ok(())
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    // The conversation is read before the model loads, so a bad file is reported at once.
    let conversation = match (&args.messages, &args.prompt) {
        (Some(path), _) => Some(candle_fit::datasets::read_messages(path).context("--messages")?),
        (None, Some(prompt)) if args.chat => {
            Some(vec![candle_fit::datasets::Message { role: "user".into(), content: prompt.clone() }])
        }
        _ => None,
    };
    let device = candle::Device::Cpu;
    match candle_fit::model_source::load_model(&args.model, candle::DType::F32, &device)? {
        candle_fit::model_source::LoadedModel::CausalLm { model, tokenizer } => {
            generate_with(&model, &tokenizer, conversation, &args)
        }
        candle_fit::model_source::LoadedModel::Gpt2 { model, tokenizer } => {
            generate_with(&model, &tokenizer, conversation, &args)
        }
        candle_fit::model_source::LoadedModel::Classifier { .. } => {
            anyhow::bail!("--model {}: a classifier does not generate text", args.model)
        }
    }
}

/// `generate`'s body for a loaded causal language model.
fn generate_with(
    model: &impl candle_fit::train::generate::CausalLm,
    tokenizer: &candle_fit::gguf_tokenizer::LmTokenizer,
    conversation: Option<Vec<candle_fit::datasets::Message>>,
    args: &GenerateArgs,
) -> anyhow::Result<()> {
    use candle_fit::train::generate::{generate, GenerationConfig, Sampling};
    use std::io::Write;
    let text = match conversation {
        Some(messages) => {
            let flag = if args.messages.is_some() { "--messages" } else { "--chat" };
            let source = tokenizer
                .chat_template()
                .with_context(|| format!("{flag}: the model's tokenizer has no chat template"))?;
            let token = |id: Option<u32>| id.and_then(|id| tokenizer.token(id)).unwrap_or_default();
            let template = candle_fit::datasets::ChatTemplate::new(
                source,
                &token(tokenizer.bos_id()),
                &token(tokenizer.eos_id()),
            )?;
            template.render(&messages, true)?
        }
        None => args.prompt.clone().unwrap_or_default(),
    };
    let prompt = tokenizer.encode(&text)?;
    let sampling = if args.temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Sample { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p }
    };
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling,
        seed: args.seed,
        stop_tokens: tokenizer.eos_id().into_iter().collect(),
        use_cache: !args.no_cache,
    };
    // Each token's text is the growth of the decoded continuation (a token can end inside a
    // multi-byte character); the stop token is not printed.
    let (mut tokens, mut printed) = (Vec::new(), String::new());
    let mut stdout = std::io::stdout();
    let stream_error = |e: String| candle_fit::train::Error::config("generate", e);
    let start = std::time::Instant::now();
    let mut first_token: Option<std::time::Instant> = None;
    let generated = generate(model, &prompt, &config, |token| {
        first_token.get_or_insert_with(std::time::Instant::now);
        if config.stop_tokens.contains(&token) {
            return Ok(());
        }
        tokens.push(token);
        let text = tokenizer.decode(&tokens).map_err(|e| stream_error(e.to_string()))?;
        if text.len() > printed.len() && text.starts_with(&printed) && !text.ends_with('\u{fffd}') {
            stdout.write_all(&text.as_bytes()[printed.len()..]).map_err(|e| stream_error(e.to_string()))?;
            stdout.flush().map_err(|e| stream_error(e.to_string()))?;
            printed = text;
        }
        Ok(())
    })?;
    let end = std::time::Instant::now();
    // Whatever streaming held back (a decoding that rewrote earlier text, a final partial
    // character) comes out at the end.
    let text = tokenizer.decode(&tokens)?;
    match text.strip_prefix(printed.as_str()) {
        Some(rest) => println!("{rest}"),
        None => println!("\n{text}"),
    }
    if let (true, Some(first)) = (args.timings, first_token) {
        let prompt_s = (first - start).as_secs_f64();
        let decoded = generated.len().saturating_sub(1);
        let decode_s = (end - first).as_secs_f64();
        eprintln!(
            "prompt: {} tokens in {prompt_s:.3} s ({:.1} tokens/s); decode: {decoded} tokens in {decode_s:.3} s ({:.1} tokens/s)",
            prompt.len(),
            prompt.len() as f64 / prompt_s,
            decoded as f64 / decode_s.max(f64::MIN_POSITIVE),
        );
    }
    Ok(())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train(args) => train(args),
        Command::Bench(args) => bench(args),
        Command::BenchOptimizer(args) => bench_optimizer(args),
        Command::Estimate(args) => estimate(args),
        Command::Launch(args) => launch(args),
        Command::Eval(args) => eval(args),
        Command::Generate(args) => generate(args),
        Command::Finetune(args) => finetune(args),
    }
}

fn main() -> ExitCode {
    // The CPU settings of `cpu_runtime` (Candle's spinning element-wise pool off, the
    // allocator keeps freed memory, the work runs on a worker of the matmul's thread pool).
    // `CANDLE_FIT_CPU_RUNTIME=off` leaves the process as plain Candle would run it, for
    // comparisons (BENCHMARKS.md section 14).
    let tuned = std::env::var("CANDLE_FIT_CPU_RUNTIME").map_or(true, |v| v != "off");
    if tuned {
        // First, while this is the only thread.
        cpu_runtime::serial_candle_maps();
    }
    let cli = Cli::parse();
    let result = if tuned {
        cpu_runtime::retain_freed_memory();
        cpu_runtime::run_on_pool(cpu_runtime::matmul_threads(), move || run(cli.command))
            .context("starting the worker threads")
            .and_then(|r| r)
    } else {
        run(cli.command)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}
