//! The one Trainer over models and data other than the GPT on bytes: masked token batches of
//! uneven lengths (accumulation and data-parallel ranks equal the big batch), a user's own
//! model and batch type on synthetic data (checkpoint + resume bit-identical, callbacks,
//! evaluators), and a BERT classifier trained from a CSV file (accuracy rises).

use std::cell::RefCell;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_fit::ckpt::{RngKey, SegmentContext, SegmentParameter, SegmentedModel};
use candle_fit::datasets::{
    read_records, ClassificationDataset, Format, LabelMap, TokenDataset, IGNORE_INDEX,
};
use candle_fit::shard::driver::{fit_in_process, InProcessConfig};
use candle_fit::shard::ZeroStage;
use candle_fit::train::evaluate::Metrics;
use candle_fit::train::metrics::StepRecord;
use candle_fit::train::models::{Bert, BertClassifier, BertConfig, Llama, LlamaConfig};
use candle_fit::train::{
    Callback, ClassifierEvaluator, Counted, DataShape, DataSource, Gpt, GptConfig, Hooks, LocalUpdater,
    LrSchedule, OptimizerConfig, ParamBuilder, Parameters, SgdConfig, TrainableModel, Trainer, TrainerConfig,
};
use common::masked_examples;

fn temp_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("candle-fit-trainer-any-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Examples of 3 to 13 tokens whose first `len / 3` tokens are a masked prompt.
fn token_data() -> anyhow::Result<TokenDataset> {
    Ok(TokenDataset::new("synthetic", masked_examples(40, 1), masked_examples(6, 2), 0)?)
}

fn tiny_gpt() -> GptConfig {
    GptConfig { vocab_size: 64, n_ctx: 16, n_embd: 16, n_layer: 2, n_head: 2, ..GptConfig::default() }
}

fn sgd_trainer(micro_batch: usize, accumulation_steps: usize, steps: usize) -> anyhow::Result<TrainerConfig> {
    Ok(TrainerConfig::builder()
        .micro_batch(micro_batch)
        .accumulation_steps(accumulation_steps)
        .steps(steps)
        .seq_len(12)
        .schedule(LrSchedule::Constant { lr: 0.5 })
        .max_grad_norm(None)
        .eval_windows(4)
        .build()?)
}

/// The FP32 gradient of one step of the masked token data, per parameter.
fn masked_gradient(micro_batch: usize, accumulation_steps: usize) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    let model = Gpt::new(tiny_gpt(), DType::F32, &Device::Cpu, 3)?;
    let mut updater =
        LocalUpdater::from_config(model.parameters(), &OptimizerConfig::Sgd(SgdConfig::default()))?;
    let trainer = Trainer::new(sgd_trainer(micro_batch, accumulation_steps, 1)?);
    let data = token_data()?;
    let decisions = trainer.plan(&model, &data)?;
    trainer.accumulate_step(&model, &data, &mut updater, 4, &decisions, 1.0)?;
    model
        .parameters()
        .iter()
        .map(|p| {
            let g =
                updater.gradient(&p.name)?.ok_or_else(|| anyhow::anyhow!("no gradient for {}", p.name))?;
            Ok((p.name.clone(), g.to_vec()))
        })
        .collect()
}

fn max_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (String, f32) {
    let mut worst = (String::new(), 0f32);
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
        let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
        if diff > worst.1 {
            worst = (name.clone(), diff);
        }
    }
    worst
}

/// k micro-batches of uneven counted-token totals (prompts masked, right padding) give the
/// gradient of the one big batch, within 1e-6 of each parameter's magnitude (F32).
#[test]
fn masked_uneven_micro_batches_give_the_big_batch_gradient() -> anyhow::Result<()> {
    let data = token_data()?;
    let shape = DataShape { seq_len: 12, eval_samples: 4, eval_batch: 2 };
    let counts: Vec<usize> = (0..3)
        .map(|m| data.count(0, 4, 2 * m..2 * m + 2, &shape))
        .collect::<candle_fit::train::Result<_>>()?;
    assert!(counts.windows(2).any(|w| w[0] != w[1]), "the test needs uneven micro-batches: {counts:?}");
    let whole = masked_gradient(6, 1)?;
    assert!(whole.iter().any(|(_, g)| g.iter().any(|v| *v != 0.0)));
    for (micro_batch, accumulation_steps) in [(2, 3), (3, 2), (1, 6)] {
        let (name, rel) = max_difference(&whole, &masked_gradient(micro_batch, accumulation_steps)?);
        assert!(
            rel <= 1e-6,
            "{accumulation_steps} x {micro_batch}: `{name}` differs by {rel:e} of its magnitude"
        );
    }
    Ok(())
}

fn parameter_values(params: &Parameters) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    params
        .iter()
        .map(|p| Ok((p.name.clone(), p.tensor()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

/// The same masked data on 2 and 3 data-parallel ranks (ZeRO 0 and 3) ends, after two SGD
/// steps, with one rank's parameter updates (within 1e-6 of each update's magnitude).
#[test]
fn masked_data_on_several_ranks_equals_one_rank() -> anyhow::Result<()> {
    let data = token_data()?;
    let make = |_rank: usize| Gpt::new(tiny_gpt(), DType::F32, &Device::Cpu, 3);
    let initial = parameter_values(make(0)?.parameters())?;
    let optimizer = OptimizerConfig::Sgd(SgdConfig::default());
    let single = {
        let model = make(0)?;
        let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
        Trainer::new(sgd_trainer(6, 1, 2)?).fit(&model, &data, &mut updater)?;
        parameter_values(model.parameters())?
    };
    let delta = |values: &[(String, Vec<f32>)]| -> Vec<(String, Vec<f32>)> {
        values
            .iter()
            .zip(&initial)
            .map(|((n, v), (_, v0))| (n.clone(), v.iter().zip(v0).map(|(a, b)| a - b).collect()))
            .collect()
    };
    let single_delta = delta(&single);
    for (world_size, stage) in [(2, ZeroStage::Stage0), (3, ZeroStage::Stage3)] {
        let config = InProcessConfig {
            world_size: NonZeroUsize::new(world_size).ok_or_else(|| anyhow::anyhow!("zero ranks"))?,
            stage,
            timeout: Duration::from_secs(60),
        };
        let runs = fit_in_process(&config, &Trainer::new(sgd_trainer(6, 1, 2)?), &data, &optimizer, make)?;
        let ranked = delta(&parameter_values(runs[0].model.parameters())?);
        let (name, rel) = max_difference(&single_delta, &ranked);
        assert!(rel <= 1e-6, "{world_size} ranks ({stage:?}): update of `{name}` differs by {rel:e}");
        let (one, many) = (&runs[0].report.history, &runs[1].report.history);
        assert_eq!(one.len(), 2);
        assert_eq!(one[1].loss.to_bits(), many[1].loss.to_bits(), "ranks report the global loss");
    }
    Ok(())
}

// ---- A user's own model and batch type ----

/// Inputs `[n, 4]` and targets `[n, 1]`.
#[derive(Debug, Clone)]
struct Pairs {
    x: Tensor,
    y: Tensor,
}

/// A two-segment regressor: `tanh(x W1)` then `(h W2 - y)^2`, mean over the samples.
struct Regressor {
    params: Parameters,
    w1: Var,
    w2: Var,
}

impl Regressor {
    fn new(seed: u64) -> anyhow::Result<Self> {
        let mut pb = ParamBuilder::new(DType::F32, Device::Cpu, seed);
        let w1 = pb.normal("hidden.weight", (4, 8), 0.5)?;
        let w2 = pb.normal("head.weight", (8, 1), 0.5)?;
        Ok(Self { params: pb.finish(), w1, w2 })
    }
}

impl SegmentedModel for Regressor {
    type Batch = Pairs;

    fn num_segments(&self) -> usize {
        2
    }

    fn segment_name(&self, index: usize) -> String {
        ["hidden", "head"][index.min(1)].to_string()
    }

    fn first_input(&self, batch: &Pairs) -> candle::Result<Tensor> {
        Ok(batch.x.clone())
    }

    fn forward_segment(
        &self,
        index: usize,
        input: &Tensor,
        batch: &Pairs,
        _: &SegmentContext,
    ) -> candle::Result<Tensor> {
        match index {
            0 => input.matmul(self.w1.as_tensor())?.tanh(),
            _ => input.matmul(self.w2.as_tensor())?.sub(&batch.y)?.sqr()?.mean_all(),
        }
    }

    fn segment_parameters(&self, index: usize) -> Vec<SegmentParameter> {
        self.params.segment_parameters_under(&self.segment_name(index))
    }

    fn is_block(&self, index: usize) -> bool {
        index == 0
    }
}

impl TrainableModel for Regressor {
    fn parameters(&self) -> &Parameters {
        &self.params
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn settings(&self) -> String {
        "{\"kind\":\"regressor\",\"hidden\":8}".to_string()
    }
}

/// `y = sin(x0) + x1 x2 - x3`, `x` uniform in [-1, 1), drawn per (seed, step, sample).
struct Synthetic;

impl Synthetic {
    fn pairs(keys: impl Iterator<Item = RngKey>, device: &Device) -> candle_fit::train::Result<Pairs> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for key in keys {
            let mut rng = key.rng();
            let v: Vec<f32> = (0..4).map(|_| rng.uniform_f32() * 2.0 - 1.0).collect();
            y.push(v[0].sin() + v[1] * v[2] - v[3]);
            x.extend(v);
        }
        let n = y.len();
        Ok(Pairs { x: Tensor::from_vec(x, (n, 4), device)?, y: Tensor::from_vec(y, (n, 1), device)? })
    }
}

impl DataSource for Synthetic {
    type Batch = Pairs;

    fn fingerprint(&self, _: &DataShape) -> String {
        "synthetic sin(x0)+x1x2-x3".to_string()
    }

    fn batch(
        &self,
        seed: u64,
        step: u64,
        samples: Range<usize>,
        _: &DataShape,
        device: &Device,
    ) -> candle_fit::train::Result<Pairs> {
        Self::pairs(
            samples.map(|j| RngKey { seed, step, micro_batch: j as u64, segment: 0, stream: 7 }),
            device,
        )
    }

    fn count(
        &self,
        _: u64,
        _: u64,
        samples: Range<usize>,
        _: &DataShape,
    ) -> candle_fit::train::Result<usize> {
        Ok(samples.len())
    }

    fn validation(
        &self,
        shape: &DataShape,
        device: &Device,
    ) -> candle_fit::train::Result<Vec<Counted<Pairs>>> {
        let n = shape.eval_samples;
        let batch = Self::pairs(
            (0..n).map(|j| RngKey { seed: u64::MAX, step: 0, micro_batch: j as u64, segment: 0, stream: 8 }),
            device,
        )?;
        Ok(vec![Counted { batch, count: n }])
    }
}

/// Records what the Trainer reports to callbacks.
#[derive(Default)]
struct Seen {
    steps: Vec<u64>,
    evaluations: Vec<(u64, Metrics)>,
    checkpoints: Vec<u64>,
    ended: bool,
}

struct Recorder(Rc<RefCell<Seen>>);

impl Callback for Recorder {
    fn on_step(&mut self, record: &StepRecord) -> candle_fit::train::Result<()> {
        self.0.borrow_mut().steps.push(record.step);
        Ok(())
    }

    fn on_evaluation(&mut self, step: u64, metrics: &Metrics) -> candle_fit::train::Result<()> {
        self.0.borrow_mut().evaluations.push((step, metrics.clone()));
        Ok(())
    }

    fn on_checkpoint(&mut self, step: u64, _: &std::path::Path) -> candle_fit::train::Result<()> {
        self.0.borrow_mut().checkpoints.push(step);
        Ok(())
    }

    fn on_end(&mut self, failed: bool) -> candle_fit::train::Result<()> {
        self.0.borrow_mut().ended = !failed;
        Ok(())
    }
}

fn regressor_config(dir: &std::path::Path) -> anyhow::Result<TrainerConfig> {
    Ok(TrainerConfig::builder()
        .micro_batch(4)
        .accumulation_steps(2)
        .steps(8)
        .lr(0.05)
        .warmup_steps(2)
        .eval_interval(4)
        .eval_windows(32)
        .checkpoint(dir, 4, 2)
        .build()?)
}

/// A user's model with its own batch type trains on keyed synthetic data; the loss falls; the
/// callbacks see every step, evaluation and checkpoint; a run resumed from the step-4
/// checkpoint ends bit-identical to the uninterrupted run.
#[test]
fn a_users_model_on_synthetic_data_trains_and_resumes_bit_identical() -> anyhow::Result<()> {
    let dir = temp_dir("regressor")?;
    let optimizer = OptimizerConfig::AdamW(Default::default());
    let model = Regressor::new(5)?;
    let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
    let seen = Rc::new(RefCell::new(Seen::default()));
    let mse = |model: &Regressor, batches: &[Counted<Pairs>]| -> candle_fit::train::Result<Metrics> {
        let loss = Trainer::evaluate(model, batches)?;
        Ok(Metrics::from([("loss".to_string(), loss), ("rmse".to_string(), loss.sqrt())]))
    };
    let hooks = Hooks::new().evaluator(mse).callback(Recorder(seen.clone()));
    let trainer = Trainer::new(regressor_config(&dir)?);
    let report = trainer.fit_with(&model, &Synthetic, &mut updater, hooks)?;
    assert!(report.final_val_loss < report.initial_val_loss * 0.9, "{report:?}");
    assert!(report.final_metrics.contains_key("rmse"));
    {
        let seen = seen.borrow();
        assert_eq!(seen.steps, (1..=8).collect::<Vec<u64>>());
        assert_eq!(seen.evaluations.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [0, 4, 8]);
        assert_eq!(seen.checkpoints, [4, 8]);
        assert!(seen.ended);
    }
    let resumed = Regressor::new(99)?;
    let mut resumed_updater = LocalUpdater::from_config(resumed.parameters(), &optimizer)?;
    let again = trainer.resume(&resumed, &Synthetic, &mut resumed_updater, &dir.join("step-00000004"))?;
    assert_eq!(again.start_step, 4);
    for (a, b) in model.parameters().iter().zip(resumed.parameters().iter()) {
        let (x, y) =
            (a.tensor()?.flatten_all()?.to_vec1::<f32>()?, b.tensor()?.flatten_all()?.to_vec1::<f32>()?);
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "`{}` differs after resume",
            a.name
        );
    }
    let tail =
        |r: &candle_fit::train::TrainReport| r.history.iter().map(|h| h.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(tail(&report)[4..], tail(&again)[..]);
    // Other data is refused, naming the data.
    struct Other;
    impl DataSource for Other {
        type Batch = Pairs;
        fn fingerprint(&self, _: &DataShape) -> String {
            "other".into()
        }
        fn batch(
            &self,
            s: u64,
            t: u64,
            r: Range<usize>,
            sh: &DataShape,
            d: &Device,
        ) -> candle_fit::train::Result<Pairs> {
            Synthetic.batch(s, t, r, sh, d)
        }
        fn count(&self, s: u64, t: u64, r: Range<usize>, sh: &DataShape) -> candle_fit::train::Result<usize> {
            Synthetic.count(s, t, r, sh)
        }
        fn validation(&self, sh: &DataShape, d: &Device) -> candle_fit::train::Result<Vec<Counted<Pairs>>> {
            Synthetic.validation(sh, d)
        }
    }
    let e = trainer.resume(&resumed, &Other, &mut resumed_updater, &dir.join("step-00000004")).err();
    let e = e.map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("training data") && e.contains("other"), "{e}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

// ---- A classifier from a CSV file ----

/// A tiny BERT classifier on a CSV file of two kinds of texts (byte tokens): held-out accuracy
/// through `ClassifierEvaluator` rises from chance to at least 0.9.
#[test]
fn a_classifier_trains_on_a_csv_file_and_its_accuracy_rises() -> anyhow::Result<()> {
    let dir = temp_dir("csv")?;
    let path = dir.join("reviews.csv");
    let mut csv = String::from("text,label\n");
    for i in 0..48 {
        let (text, label) = if i % 2 == 0 { ("a a b a", "pos") } else { ("c d c c", "neg") };
        // Vary the texts a little: a rotating filler letter.
        let filler = (b'e' + (i % 5) as u8) as char;
        csv.push_str(&format!("{text} {filler},{label}\n"));
    }
    std::fs::write(&path, csv)?;
    let records = read_records(&path, Some(Format::Classification))?;
    let labels = LabelMap::from_records(&records)?;
    let samples: Vec<(Vec<u32>, u32)> = labels
        .resolve(&records)?
        .into_iter()
        .map(|(text, label)| (text.bytes().map(|b| u32::from(b - b' ') % 11).collect(), label as u32))
        .collect();
    let (train, validation) = samples.split_at(40);
    let data =
        ClassificationDataset::new("reviews.csv", train.to_vec(), validation.to_vec(), labels.len(), 0)?;
    let config = BertConfig {
        max_position_embeddings: 16,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        ..BertConfig::tiny()
    };
    let model = BertClassifier::new(Bert::new(&config, "", DType::F32, &Device::Cpu, 1)?, labels.len(), 2)?;
    let mut updater =
        LocalUpdater::from_config(model.parameters(), &OptimizerConfig::AdamW(Default::default()))?;
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(4)
            .accumulation_steps(2)
            .steps(30)
            .seq_len(16)
            .lr(1e-2)
            .eval_interval(0)
            .build()?,
    );
    let report =
        trainer.fit_with(&model, &data, &mut updater, Hooks::new().evaluator(ClassifierEvaluator))?;
    let accuracy = |m: &Metrics| m.get("accuracy").copied().unwrap_or(f64::NAN);
    assert!(
        accuracy(&report.final_metrics) >= 0.9,
        "{:?} -> {:?}",
        report.initial_metrics,
        report.final_metrics
    );
    assert!(accuracy(&report.final_metrics) > accuracy(&report.initial_metrics));
    assert!(report.final_val_loss < report.initial_val_loss);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// ZeRO stage 3 takes any trainable model, not only language models: a BERT classifier on 2
/// ranks (parameters released and gathered per segment) ends one SGD step where one rank does,
/// every update within 1e-6 of the model's largest update.
#[test]
fn a_classifier_under_zero_stage_three_equals_one_rank() -> anyhow::Result<()> {
    let samples: Vec<(Vec<u32>, u32)> =
        (0..24u32).map(|i| ((0..6).map(|k| (i * 7 + k * 3) % 11).collect(), i % 3)).collect();
    let (train, validation) = samples.split_at(18);
    let data = ClassificationDataset::new("synthetic", train.to_vec(), validation.to_vec(), 3, 0)?;
    let config = BertConfig {
        max_position_embeddings: 16,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..BertConfig::tiny()
    };
    let make = |_rank: usize| BertClassifier::new(Bert::new(&config, "", DType::F32, &Device::Cpu, 1)?, 3, 2);
    let initial = parameter_values(make(0)?.parameters())?;
    let optimizer = OptimizerConfig::Sgd(SgdConfig::default());
    let trainer = || -> anyhow::Result<Trainer> { Ok(Trainer::new(sgd_trainer(6, 1, 1)?)) };
    let single = {
        let model = make(0)?;
        let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
        trainer()?.fit(&model, &data, &mut updater)?;
        parameter_values(model.parameters())?
    };
    let delta = |values: &[(String, Vec<f32>)]| -> Vec<(String, Vec<f32>)> {
        values
            .iter()
            .zip(&initial)
            .map(|((n, v), (_, v0))| (n.clone(), v.iter().zip(v0).map(|(a, b)| a - b).collect()))
            .collect()
    };
    let config = InProcessConfig {
        world_size: NonZeroUsize::new(2).ok_or_else(|| anyhow::anyhow!("zero ranks"))?,
        stage: ZeroStage::Stage3,
        timeout: Duration::from_secs(60),
    };
    let runs = fit_in_process(&config, &trainer()?, &data, &optimizer, make)?;
    let (single_delta, ranked) = (delta(&single), delta(&parameter_values(runs[0].model.parameters())?));
    assert!(single_delta.iter().any(|(_, d)| d.iter().any(|&x| x != 0.0)), "the step moved nothing");
    // Against the largest update of the model: the key biases' gradient is analytically zero
    // (a softmax ignores a constant added to every score of a query), so their updates are
    // rounding noise that no relative measure of their own can compare.
    let largest = single_delta.iter().flat_map(|(_, d)| d.iter()).fold(0f32, |m, v| m.max(v.abs()));
    for ((name, a), (_, b)) in single_delta.iter().zip(&ranked) {
        let diff = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= 1e-6 * largest,
            "stage 3 on 2 ranks: update of `{name}` differs by {diff:e} (largest {largest:e})"
        );
    }
    let (name, rel) = max_difference(&single_delta, &ranked);
    println!("worst relative to its own update: {rel:e} ({name})");
    assert!(runs[0].peak_gathered_bytes > 0, "stage 3 released and gathered the parameters");
    Ok(())
}

/// The built-in sources keep the `DataSource` contract: a range's samples are those of its
/// parts (up to per-batch padding), counts add up, and the fingerprint names the sequence
/// length.
#[test]
fn token_and_byte_sources_sample_by_key_and_count_additively() -> anyhow::Result<()> {
    let shape = DataShape { seq_len: 12, eval_samples: 4, eval_batch: 2 };
    let data = token_data()?;
    let whole = data.batch(3, 9, 0..5, &shape, &Device::Cpu)?;
    let parts =
        [data.batch(3, 9, 0..2, &shape, &Device::Cpu)?, data.batch(3, 9, 2..5, &shape, &Device::Cpu)?];
    let whole_rows = whole.targets.to_vec2::<i64>()?;
    let part_rows: Vec<Vec<i64>> =
        parts.iter().map(|p| p.targets.to_vec2::<i64>()).collect::<candle::Result<Vec<_>>>()?.concat();
    for (a, b) in whole_rows.iter().zip(&part_rows) {
        let unpadded = |r: &[i64]| r.iter().rev().skip_while(|&&t| t == IGNORE_INDEX).count();
        let n = unpadded(a).max(unpadded(b));
        assert_eq!(a[..n], b[..n], "a sample depends only on (seed, step, index)");
    }
    let counted = |rows: &[Vec<i64>]| rows.iter().flatten().filter(|&&t| t != IGNORE_INDEX).count();
    assert_eq!(data.count(3, 9, 0..5, &shape)?, counted(&whole_rows));
    assert_eq!(
        data.count(3, 9, 0..5, &shape)?,
        data.count(3, 9, 0..2, &shape)? + data.count(3, 9, 2..5, &shape)?
    );
    assert_ne!(data.fingerprint(&shape), data.fingerprint(&DataShape { seq_len: 8, ..shape }));
    let corpus = candle_fit::train::Corpus::from_bytes("c.txt".as_ref(), b"abcdefgh ".repeat(30), 0.2)?;
    assert_eq!(corpus.count(0, 0, 0..3, &shape)?, 36);
    assert_ne!(corpus.fingerprint(&shape), corpus.fingerprint(&DataShape { seq_len: 8, ..shape }));
    Ok(())
}

/// Trains `make(1)` 4 AdamW steps with a checkpoint every 2, then resumes a fresh `make(2)`
/// (other initial values) from the step-2 checkpoint: the resumed run ends on the same bits and
/// its last two steps' losses are the uninterrupted run's.
fn resumes_bit_identical<M, D>(
    name: &str,
    make: impl Fn(u64) -> candle_fit::train::Result<M>,
    data: &D,
) -> anyhow::Result<()>
where
    M: TrainableModel,
    M::Batch: Sized,
    D: DataSource<Batch = M::Batch>,
{
    let dir = temp_dir(name)?;
    let optimizer = OptimizerConfig::AdamW(Default::default());
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(3)
            .accumulation_steps(2)
            .steps(4)
            .seq_len(12)
            .warmup_steps(1)
            .eval_windows(4)
            .eval_interval(0)
            .checkpoint(&dir, 2, 2)
            .build()?,
    );
    let model = make(1)?;
    let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
    let report = trainer.fit(&model, data, &mut updater)?;
    let resumed = make(2)?;
    let mut resumed_updater = LocalUpdater::from_config(resumed.parameters(), &optimizer)?;
    let again = trainer.resume(&resumed, data, &mut resumed_updater, &dir.join("step-00000002"))?;
    assert_eq!(again.start_step, 2);
    let bits = |m: &M| -> anyhow::Result<Vec<(String, Vec<u32>)>> {
        Ok(parameter_values(m.parameters())?
            .into_iter()
            .map(|(n, v)| (n, v.into_iter().map(f32::to_bits).collect()))
            .collect())
    };
    assert!(bits(&model)? == bits(&resumed)?, "{name}: the resumed run ends on other values");
    let losses =
        |r: &candle_fit::train::TrainReport| r.history.iter().map(|h| h.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&report)[2..], losses(&again)[..], "{name}");
    assert!(bits(&make(1)?)? != bits(&model)?, "{name}: training moved the parameters");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Checkpoint and resume are the Trainer's, whatever the model and data: a LLaMA on masked
/// token examples of uneven lengths and a BERT classifier on labelled sequences (dropout on,
/// replayed from the checkpointed generator) both resume bit-identically.
#[test]
fn a_llama_on_masked_tokens_and_a_classifier_resume_bit_identically() -> anyhow::Result<()> {
    let llama = |seed| {
        Llama::new(&LlamaConfig { vocab_size: 64, ..LlamaConfig::tiny() }, DType::F32, &Device::Cpu, seed)
    };
    resumes_bit_identical("llama", llama, &token_data()?)?;
    let samples: Vec<(Vec<u32>, u32)> = (0..30u32)
        .map(|i| ((0..3 + i as usize % 5).map(|k| (i * 7 + k as u32 * 3) % 11).collect(), i % 3))
        .collect();
    let (train, validation) = samples.split_at(24);
    let data = ClassificationDataset::new("synthetic", train.to_vec(), validation.to_vec(), 3, 0)?;
    let config = BertConfig {
        max_position_embeddings: 16,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
        ..BertConfig::tiny()
    };
    let classifier =
        |seed| BertClassifier::new(Bert::new(&config, "", DType::F32, &Device::Cpu, seed)?, 3, seed);
    resumes_bit_identical("classifier", classifier, &data)
}
