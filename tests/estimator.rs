//! scratch
use std::sync::Mutex;

use candle::{DType, Device};
use candle_fit::ckpt::Recompute;
use candle_fit::train::memory::CountingAllocator;
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LocalUpdater, MemoryReport, OptimizerConfig, Trainer, TrainerConfig,
};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;
static SERIAL: Mutex<()> = Mutex::new(());

fn measure(l: usize, c: usize, t: usize, b: usize, dtype: DType, rc: Recompute, k: usize, p: f32) -> anyhow::Result<MemoryReport> {
    let corpus = Corpus::from_bytes("austen".as_ref(), candle_fit::BUNDLED_CORPUS[..100_000].to_vec(), 0.1)?;
    let config = GptConfig { n_layer: l, n_embd: c, n_head: 4, dropout: p, ..GptConfig::default() };
    let model = Gpt::new(config, dtype, &Device::Cpu, 0)?;
    let sizes: Vec<usize> = model.parameters().iter().map(|p| p.var.elem_count()).collect();
    let mut updater = LocalUpdater::new(model.parameters(), OptimizerConfig::AdamW(AdamWConfig::default()).build(&sizes)?)?;
    let trainer = Trainer::new(TrainerConfig::builder().micro_batch(b).accumulation_steps(k).steps(2).seq_len(t).eval_windows(2).eval_interval(0).recompute(rc).build()?);
    let r = trainer.fit(&model, &corpus, &mut updater)?;
    for h in &r.history { eprintln!("  step {} peak {}", h.step, h.peak_bytes); }
    Ok(r.memory)
}

#[test]
fn scratch() -> anyhow::Result<()> {
    let _s = SERIAL.lock();
    for (l, c, t, b, dt, rc, k, p) in [
        (2, 64, 32, 4, DType::F32, Recompute::Never, 1, 0.0),
        (2, 64, 32, 4, DType::F32, Recompute::Never, 1, 0.0),
        (4, 128, 64, 16, DType::F32, Recompute::Never, 1, 0.0),
        (4, 128, 64, 16, DType::F32, Recompute::All, 1, 0.0),
        (4, 128, 64, 16, DType::BF16, Recompute::Never, 1, 0.0),
    ] {
        let m = measure(l, c, t, b, dt, rc, k, p)?;
        eprintln!("{l} {c} {t} {b} {dt:?} {rc} {k} {p}: {m:?}");
    }
    Ok(())
}
