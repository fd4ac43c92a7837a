//! ZeRO stages 0-3 on N in-process ranks (threads, CPU): per-rank model-state bytes against
//! REFERENCE.md's formulas, bytes communicated per step against theory, process heap peak and
//! tokens/s, printed as Markdown tables for BENCHMARKS.md.
//!
//! `cargo run --release --example zero_scaling [-- LAYERS WIDTH STEPS ACCUMULATION]` (defaults
//! 4 128 6 2)
//!
//! The process heap is counted by this example's own allocator over the whole run (the
//! Trainer's per-step peak reset is for the counting allocator of candle-train, which is not
//! installed here); all ranks share one process, so its peak is that of all N ranks together.

use std::alloc::{GlobalAlloc, Layout, System};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use candle::{DType, Device};
use candle_fit::ckpt::SegmentedModel;
use candle_fit::shard::comm::LocalGroup;
use candle_fit::shard::driver::{fit_in_process, InProcessConfig};
use candle_fit::shard::stage3::ShardedModel;
use candle_fit::shard::zero::{segment_units, ZeroUpdater};
use candle_fit::shard::ZeroStage;
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, OptimizerConfig, Trainer, TrainerConfig, Updater,
};

struct ProcessPeak;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's layout; the counters
// are plain atomics and allocate nothing.
unsafe impl GlobalAlloc for ProcessPeak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout, which upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: ProcessPeak = ProcessPeak;

const STAGES: [ZeroStage; 4] = [ZeroStage::Stage0, ZeroStage::Stage1, ZeroStage::Stage2, ZeroStage::Stage3];

fn mib(bytes: f64) -> String {
    format!("{:.2}", bytes / (1024.0 * 1024.0))
}

/// REFERENCE.md's per-rank model-state bytes for FP32 Adam (16 P in all), per stage.
fn formula(stage: ZeroStage, p: f64, n: f64) -> f64 {
    match stage {
        ZeroStage::Stage0 => 16.0 * p,
        ZeroStage::Stage1 => 8.0 * p + 8.0 * p / n,
        ZeroStage::Stage2 => 4.0 * p + 12.0 * p / n,
        _ => 16.0 * p / n,
    }
}

/// Stage 3 on `world_size` ranks (threads; sharding communicates): rank 0's state bytes and
/// the most parameter bytes it holds gathered while each segment's parameters are gathered.
fn stage3_state(
    config: GptConfig,
    world_size: usize,
    optimizer: &OptimizerConfig,
) -> anyhow::Result<(candle_fit::train::updater::StateBytes, usize)> {
    let comms = LocalGroup::ranks(world_size, Duration::from_secs(60));
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                scope.spawn(move || -> anyhow::Result<(candle_fit::train::updater::StateBytes, usize)> {
                    let model = Gpt::new(config, DType::F32, &Device::Cpu, 0)?;
                    let segments = model.num_segments();
                    let (sharded, updater) = ShardedModel::new(model, optimizer, Box::new(comm))?;
                    let mut most = 0;
                    for segment in 0..segments {
                        sharded.gather_segment(segment)?;
                        most = most.max(sharded.gathered_bytes());
                    }
                    Ok((updater.state_bytes(), most))
                })
            })
            .collect();
        let mut first = None;
        for h in handles {
            let out = h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??;
            first.get_or_insert(out);
        }
        first.ok_or_else(|| anyhow::anyhow!("no rank"))
    })
}

fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| -> anyhow::Result<usize> {
        std::env::args().nth(i).map_or(Ok(default), |s| Ok(s.parse()?))
    };
    let (layers, width, steps, accumulation_steps) = (arg(1, 4)?, arg(2, 128)?, arg(3, 6)?, arg(4, 2)?);
    let config =
        GptConfig { n_ctx: 64, n_embd: width, n_layer: layers, n_head: width / 32, ..GptConfig::default() };
    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    let model = Gpt::new(config, DType::F32, &Device::Cpu, 0)?;
    let p = model.parameters().num_elements() as f64;
    let param_bytes = model.parameters().size_in_bytes() as f64;
    println!("GPT {layers} layers, width {width}, {p} parameters, FP32, AdamW\n");

    println!("### Per-rank model-state bytes (rank 0; parameters + updater state), MiB\n");
    println!(
        "| stage | N | parameters (resident) | gradients | FP32 slice (stage 3) | optimizer state | total | REFERENCE formula | ratio | stage 3: most gathered at once |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for stage in STAGES {
        for world_size in [1usize, 2, 4, 8] {
            let (s, resident, gathered) = if stage == ZeroStage::Stage3 {
                let (s, gathered) = stage3_state(config, world_size, &adamw)?;
                (s, 0.0, mib(gathered as f64))
            } else {
                let comm = LocalGroup::ranks(world_size, Duration::from_secs(60)).swap_remove(0);
                let units = match stage {
                    ZeroStage::Stage2 => segment_units(&model, model.parameters()),
                    _ => Vec::new(),
                };
                let updater =
                    ZeroUpdater::with_units(stage, model.parameters(), &units, &adamw, Box::new(comm))?;
                (updater.state_bytes(), param_bytes, "-".to_string())
            };
            let total = resident + (s.gradients + s.master_weights + s.optimizer_state) as f64;
            let expected = formula(stage, p, world_size as f64);
            println!(
                "| {} | {world_size} | {} | {} | {} | {} | {} | {} | {:.4} | {gathered} |",
                stage as u8,
                mib(resident),
                mib(s.gradients as f64),
                mib(s.master_weights as f64),
                mib(s.optimizer_state as f64),
                mib(total),
                mib(expected),
                total / expected
            );
        }
    }

    let corpus = Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS.to_vec(),
        0.1,
    )?;
    let micro_batch = 16;
    if steps < 3 {
        anyhow::bail!("STEPS must be at least 3 (bytes per step come from the last STEPS - 2 steps)");
    }
    let trainer_for = |steps: usize| -> anyhow::Result<Trainer> {
        Ok(Trainer::new(
            TrainerConfig::builder()
                .micro_batch(micro_batch)
                .accumulation_steps(accumulation_steps)
                .steps(steps)
                .seq_len(64)
                .lr(1e-3)
                .warmup_steps(0)
                .eval_windows(4)
                .eval_interval(0)
                .build()?,
        ))
    };
    let trainer = trainer_for(steps)?;
    // The same run cut to 2 steps: the difference is steps 3.. alone, without the evaluations
    // (stage 3 gathers for them) and the final gather of the model.
    let short = trainer_for(2)?;
    println!(
        "\n### Training: global batch {micro_batch} x {accumulation_steps} x 64 tokens, {steps} steps, ranks as threads on this machine\n"
    );
    // One discarded run first: the allocator's first use of the sizes would otherwise be
    // charged to the first row.
    fit_in_process(
        &InProcessConfig {
            world_size: NonZeroUsize::new(1).expect("> 0"),
            stage: ZeroStage::Stage0,
            timeout: Duration::from_secs(600),
        },
        &trainer,
        &corpus,
        &adamw,
        |_| Gpt::new(config, DType::F32, &Device::Cpu, 0),
    )?;
    println!("| stage | N | sent per rank per step (MiB) | in units of P (FP32) | theory (units of P) | process heap peak (MiB, all ranks) | median step (ms) | tokens/s | final val loss |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for stage in STAGES {
        for world_size in [1usize, 2, 4] {
            let before = CURRENT.load(Ordering::Relaxed);
            PEAK.store(before, Ordering::Relaxed);
            let in_process = InProcessConfig {
                world_size: NonZeroUsize::new(world_size).expect("> 0"),
                stage,
                timeout: Duration::from_secs(600),
            };
            let make = |_| Gpt::new(config, DType::F32, &Device::Cpu, 0);
            let runs = fit_in_process(&in_process, &trainer, &corpus, &adamw, make)?;
            let peak = PEAK.load(Ordering::Relaxed) - before;
            let run = &runs[0];
            let short_runs = fit_in_process(&in_process, &short, &corpus, &adamw, make)?;
            let c = run.comm.since(&short_runs[0].comm);
            let sent = c.sent_bytes() as f64 / (steps - 2) as f64;
            let n = world_size as f64;
            // Ring theory per step in FP32 units of P: 2 (N-1)/N for stages 0-1 (all-reduce, or
            // reduce-scatter + all-gather); stage 2 reduce-scatters every micro-batch and
            // all-gathers once: (k + 1) (N-1)/N; stage 3 gathers twice and reduce-scatters once
            // per micro-batch: 3k (N-1)/N.
            let k = accumulation_steps as f64;
            let theory = match stage {
                ZeroStage::Stage2 => (k + 1.0) * (n - 1.0) / n,
                ZeroStage::Stage3 => 3.0 * k * (n - 1.0) / n,
                _ => 2.0 * (n - 1.0) / n,
            };
            println!(
                "| {} | {world_size} | {} | {:.4} | {theory:.4} | {} | {:.0} | {:.0} | {:.4} |",
                stage as u8,
                mib(sent),
                sent / (4.0 * p),
                mib(peak as f64),
                run.report.median_step_time_s * 1e3,
                run.report.tokens_per_s,
                run.report.final_val_loss
            );
        }
    }
    Ok(())
}
