//! Times saving and restoring a training-state checkpoint (weights, master weights, AdamW
//! state, manifest with SHA-256 of every file; each file synced, then the directory renamed)
//! and reports its size, for the default GPT and larger ones.
//!
//! ```text
//! cargo run --release --example checkpoint_bench [-- DIR]
//! ```
//!
//! DIR (default: the system temp directory) should be on the disk you train on. Times are the
//! median of 5; restores read files the save just wrote, so they come from the page cache.

use std::time::Instant;

use candle::{DType, Device};
use candle_fit::train::checkpoint::{self, Checkpoint, Progress, RunIdentity};
use candle_fit::train::trainer::median;
use candle_fit::train::{Gpt, GptConfig, LocalUpdater, LrSchedule, OptimizerConfig, Updater};

fn main() -> anyhow::Result<()> {
    let base = std::env::args().nth(1).map(Into::into).unwrap_or_else(std::env::temp_dir);
    let run_dir = base.join(format!("candle-fit-checkpoint-bench-{}", std::process::id()));
    println!("| model | parameters | precision | checkpoint size | save (median of 5) | restore (median of 5) | save throughput |");
    println!("|---|---:|---|---:|---:|---:|---:|");
    for (layers, width, dtype) in
        [(4, 128, DType::F32), (12, 512, DType::F32), (12, 768, DType::F32), (12, 768, DType::BF16)]
    {
        let config = GptConfig {
            n_ctx: 128,
            n_embd: width,
            n_layer: layers,
            n_head: width / 32,
            ..GptConfig::default()
        };
        let model = Gpt::new(config, dtype, &Device::Cpu, 0)?;
        let optimizer = OptimizerConfig::AdamW(Default::default());
        let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
        let run = RunIdentity {
            seed: 0,
            global_batch: 16,
            schedule: LrSchedule::Constant { lr: 1e-3 },
            max_grad_norm: Some(1.0),
            loss_scaling: None,
            optimizer: updater.optimizer().name().into(),
            optimizer_settings: String::new(),
            model: String::new(),
            backward: "segmented".into(),
            data: String::new(),
        };
        let (mut saves, mut loads) = (Vec::new(), Vec::new());
        let mut size = 0u64;
        for step in 1..=5u64 {
            let progress = Progress {
                step,
                optimizer_step: updater.optimizer().step_count(),
                skipped_steps: 0,
                consecutive_skips: 0,
                micro_batch: 16,
                accumulation_steps: 1,
                loss_scaler: None,
            };
            let started = Instant::now();
            let dir = checkpoint::save(&run_dir, 1, model.parameters(), &updater, progress, run.clone())?;
            saves.push(started.elapsed().as_secs_f64());
            size = std::fs::read_dir(&dir)?.map(|e| Ok(e?.metadata()?.len())).sum::<anyhow::Result<u64>>()?;
            let started = Instant::now();
            Checkpoint::open(&dir)?.restore(model.parameters(), &mut updater)?;
            loads.push(started.elapsed().as_secs_f64());
        }
        let (save, load) = (median(&saves), median(&loads));
        println!(
            "| GPT L{layers}-W{width} | {} | {} | {:.1} MiB | {:.3} s | {:.3} s | {:.0} MiB/s |",
            model.parameters().num_elements(),
            dtype.as_str(),
            size as f64 / (1 << 20) as f64,
            save,
            load,
            size as f64 / (1 << 20) as f64 / save
        );
        std::fs::remove_dir_all(&run_dir)?;
    }
    Ok(())
}
