//! The memory estimator (a one-block probe composed by a model-independent simulation of the
//! engine) predicts a training step's measured peak heap bytes within 5% for GPT, LLaMA and
//! BERT, across depth, width, sequence length, micro-batch, dtype, recompute policies (never,
//! all, every other block, a byte budget), accumulation, optimizer and dropout, and for LoRA and
//! QLoRA LLaMAs (dense F32/BF16, NF4, Q4_1 and Q8_0 bases). The measurement is the Trainer's own,
//! through the counting allocator this test binary installs.
//!
//! `cargo test --test estimator -- --nocapture` prints the table of predicted and measured
//! peaks.

mod common;

use std::ops::Range;
use std::sync::Mutex;

use candle::{DType, Device, Tensor};
use candle_fit::ckpt::{measure_segments, Recompute, SegmentContext};
use candle_fit::train::estimate::{default_runtime_bytes, ModelShape};
use candle_fit::train::memory::{self, CountingAllocator};
use candle_fit::train::models::{Bert, BertClassifier, BertConfig, ClassificationBatch};
use candle_fit::train::{
    estimate_memory, AdamWConfig, Corpus, Counted, DataShape, DataSource, EstimateInput, Gpt, GptConfig,
    Llama, LlamaConfig, LocalUpdater, MemoryEstimate, MemoryReport, OptimizerConfig, SgdConfig,
    TrainableModel, Trainer, TrainerConfig,
};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// Memory is process-wide: tests of this binary run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const CORPUS_BYTES: usize = 100_000;
const VALIDATION_FRACTION: f64 = 0.1;
const EVAL_WINDOWS: usize = 2;
/// The error allowed on the peak.
const TOLERANCE: f64 = 0.05;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Family {
    Gpt,
    Llama,
    Bert,
}

/// One configuration of the grid.
#[derive(Debug, Clone, Copy)]
struct Row {
    family: Family,
    layers: usize,
    width: usize,
    seq_len: usize,
    micro_batch: usize,
    dtype: DType,
    recompute: Recompute,
    accumulation: usize,
    sgd: bool,
    dropout: f32,
}

impl Row {
    fn shape(&self) -> ModelShape {
        match self.family {
            Family::Gpt => ModelShape::Gpt(GptConfig {
                n_layer: self.layers,
                n_embd: self.width,
                n_head: 4,
                n_ctx: 128,
                dropout: self.dropout,
                ..GptConfig::default()
            }),
            Family::Llama => ModelShape::Llama(LlamaConfig {
                vocab_size: 256,
                hidden_size: self.width,
                intermediate_size: self.width * 8 / 3,
                num_hidden_layers: self.layers,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                max_position_embeddings: 128,
                rms_norm_eps: 1e-5,
                rope_theta: 10_000.0,
                tie_word_embeddings: false,
                hidden_act: "silu".into(),
                ..LlamaConfig::tiny()
            }),
            Family::Bert => ModelShape::Bert {
                config: BertConfig {
                    vocab_size: 1000,
                    hidden_size: self.width,
                    num_hidden_layers: self.layers,
                    num_attention_heads: 4,
                    intermediate_size: self.width * 4,
                    max_position_embeddings: 128,
                    type_vocab_size: 2,
                    layer_norm_eps: 1e-12,
                    hidden_dropout_prob: self.dropout,
                    attention_probs_dropout_prob: self.dropout,
                    hidden_act: "gelu".into(),
                    ..BertConfig::tiny()
                },
                num_labels: 3,
            },
        }
    }

    fn optimizer(&self) -> OptimizerConfig {
        if self.sgd {
            OptimizerConfig::Sgd(SgdConfig::default())
        } else {
            OptimizerConfig::AdamW(AdamWConfig::default())
        }
    }

    fn label(&self) -> String {
        format!(
            "{:?} L{} C{} T{} B{} {} {} k{} {} p{}",
            self.family,
            self.layers,
            self.width,
            self.seq_len,
            self.micro_batch,
            match self.dtype {
                DType::BF16 => "bf16",
                DType::F16 => "f16",
                _ => "f32",
            },
            self.recompute,
            self.accumulation,
            if self.sgd { "sgd" } else { "adamw" },
            self.dropout
        )
    }
}

fn corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::from_bytes(
        "austen".as_ref(),
        candle_fit::BUNDLED_CORPUS[..CORPUS_BYTES].to_vec(),
        VALIDATION_FRACTION,
    )?)
}

/// Classification batches of full-length sequences drawn from (seed, step, sample), one
/// validation batch.
struct Classes {
    vocab: u32,
    labels: u32,
}

impl Classes {
    fn make(
        &self,
        seed: u64,
        step: u64,
        samples: Range<usize>,
        t: usize,
    ) -> candle_fit::train::Result<ClassificationBatch> {
        let b = samples.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut labels = Vec::with_capacity(b);
        for s in samples {
            let mut rng =
                candle_fit::ckpt::RngKey { seed, step, micro_batch: s as u64, segment: 0, stream: 7 }.rng();
            ids.extend((0..t).map(|_| rng.below(self.vocab as u64) as u32));
            labels.push(rng.below(self.labels as u64) as u32);
        }
        let dev = Device::Cpu;
        Ok(ClassificationBatch {
            ids: Tensor::from_vec(ids, (b, t), &dev)?,
            token_types: Tensor::zeros((b, t), DType::U32, &dev)?,
            mask: Tensor::ones((b, t), DType::U32, &dev)?,
            labels: Tensor::from_vec(labels, b, &dev)?,
        })
    }
}

impl DataSource for Classes {
    type Batch = ClassificationBatch;

    fn fingerprint(&self, shape: &DataShape) -> String {
        format!("synthetic classes seq_len={}", shape.seq_len)
    }

    fn batch(
        &self,
        seed: u64,
        step: u64,
        samples: Range<usize>,
        shape: &DataShape,
        _device: &Device,
    ) -> candle_fit::train::Result<ClassificationBatch> {
        self.make(seed, step, samples, shape.seq_len)
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
        _device: &Device,
    ) -> candle_fit::train::Result<Vec<Counted<ClassificationBatch>>> {
        Ok(vec![Counted { batch: self.make(1, u64::MAX, 0..2, shape.seq_len)?, count: 2 }])
    }
}

fn trainer(row: &Row) -> anyhow::Result<Trainer> {
    Ok(Trainer::new(
        TrainerConfig::builder()
            .micro_batch(row.micro_batch)
            .accumulation_steps(row.accumulation)
            .steps(2)
            .seq_len(row.seq_len)
            .lr(1e-3)
            .warmup_steps(0)
            .eval_windows(EVAL_WINDOWS)
            .eval_interval(0)
            .recompute(row.recompute)
            .build()?,
    ))
}

fn fit<M: TrainableModel, D: DataSource<Batch = M::Batch>>(
    row: &Row,
    model: &M,
    data: &D,
) -> anyhow::Result<MemoryReport> {
    let mut updater = LocalUpdater::from_config(model.parameters(), &row.optimizer())?;
    Ok(trainer(row)?.fit(model, data, &mut updater)?.memory)
}

fn measure(row: &Row) -> anyhow::Result<MemoryReport> {
    let dev = Device::Cpu;
    match row.shape() {
        ModelShape::Gpt(c) => fit(row, &Gpt::new(c, row.dtype, &dev, 0)?, &corpus()?),
        ModelShape::Llama(c) => fit(row, &Llama::new(&c, row.dtype, &dev, 0)?, &corpus()?),
        ModelShape::Bert { config, num_labels } => {
            let model = BertClassifier::new(Bert::new(&config, "", row.dtype, &dev, 0)?, num_labels, 0)?;
            fit(row, &model, &Classes { vocab: config.vocab_size as u32, labels: num_labels as u32 })
        }
    }
}

fn predict(row: &Row) -> anyhow::Result<MemoryEstimate> {
    predict_probing(row, None)
}

fn predict_probing(row: &Row, probe_micro_batch: Option<usize>) -> anyhow::Result<MemoryEstimate> {
    let corpus_bytes = if row.family == Family::Bert { 0 } else { CORPUS_BYTES };
    let input = EstimateInput {
        model: row.shape(),
        dtype: row.dtype,
        micro_batch: row.micro_batch,
        seq_len: row.seq_len,
        accumulation_steps: row.accumulation,
        optimizer: row.optimizer(),
        recompute: row.recompute,
        corpus_bytes,
        validation_fraction: VALIDATION_FRACTION,
        eval_windows: EVAL_WINDOWS,
        runtime_bytes: default_runtime_bytes(),
        probe_micro_batch,
        lora: None,
    };
    Ok(estimate_memory(&input)?)
}

#[allow(clippy::too_many_arguments)]
const fn row(
    family: Family,
    layers: usize,
    width: usize,
    seq_len: usize,
    micro_batch: usize,
    dtype: DType,
    recompute: Recompute,
    accumulation: usize,
    sgd: bool,
    dropout: f32,
) -> Row {
    Row { family, layers, width, seq_len, micro_batch, dtype, recompute, accumulation, sgd, dropout }
}

/// Rows spanning every axis for each family (not their cross product: CPU time).
fn grid() -> Vec<Row> {
    use DType::{BF16, F32};
    use Family::{Bert, Gpt, Llama};
    use Recompute::{All, Budget, EveryK, Never};
    vec![
        row(Gpt, 2, 64, 32, 4, F32, Never, 1, false, 0.0),
        row(Gpt, 2, 64, 32, 4, BF16, All, 4, false, 0.1),
        row(Gpt, 4, 128, 64, 4, F32, EveryK(2), 1, true, 0.0),
        row(Gpt, 8, 64, 128, 4, F32, All, 1, false, 0.1),
        row(Gpt, 4, 128, 64, 8, BF16, Budget(2 << 20), 1, false, 0.0),
        row(Gpt, 8, 256, 32, 4, F32, Never, 1, false, 0.0),
        row(Llama, 2, 64, 32, 4, F32, Never, 1, false, 0.0),
        row(Llama, 4, 64, 64, 4, BF16, All, 2, false, 0.0),
        row(Llama, 4, 128, 64, 4, F32, EveryK(2), 1, true, 0.0),
        row(Llama, 8, 128, 32, 8, F32, Budget(3 << 20), 1, false, 0.0),
        row(Bert, 2, 64, 32, 4, F32, Never, 1, false, 0.1),
        row(Bert, 4, 64, 64, 4, BF16, All, 2, false, 0.0),
        row(Bert, 4, 128, 64, 4, F32, EveryK(2), 1, true, 0.1),
        row(Bert, 8, 128, 32, 8, F32, Budget(3 << 20), 1, false, 0.0),
    ]
}

#[test]
fn predicted_peaks_are_within_five_percent_of_the_measured_ones() -> anyhow::Result<()> {
    let _serial = SERIAL.lock();
    let rows = grid();
    let mut results = Vec::with_capacity(rows.len());
    for row in &rows {
        let predicted = predict(row)?;
        let measured = measure(row)?;
        results.push((row.label(), predicted, measured));
    }
    println!(
        "{:<46} {:>11} {:>11} {:>7} | {:>10} {:>10} | {:>9} {:>9}",
        "configuration", "predicted", "measured", "ratio", "pred act", "meas act", "pred oth", "meas oth"
    );
    for (label, p, m) in &results {
        let ratio = p.peak as f64 / m.peak as f64;
        println!(
            "{label:<46} {:>11} {:>11} {ratio:>7.4} | {:>10} {:>10} | {:>9} {:>9}",
            p.peak, m.peak, p.activations, m.activations, p.other, m.other
        );
    }
    for family in ["Gpt", "Llama", "Bert"] {
        let worst = results
            .iter()
            .filter(|(l, ..)| l.starts_with(family))
            .map(|(_, p, m)| p.peak as f64 / m.peak as f64 - 1.0)
            .fold(0.0f64, |w, e| if e.abs() > w.abs() { e } else { w });
        println!("{family}: worst error {:+.2}%", 100.0 * worst);
    }
    for (label, p, m) in &results {
        let error = (p.peak as f64 - m.peak as f64).abs() / m.peak as f64;
        assert!(
            error <= TOLERANCE,
            "{label}: predicted {} vs measured {} ({:+.1}%)",
            p.peak,
            m.peak,
            100.0 * (p.peak as f64 / m.peak as f64 - 1.0)
        );
        assert_eq!(
            (p.parameters, p.gradients, p.master_weights, p.optimizer_state),
            (m.parameters, m.gradients, m.master_weights, m.optimizer_state),
            "{label}: model state is exact"
        );
    }
    assert!(memory::is_installed());
    Ok(())
}

#[test]
fn probed_segment_sizes_match_measured_ones_and_a_budget_decides_alike() -> anyhow::Result<()> {
    use candle_fit::ckpt::RecomputePolicy;
    let _serial = SERIAL.lock();
    let corpus = corpus()?;
    for (dtype, dropout) in [(DType::F32, 0.0), (DType::BF16, 0.1)] {
        let config = GptConfig { n_layer: 4, n_embd: 64, n_head: 4, dropout, ..GptConfig::default() };
        let model = Gpt::new(config, dtype, &Device::Cpu, 0)?;
        let batch = corpus.train_batch(0, 0, 0, 8, 64, &Device::Cpu)?;
        let ctx = SegmentContext::train(0, 0, 0);
        // Once first: the matmul kernel's per-thread buffers are allocated on first use.
        measure_segments(&model, &batch, ctx, &memory::current_bytes)?;
        let measured = measure_segments(&model, &batch, ctx, &memory::current_bytes)?;
        let trainer = TrainerConfig::builder().micro_batch(8).seq_len(64).build()?;
        let input = EstimateInput::for_trainer(
            config,
            dtype,
            &trainer,
            OptimizerConfig::AdamW(AdamWConfig::default()),
            0,
            VALIDATION_FRACTION,
        )?;
        let estimated = estimate_memory(&input)?.segment_infos();
        assert_eq!(measured.len(), estimated.len());
        for (m, e) in measured.iter().zip(&estimated) {
            assert_eq!(m.name, e.name);
            let (m_bytes, e_bytes) =
                (m.activation_bytes.unwrap_or(0) as f64, e.activation_bytes.unwrap_or(0) as f64);
            assert!(
                (e_bytes / m_bytes - 1.0).abs() < 0.01,
                "{dtype:?} {}: estimated {e_bytes} vs measured {m_bytes}",
                m.name
            );
            assert_eq!(m.input_bytes, e.input_bytes, "{}", m.name);
        }
        let total: usize = measured.iter().filter_map(|s| s.activation_bytes).sum();
        let policy = Recompute::Budget(total / 2);
        assert_eq!(policy.decide(&measured)?, policy.decide(&estimated)?, "{dtype:?}");
    }
    Ok(())
}

/// Probing at micro-batches 2 and 4 and extrapolating linearly to 16 stays within 5% of the
/// measured peak, and within 1% of probing at 16 itself (GPT 0.00%, LLaMA 0.00%, BERT -0.49%). A block's backward peak is the larger
/// of a batch-independent part (the weight gradients, which a custom op's backward returns
/// together with the input's) and a per-sample part, so it is not linear in the batch at the
/// smallest micro-batches: since issue 24's fused kernels keep few per-sample tensors alive,
/// probes at 1 and 2 fall where the weight gradients dominate (GPT -3.05%, BERT -2.12% against
/// the probe at 16; LLaMA -6.4% since its bias-free linear layers became one op with the BF16
/// kernel). From 2 and 4 the extrapolation is past that kink.
#[test]
fn a_probe_at_a_small_micro_batch_extrapolates_to_the_real_one() -> anyhow::Result<()> {
    use DType::F32;
    use Family::{Bert, Gpt, Llama};
    let _serial = SERIAL.lock();
    for row in [
        row(Gpt, 4, 128, 64, 16, F32, Recompute::Never, 1, false, 0.0),
        row(Llama, 4, 128, 64, 16, F32, Recompute::All, 1, false, 0.0),
        row(Bert, 4, 128, 64, 16, F32, Recompute::EveryK(2), 1, false, 0.1),
    ] {
        let small = predict_probing(&row, Some(2))?;
        let full = predict(&row)?;
        let measured = measure(&row)?;
        let (to_full, to_measured) =
            (small.peak as f64 / full.peak as f64 - 1.0, small.peak as f64 / measured.peak as f64 - 1.0);
        println!(
            "{:<46} probed at 2+4: {} probed at 16: {} measured: {} ({:+.2}% / {:+.2}%)",
            row.label(),
            small.peak,
            full.peak,
            measured.peak,
            100.0 * to_full,
            100.0 * to_measured
        );
        assert!(to_full.abs() <= 0.01, "{}: {small:?} vs {full:?}", row.label());
        assert!(to_measured.abs() <= TOLERANCE, "{}: {} vs {}", row.label(), small.peak, measured.peak);
    }
    Ok(())
}

/// A user's model on the module layer (tests/common/stack_model.rs: pre-norm attention blocks
/// with a fused q/k/v projection, dropout) at width 64, estimated through `estimate_stacked`
/// from a one-block copy of it.
fn user_model(layers: usize) -> candle_fit::train::Result<common::stack_model::Mini> {
    common::stack_model::Mini::new(common::stack_model::MiniConfig {
        dtype: DType::F32,
        width: 64,
        heads: 4,
        vocab: 256,
        layers,
        embedding_std: 0.5,
        linear_std: 0.02,
        dropout: 0.1,
        seed: 0,
    })
}

#[test]
fn a_users_module_layer_model_is_estimated_from_a_one_block_copy() -> anyhow::Result<()> {
    use candle_fit::train::estimate::{corpus_data_bytes, estimate_stacked, StepSettings};
    let _serial = SERIAL.lock();
    let corpus = corpus()?;
    for (layers, recompute) in [(3, Recompute::Never), (6, Recompute::All)] {
        let (b, t) = (8, 64);
        let settings = StepSettings {
            micro_batch: b,
            probe_micro_batch: None,
            accumulation_steps: 1,
            optimizer: OptimizerConfig::AdamW(AdamWConfig::default()),
            recompute,
            data_bytes: corpus_data_bytes(CORPUS_BYTES, VALIDATION_FRACTION, EVAL_WINDOWS, b, t),
            runtime_bytes: default_runtime_bytes(),
        };
        let one = user_model(1)?;
        let predicted =
            estimate_stacked(&one, |n| corpus.train_batch(0, 0, 0, n, t, &Device::Cpu), layers, &settings)?;
        drop(one);
        let model = user_model(layers)?;
        let mut updater = LocalUpdater::from_config(model.parameters(), &settings.optimizer)?;
        let trainer = TrainerConfig::builder()
            .micro_batch(b)
            .steps(2)
            .seq_len(t)
            .warmup_steps(0)
            .eval_windows(EVAL_WINDOWS)
            .eval_interval(0)
            .recompute(recompute)
            .build()?;
        let measured = Trainer::new(trainer).fit(&model, &corpus, &mut updater)?.memory;
        let error = predicted.peak as f64 / measured.peak as f64 - 1.0;
        println!(
            "user model L{layers} C64 T{t} B{b} {recompute}: predicted {} measured {} ({:+.2}%)",
            predicted.peak,
            measured.peak,
            100.0 * error
        );
        assert!(error.abs() <= TOLERANCE, "{predicted:?} vs {measured:?}");
        assert_eq!(predicted.parameters, measured.parameters);
        assert_eq!(predicted.segments.len(), layers + 2);
        assert_eq!(predicted.segments[layers].name, format!("blocks.{}", layers - 1));
    }
    Ok(())
}

/// A LLaMA whose affine layers hold whole GGML blocks (every input dimension a multiple of 32).
fn lora_llama(layers: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 256,
        hidden_size: 128,
        intermediate_size: 384,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 128,
        tie_word_embeddings: false,
        ..LlamaConfig::tiny()
    }
}

/// NF4's bytes for a weight of `n` values by bitsandbytes' layout, written out here rather than
/// asked of the quantizer: two 4-bit codes per byte, one 8-bit absmax code per block of 64, an
/// F32 scale per 256 absmax codes, and the F32 mean of the absmaxes.
fn nf4_bytes(n: usize) -> usize {
    let blocks = n.div_ceil(64);
    n.div_ceil(2) + blocks + 4 * blocks.div_ceil(256) + 4
}

/// LoRA over a dense base (F32 and BF16) and QLoRA (NF4, Q4_1, Q8_0): the estimator's probe is
/// the adapted, quantized one-block model, and the frozen base is counted exactly. Predicted
/// peaks within 5% of the Trainer's measured ones under recompute never and all; model state
/// (the frozen base's bytes included) exact; NF4's bytes equal bitsandbytes' layout.
#[test]
fn lora_and_qlora_peaks_are_predicted_within_five_percent() -> anyhow::Result<()> {
    use candle_fit::train::lora::{LoraConfig, LoraModel, ALL_LINEAR};
    use candle_fit::train::quant::BaseQuantization::{self, Nf4, Q4_1, Q8_0};
    let _serial = SERIAL.lock();
    let corpus = corpus()?;
    let (layers, b, t) = (4, 4, 64);
    let cases: [(DType, Recompute, Option<BaseQuantization>, &[&str]); 6] = [
        (DType::F32, Recompute::Never, None, &["q_proj", "v_proj"]),
        (DType::BF16, Recompute::All, None, &[ALL_LINEAR]),
        (DType::F32, Recompute::Never, Some(Nf4), &[ALL_LINEAR]),
        (DType::BF16, Recompute::All, Some(Nf4), &[ALL_LINEAR]),
        (DType::F32, Recompute::All, Some(Q4_1), &[ALL_LINEAR]),
        (DType::BF16, Recompute::Never, Some(Q8_0), &["q_proj", "v_proj"]),
    ];
    let mut worst = 0.0f64;
    for (dtype, recompute, quantize_base, targets) in cases {
        let lora = LoraConfig { rank: 8, quantize_base, ..LoraConfig::new(targets.iter().copied()) };
        let optimizer = OptimizerConfig::AdamW(AdamWConfig::default());
        let input = EstimateInput {
            model: ModelShape::Llama(lora_llama(layers)),
            dtype,
            micro_batch: b,
            seq_len: t,
            accumulation_steps: 1,
            optimizer,
            recompute,
            corpus_bytes: CORPUS_BYTES,
            validation_fraction: VALIDATION_FRACTION,
            eval_windows: EVAL_WINDOWS,
            runtime_bytes: default_runtime_bytes(),
            probe_micro_batch: None,
            lora: Some(lora.clone()),
        };
        let predicted = estimate_memory(&input)?;

        let mut base = Llama::new(&lora_llama(layers), dtype, &Device::Cpu, 0)?;
        if let Some(q) = quantize_base {
            base = base.quantize_base(q)?;
        }
        let quantized = base.quantized_weights();
        if quantize_base == Some(Nf4) {
            let layout: usize = quantized.iter().map(|q| nf4_bytes(q.dims().0 * q.dims().1)).sum();
            let held: usize = quantized.iter().map(|q| q.storage_bytes()).sum();
            assert_eq!(held, layout, "NF4 storage is bitsandbytes' layout");
        }
        let model = LoraModel::new(base, lora, 0)?;
        let frozen = model.resident_parameter_bytes() - model.adapter_parameters().size_in_bytes();
        drop(quantized);
        let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
        let trainer = TrainerConfig::builder()
            .micro_batch(b)
            .steps(2)
            .seq_len(t)
            .lr(1e-3)
            .warmup_steps(0)
            .eval_windows(EVAL_WINDOWS)
            .eval_interval(0)
            .recompute(recompute)
            .build()?;
        let measured = Trainer::new(trainer).fit(&model, &corpus, &mut updater)?.memory;
        let label = format!(
            "LLaMA L{layers} C128 T{t} B{b} {dtype:?} {recompute} {} {}",
            quantize_base.map_or("dense".to_string(), |q| q.to_string()),
            targets.join(",")
        );
        let error = predicted.peak as f64 / measured.peak as f64 - 1.0;
        println!(
            "{label:<58} predicted {:>10} measured {:>10} ({:+.2}%) | act {:>9} {:>9} | oth {:>9} {:>9} | frozen {}",
            predicted.peak,
            measured.peak,
            100.0 * error,
            predicted.activations,
            measured.activations,
            predicted.other,
            measured.other,
            predicted.frozen_bytes
        );
        if error.abs() > worst.abs() {
            worst = error;
        }
        assert_eq!(predicted.frozen_bytes, frozen, "{label}: the frozen base's bytes");
        assert_eq!(
            (predicted.parameters, predicted.gradients, predicted.master_weights, predicted.optimizer_state),
            (measured.parameters, measured.gradients, measured.master_weights, measured.optimizer_state),
            "{label}: model state is exact"
        );
        assert_eq!(predicted.parameter_count, model.adapter_parameters().num_elements(), "{label}");
        assert!(error.abs() <= TOLERANCE, "{label}: {predicted:?} vs {measured:?}");
    }
    println!("LoRA/QLoRA: worst error {:+.2}%", 100.0 * worst);
    Ok(())
}
