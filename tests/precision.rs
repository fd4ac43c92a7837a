//! Mixed precision: BF16 and FP16 (with dynamic loss scaling) follow the FP32 loss curve of the
//! default GPT; an overflowing FP16 step never reaches the weights, the optimizer or the
//! schedule.

use candle::{DType, Device};
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LocalUpdater, LossScalerConfig, OptimizerConfig, Precision,
    TrainReport, Trainer, TrainerConfig, Updater,
};

fn corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS.to_vec(),
        0.1,
    )?)
}

fn train(precision: Precision, steps: usize, seed: u64) -> anyhow::Result<TrainReport> {
    let model = Gpt::new(GptConfig::default(), precision.dtype(), &Device::Cpu, seed)?;
    let optimizer = OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.1, ..Default::default() });
    let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(8)
            .seq_len(64)
            .steps(steps)
            .warmup_steps(30)
            .eval_interval(0)
            .eval_windows(64)
            .loss_scaling(precision.default_loss_scaling())
            .build()?,
    );
    Ok(trainer.fit(&model, &corpus()?, &mut updater)?)
}

/// The final validation loss of BF16 and FP16 runs against FP32's from the same
/// initialisation, over two seeds: within 2% on average and 3% for each. One seed alone is too
/// noisy a measure: the FP32 runs' final losses themselves spread 2.6% over seeds 0-3, and BF16's
/// distance from FP32 moved between 0.0% and 2.2% over those seeds, with the BF16 products
/// computed either way (the AVX-512 BF16 kernel or F32 `gemm`; 2026-12-07).
#[test]
fn bf16_and_f16_follow_the_f32_loss_curve_within_two_percent() -> anyhow::Result<()> {
    let steps = 300;
    let seeds = [0, 1];
    let mut f32_runs = Vec::new();
    for seed in seeds {
        let f32 = train(Precision::F32, steps, seed)?;
        assert!(f32.final_val_loss < 0.85 * f32.initial_val_loss, "the run must learn: {f32:?}");
        f32_runs.push(f32);
    }
    for precision in [Precision::Bf16, Precision::F16] {
        let mut total = 0.0;
        for (seed, f32) in seeds.into_iter().zip(&f32_runs) {
            let half = train(precision, steps, seed)?;
            let rel = (half.final_val_loss - f32.final_val_loss).abs() / f32.final_val_loss;
            println!(
                "{precision} seed {seed}: final validation loss {:.4} vs f32 {:.4} ({:.2}%), {} skipped steps",
                half.final_val_loss,
                f32.final_val_loss,
                100.0 * rel,
                half.skipped_steps
            );
            assert!(
                rel <= 0.03,
                "{precision} seed {seed} ends at {} against f32's {}",
                half.final_val_loss,
                f32.final_val_loss
            );
            total += rel;
        }
        let mean = total / seeds.len() as f64;
        assert!(mean <= 0.02, "{precision}: {:.2}% from f32 on average", 100.0 * mean);
    }
    Ok(())
}

#[test]
fn an_overflowing_f16_step_leaves_weights_optimizer_and_schedule_untouched() -> anyhow::Result<()> {
    let config = GptConfig { n_ctx: 16, n_embd: 32, n_layer: 1, n_head: 2, ..GptConfig::default() };
    let model = Gpt::new(config, DType::F16, &Device::Cpu, 0)?;
    let before: Vec<Vec<f32>> = model
        .parameters()
        .iter()
        .map(|p| Ok(p.tensor()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
        .collect::<anyhow::Result<_>>()?;
    let mut updater =
        LocalUpdater::from_config(model.parameters(), &OptimizerConfig::AdamW(AdamWConfig::default()))?;
    // A scale of 2^30 makes every FP16 gradient overflow: each step is skipped and the scale
    // backs off by half.
    let scaling = LossScalerConfig { init_scale: (1u64 << 30) as f64, ..LossScalerConfig::default() };
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(2)
            .seq_len(16)
            .steps(2)
            .eval_windows(2)
            .loss_scaling(Some(scaling))
            .build()?,
    );
    let report = trainer.fit(&model, &corpus()?, &mut updater)?;
    assert_eq!(report.skipped_steps, 2);
    assert_eq!(
        report.history.iter().map(|r| r.loss_scale).collect::<Vec<_>>(),
        [Some(2f64.powi(30)), Some(2f64.powi(29))]
    );
    assert!(report.history.iter().all(|r| !r.stepped));
    assert_eq!(updater.optimizer().step_count(), 0, "Adam's step count did not advance");
    assert_eq!(report.history[0].lr, report.history[1].lr, "the schedule did not advance");
    for (p, old) in model.parameters().iter().zip(&before) {
        let now = p.tensor()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(&now, old, "{} changed", p.name);
    }
    Ok(())
}
