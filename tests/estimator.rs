//! The memory estimator predicts a training step's measured peak heap bytes within 10% on a
//! grid of configurations spanning every axis (layers, width, sequence length, micro-batch,
//! dtype, recomputation, accumulation, optimizer, dropout). The measurement is the Trainer's
//! own, through the counting allocator this test binary installs.
//!
//! `cargo test --test estimator -- --nocapture` prints the table of predicted and measured
//! peaks.

use std::sync::Mutex;

use candle::{DType, Device};
use candle_fit::ckpt::{measure_segments, Recompute, RecomputePolicy, SegmentContext};
use candle_fit::train::estimate::{default_runtime_bytes, estimated_segment_infos, gpt_segment_infos};
use candle_fit::train::memory::{self, CountingAllocator};
use candle_fit::train::{
    estimate_memory, AdamWConfig, Corpus, EstimateInput, Gpt, GptConfig, LocalUpdater, MemoryEstimate,
    MemoryReport, OptimizerConfig, SgdConfig, Trainer, TrainerConfig,
};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// Memory is process-wide: tests of this binary run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const CORPUS_BYTES: usize = 100_000;
const VALIDATION_FRACTION: f64 = 0.1;
const EVAL_WINDOWS: usize = 2;

/// One configuration of the grid.
#[derive(Debug, Clone, Copy)]
struct Row {
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
    fn config(&self) -> GptConfig {
        GptConfig {
            n_layer: self.layers,
            n_embd: self.width,
            n_head: 4,
            n_ctx: 128,
            dropout: self.dropout,
            ..GptConfig::default()
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
            "L{} C{} T{} B{} {} {} k{} {} p{}",
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

fn measure(row: &Row) -> anyhow::Result<MemoryReport> {
    let model = Gpt::new(row.config(), row.dtype, &Device::Cpu, 0)?;
    let mut updater = LocalUpdater::from_config(model.parameters(), &row.optimizer())?;
    let report = trainer(row)?.fit(&model, &corpus()?, &mut updater)?;
    Ok(report.memory)
}

fn predict(row: &Row) -> anyhow::Result<MemoryEstimate> {
    let config = row.config();
    let input = EstimateInput {
        config,
        dtype: row.dtype,
        micro_batch: row.micro_batch,
        seq_len: row.seq_len,
        accumulation_steps: row.accumulation,
        optimizer: row.optimizer(),
        decisions: row.recompute.decide(&gpt_segment_infos(&config))?,
        corpus_bytes: CORPUS_BYTES,
        validation_fraction: VALIDATION_FRACTION,
        eval_windows: EVAL_WINDOWS,
        runtime_bytes: default_runtime_bytes(),
    };
    Ok(estimate_memory(&input)?)
}

#[allow(clippy::too_many_arguments)]
const fn row(
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
    Row { layers, width, seq_len, micro_batch, dtype, recompute, accumulation, sgd, dropout }
}

/// About 25 rows spanning every axis of the grid (not its cross product: CPU time).
fn grid() -> Vec<Row> {
    use DType::{BF16, F32};
    use Recompute::{All, Never, Sqrt};
    vec![
        row(2, 64, 32, 4, F32, Never, 1, false, 0.0),
        row(2, 64, 32, 4, BF16, Never, 1, false, 0.0),
        row(2, 64, 32, 4, BF16, All, 4, false, 0.1),
        row(2, 64, 128, 4, F32, All, 1, false, 0.1),
        row(2, 128, 64, 4, F32, Sqrt, 4, false, 0.0),
        row(2, 256, 32, 16, BF16, Never, 1, false, 0.1),
        row(2, 256, 128, 4, F32, Never, 1, true, 0.0),
        row(4, 64, 64, 16, BF16, All, 1, false, 0.0),
        row(4, 64, 128, 4, F32, Sqrt, 1, false, 0.1),
        row(4, 128, 32, 4, F32, Never, 4, false, 0.0),
        row(4, 128, 64, 16, F32, Never, 1, false, 0.0),
        row(4, 128, 64, 4, F32, All, 1, false, 0.0),
        row(4, 128, 32, 16, BF16, Sqrt, 1, false, 0.0),
        row(4, 128, 64, 4, BF16, Sqrt, 1, false, 0.1),
        row(4, 128, 128, 4, BF16, All, 1, false, 0.0),
        row(4, 256, 64, 4, F32, All, 1, false, 0.1),
        row(4, 256, 32, 4, BF16, Sqrt, 1, false, 0.0),
        row(8, 64, 32, 16, F32, Never, 1, false, 0.1),
        row(8, 64, 32, 4, BF16, Never, 4, false, 0.0),
        row(8, 64, 128, 4, F32, Sqrt, 1, false, 0.0),
        row(8, 128, 32, 4, F32, All, 1, false, 0.0),
        row(8, 64, 128, 4, BF16, All, 1, false, 0.1),
        row(8, 128, 64, 4, F32, Sqrt, 1, false, 0.1),
        row(8, 256, 32, 4, F32, Never, 1, false, 0.0),
        row(8, 256, 32, 4, BF16, Sqrt, 1, false, 0.0),
        row(8, 256, 32, 4, F32, All, 1, false, 0.0),
    ]
}

#[test]
fn predicted_peaks_are_within_ten_percent_of_the_measured_ones() -> anyhow::Result<()> {
    let _serial = SERIAL.lock();
    let rows = grid();
    let mut results = Vec::with_capacity(rows.len());
    for row in &rows {
        let predicted = predict(row)?;
        let measured = measure(row)?;
        results.push((row.label(), predicted, measured));
    }
    println!(
        "{:<40} {:>12} {:>12} {:>7} | {:>11} {:>11} | {:>9} {:>9}",
        "configuration", "predicted", "measured", "ratio", "pred act", "meas act", "pred oth", "meas oth"
    );
    let mut worst = (String::new(), 1.0f64);
    for (label, p, m) in &results {
        let ratio = p.peak as f64 / m.peak as f64;
        println!(
            "{label:<40} {:>12} {:>12} {ratio:>7.3} | {:>11} {:>11} | {:>9} {:>9}",
            p.peak, m.peak, p.activations, m.activations, p.other, m.other
        );
        if (ratio - 1.0).abs() > (worst.1 - 1.0).abs() {
            worst = (label.clone(), ratio);
        }
    }
    println!("worst ratio {:.4} ({})", worst.1, worst.0);
    for (label, p, m) in &results {
        let error = (p.peak as f64 - m.peak as f64).abs() / m.peak as f64;
        assert!(
            error <= 0.10,
            "{label}: predicted {} vs measured {} ({:+.1}%)",
            p.peak,
            m.peak,
            100.0 * error
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
fn estimated_segment_sizes_match_measured_ones_and_a_budget_decides_alike() -> anyhow::Result<()> {
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
        let estimated = estimated_segment_infos(&config, dtype, 8, 64)?;
        for (m, e) in measured.iter().zip(&estimated) {
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
