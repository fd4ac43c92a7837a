//! Regression benchmark: one training step (forward, backward, AdamW) of the default GPT on CPU,
//! in FP32 and BF16, without and with every block recomputed. For trends between commits; the
//! comparison against the FP32 baseline is the `bench` subcommand's job (BENCHMARKS.md).
//!
//! `cargo bench --bench step`

use candle::Device;
use candle_fit::ckpt::Recompute;
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LocalUpdater, OptimizerConfig, Precision, Trainer, TrainerConfig,
    Updater,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn step(c: &mut Criterion) {
    let corpus = Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS.to_vec(),
        0.1,
    )
    .expect("the bundled corpus is valid UTF-8 and long enough");
    let (micro_batch, seq_len) = (16, 128);
    let mut group = c.benchmark_group("cpu_default_gpt_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements((micro_batch * seq_len) as u64));
    for precision in [Precision::F32, Precision::Bf16] {
        for recompute in [Recompute::Never, Recompute::All] {
            let model = Gpt::new(GptConfig::default(), precision.dtype(), &Device::Cpu, 0)
                .expect("default GPT builds");
            let mut updater = LocalUpdater::from_config(
                model.parameters(),
                &OptimizerConfig::AdamW(AdamWConfig::default()),
            )
            .expect("default AdamW builds");
            let trainer = Trainer::new(
                TrainerConfig::builder()
                    .micro_batch(micro_batch)
                    .seq_len(seq_len)
                    .recompute(recompute)
                    .build()
                    .expect("valid trainer config"),
            );
            let decisions = trainer.plan(&model, &corpus).expect("plan");
            let mut n = 0;
            group.bench_function(format!("{precision}_recompute_{recompute}"), |b| {
                b.iter(|| {
                    trainer.accumulate_step(&model, &corpus, &mut updater, n, &decisions, 1.0).expect("step");
                    updater.step(1e-3, Some(1.0)).expect("optimizer step");
                    n += 1;
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
