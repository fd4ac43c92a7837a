//! Gradient accumulation: k micro-batches of b equal one batch of k*b, and peak memory is that
//! of one micro-batch (counted exactly by the counting allocator this test binary installs).

use std::sync::Mutex;

use candle::{DType, Device};
use candle_fit::train::memory::CountingAllocator;
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LocalUpdater, OptimizerConfig, SgdConfig, TrainReport, Trainer,
    TrainerConfig,
};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// Memory is process-wide: tests of this binary run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS[..200_000].to_vec(),
        0.1,
    )?)
}

fn train(
    config: GptConfig,
    optimizer: OptimizerConfig,
    micro_batch: usize,
    accumulation_steps: usize,
    steps: usize,
) -> anyhow::Result<(Gpt, TrainReport)> {
    let model = Gpt::new(config, DType::F32, &Device::Cpu, 3)?;
    let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(micro_batch)
            .accumulation_steps(accumulation_steps)
            .steps(steps)
            .seq_len(config.n_ctx)
            .lr(1e-3)
            .warmup_steps(0)
            .eval_windows(2)
            .eval_interval(0)
            .build()?,
    );
    let report = trainer.fit(&model, &corpus()?, &mut updater)?;
    Ok((model, report))
}

fn max_relative_difference(a: &Gpt, b: &Gpt) -> anyhow::Result<(String, f64)> {
    let mut worst = (String::new(), 0.0);
    for (pa, pb) in a.parameters().iter().zip(b.parameters().iter()) {
        let scale = pa.tensor()?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let diff = (&pa.tensor()? - &pb.tensor()?)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let rel = diff / scale;
        if rel > worst.1 {
            worst = (pa.name.clone(), rel);
        }
    }
    Ok(worst)
}

fn small() -> GptConfig {
    GptConfig { n_ctx: 32, n_embd: 32, n_layer: 2, n_head: 2, ..GptConfig::default() }
}

/// The FP32 gradient one optimizer step accumulates, per parameter.
fn accumulated_gradient(
    micro_batch: usize,
    accumulation_steps: usize,
) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    let model = Gpt::new(small(), DType::F32, &Device::Cpu, 3)?;
    let mut updater =
        LocalUpdater::from_config(model.parameters(), &OptimizerConfig::Sgd(SgdConfig::default()))?;
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(micro_batch)
            .accumulation_steps(accumulation_steps)
            .seq_len(small().n_ctx)
            .build()?,
    );
    let corpus = corpus()?;
    let decisions = trainer.plan(&model, &corpus)?;
    trainer.accumulate_step(&model, &corpus, &mut updater, 5, &decisions, 1.0)?;
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

#[test]
fn accumulated_gradients_equal_the_large_batch_gradient() -> anyhow::Result<()> {
    let _serial = SERIAL.lock();
    let whole = accumulated_gradient(8, 1)?;
    for (micro_batch, accumulation_steps) in [(4, 2), (2, 4), (1, 8)] {
        let accumulated = accumulated_gradient(micro_batch, accumulation_steps)?;
        for ((name, a), (_, b)) in whole.iter().zip(&accumulated) {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-6 * scale,
                "{accumulation_steps} x {micro_batch}: gradient of `{name}` differs by {diff:e} (magnitude {scale:e})"
            );
        }
    }
    Ok(())
}

/// Parameters after three SGD steps. (With Adam, elements whose gradient is analytically zero,
/// such as the key bias, whose shift softmax ignores, hold pure rounding noise that Adam's
/// normalisation turns into updates of size lr, so the parameter-level check uses SGD; the
/// gradients themselves are checked above.)
#[test]
fn accumulated_micro_batches_give_the_parameters_of_one_large_batch() -> anyhow::Result<()> {
    let _serial = SERIAL.lock();
    let optimizer = OptimizerConfig::Sgd(SgdConfig::default());
    let (whole, _) = train(small(), optimizer, 8, 1, 3)?;
    for (micro_batch, accumulation_steps) in [(4, 2), (2, 4), (1, 8)] {
        let (accumulated, _) = train(small(), optimizer, micro_batch, accumulation_steps, 3)?;
        let (name, rel) = max_relative_difference(&whole, &accumulated)?;
        assert!(
            rel <= 1e-6,
            "{accumulation_steps} x {micro_batch}: `{name}` differs by {rel:e} of its magnitude"
        );
    }
    Ok(())
}

#[test]
fn peak_memory_with_eight_micro_batches_is_that_of_one() -> anyhow::Result<()> {
    let _serial = SERIAL.lock();
    let config = GptConfig { n_ctx: 64, n_embd: 64, n_layer: 2, n_head: 2, ..GptConfig::default() };
    let optimizer = OptimizerConfig::AdamW(AdamWConfig::default());
    let (_, one) = train(config, optimizer, 4, 1, 2)?;
    let (_, eight) = train(config, optimizer, 4, 8, 2)?;
    let (p1, p8) = (one.memory.peak as f64, eight.memory.peak as f64);
    assert!(p1 > 0.0, "the counting allocator is installed");
    assert!(
        (p8 / p1 - 1.0).abs() <= 0.05,
        "peak with 8 micro-batches {p8} vs 1 micro-batch {p1} ({:.3}x)",
        p8 / p1
    );
    // And it is not the peak of one batch of 32: activations grow with the batch.
    let (_, big) = train(config, optimizer, 32, 1, 2)?;
    assert!(big.memory.activations as f64 > 4.0 * one.memory.activations as f64);
    Ok(())
}
