//! Train a small GPT through the library API: BF16 with FP32 master weights, every block
//! recomputed, 4 accumulated micro-batches, on the bundled novel; print memory and losses.
//!
//! `cargo run --release --example train_gpt`

use candle::Device;
use candle_fit::ckpt::Recompute;
use candle_fit::train::memory::{mib, CountingAllocator};
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LocalUpdater, OptimizerConfig, Precision, Trainer, TrainerConfig,
};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

fn main() -> anyhow::Result<()> {
    let corpus = Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS.to_vec(),
        0.1,
    )?;
    let precision = Precision::Bf16;
    let model = Gpt::new(GptConfig::default(), precision.dtype(), &Device::Cpu, 0)?;
    let mut updater =
        LocalUpdater::from_config(model.parameters(), &OptimizerConfig::AdamW(AdamWConfig::default()))?;
    let config = TrainerConfig::builder()
        .micro_batch(4)
        .accumulation_steps(4)
        .seq_len(128)
        .steps(40)
        .eval_windows(64)
        .recompute(Recompute::All)
        .loss_scaling(precision.default_loss_scaling())
        .progress(true)
        .build()?;
    let report = Trainer::new(config).fit(&model, &corpus, &mut updater)?;
    println!(
        "validation loss {:.4} -> {:.4}; peak {} ({} of activations); {:.0} tokens/s",
        report.initial_val_loss,
        report.final_val_loss,
        mib(report.memory.peak),
        mib(report.memory.activations),
        report.tokens_per_s
    );
    Ok(())
}
