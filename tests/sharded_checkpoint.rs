//! Sharded checkpoints: one file per rank plus a manifest, written by every ZeRO stage on N
//! in-process ranks, resumed on another number of ranks (and another stage) to the same
//! trajectory as the uninterrupted run; torn or corrupted files and mismatched runs refused.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle::{DType, Device};
use candle_fit::shard::driver::{fit_in_process, resume_in_process, InProcessConfig, RankRun};
use candle_fit::shard::ZeroStage;
use candle_fit::train::checkpoint::{rank_file, Checkpoint, MANIFEST_FILE};
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LocalUpdater, OptimizerConfig, SgdConfig, Trainer, TrainerConfig,
};

const TIMEOUT: Duration = Duration::from_secs(120);

fn corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS[..100_000].to_vec(),
        0.1,
    )?)
}

/// 8,347 parameters: no N in 2..=4 divides it.
fn model_config() -> GptConfig {
    GptConfig { n_ctx: 16, n_embd: 17, n_layer: 1, n_head: 1, ..GptConfig::default() }
}

fn trainer(dir: Option<&Path>) -> anyhow::Result<Trainer> {
    let mut builder = TrainerConfig::builder()
        .micro_batch(6)
        .accumulation_steps(2)
        .steps(4)
        .seq_len(16)
        .lr(0.05)
        .warmup_steps(0)
        .max_grad_norm(Some(0.5))
        .eval_windows(2)
        .eval_interval(0);
    if let Some(dir) = dir {
        builder = builder.checkpoint(dir, 2, 2);
    }
    Ok(Trainer::new(builder.build()?))
}

fn run(
    stage: ZeroStage,
    world_size: usize,
    trainer: &Trainer,
    optimizer: &OptimizerConfig,
    resume: Option<&Path>,
) -> anyhow::Result<Vec<RankRun<Gpt>>> {
    let config =
        InProcessConfig { world_size: NonZeroUsize::new(world_size).expect("> 0"), stage, timeout: TIMEOUT };
    let make = |rank: usize| Gpt::new(model_config(), DType::F32, &Device::Cpu, 7 + 100 * rank as u64);
    Ok(match resume {
        Some(path) => resume_in_process(&config, trainer, &corpus()?, optimizer, path, make)?,
        None => fit_in_process(&config, trainer, &corpus()?, optimizer, make)?,
    })
}

fn max_relative_difference(a: &Gpt, b: &Gpt) -> anyhow::Result<(String, f64)> {
    let mut worst = (String::new(), 0.0);
    for (pa, pb) in a.parameters().iter().zip(b.parameters().iter()) {
        let (ta, tb) = (pa.tensor()?.to_dtype(DType::F32)?, pb.tensor()?.to_dtype(DType::F32)?);
        let scale = ta.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let diff = (&ta - &tb)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let rel = diff / scale.max(f64::MIN_POSITIVE);
        if rel > worst.1 {
            worst = (pa.name.clone(), rel);
        }
    }
    Ok(worst)
}

fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("candle-fit-sharded-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A run on 2 ranks writes, at step 2, one file per rank and a manifest; resuming it on 3 ranks
/// and on 1 rank, at the same stage and at another, ends (step 4) where the uninterrupted run
/// ends, within 1e-5 of each tensor's magnitude (F32; the ranks' sums round differently), with
/// the same losses (SGD with momentum; AdamW, on the same ranks, bit for bit); every stage
/// writes and reads.
#[test]
fn a_checkpoint_of_two_ranks_resumes_on_three_and_on_one() -> anyhow::Result<()> {
    let sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..SgdConfig::default() });
    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    // SGD: resumed on other world sizes and stages, within 1e-5. AdamW's normalisation turns
    // the rounding noise of analytically-zero gradients (the key bias) into full-size updates
    // (see tests/zero.rs), so with AdamW the resume is on the same ranks and stage, where it
    // must be bit-identical.
    let cases = [
        (&sgd, ZeroStage::Stage2, [(ZeroStage::Stage2, 3), (ZeroStage::Stage3, 1)], 1e-5),
        (&sgd, ZeroStage::Stage3, [(ZeroStage::Stage3, 3), (ZeroStage::Stage1, 1)], 1e-5),
        (&sgd, ZeroStage::Stage0, [(ZeroStage::Stage1, 3), (ZeroStage::Stage0, 1)], 1e-5),
        (&adamw, ZeroStage::Stage1, [(ZeroStage::Stage1, 2), (ZeroStage::Stage1, 2)], 0.0),
        (&adamw, ZeroStage::Stage3, [(ZeroStage::Stage3, 2), (ZeroStage::Stage3, 2)], 0.0),
    ];
    for (optimizer, stage, resumes, tolerance) in cases {
        let dir = scratch(&format!("resume-{}-{}", stage as u8, tolerance > 0.0))?;
        let uninterrupted = run(stage, 2, &trainer(Some(&dir))?, optimizer, None)?;
        let saved = dir.join("step-00000002");
        let ckpt = Checkpoint::open(&saved)?;
        assert_eq!(ckpt.manifest.world_size, 2);
        assert!(ckpt.manifest.sharded.is_some());
        for rank in 0..2 {
            assert!(saved.join(rank_file(rank)).is_file(), "one file per rank");
        }
        ckpt.verify()?;
        for (resume_stage, world_size) in resumes {
            let resumed = run(resume_stage, world_size, &trainer(None)?, optimizer, Some(&saved))?;
            for r in &resumed {
                assert_eq!(r.report.start_step, 2);
                let (name, rel) = max_relative_difference(&uninterrupted[0].model, &r.model)?;
                assert!(
                    rel <= tolerance,
                    "saved by {stage:?} on 2, resumed by {resume_stage:?} on {world_size}: `{name}` differs by {rel:e}"
                );
                let tail = &uninterrupted[0].report.history[2..];
                assert_eq!(r.report.history.len(), tail.len());
                for (a, b) in r.report.history.iter().zip(tail) {
                    assert!((a.loss - b.loss).abs() <= tolerance * b.loss, "{a:?} vs {b:?}");
                }
            }
        }
        // Training moved the parameters after step 2 (so the comparison above needs the
        // restored state, not the initial one).
        let initial = Gpt::new(model_config(), DType::F32, &Device::Cpu, 7)?;
        assert!(max_relative_difference(&initial, &uninterrupted[0].model)?.1 > 1e-2);
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// A torn or corrupted rank file, a checkpoint of another model, and a sharded checkpoint
/// handed to a single-device run are refused with errors naming the problem, before training;
/// a checkpoint that cannot be written fails every rank at once.
#[test]
fn damaged_or_foreign_sharded_checkpoints_are_refused() -> anyhow::Result<()> {
    let sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..SgdConfig::default() });
    let dir = scratch("damaged")?;
    run(ZeroStage::Stage2, 2, &trainer(Some(&dir))?, &sgd, None)?;
    let saved = dir.join("step-00000004");
    assert!(saved.join(MANIFEST_FILE).is_file());

    // Corrupted: one byte of rank 1's file flipped.
    let file = saved.join(rank_file(1));
    let original = std::fs::read(&file)?;
    let mut bytes = original.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&file, &bytes)?;
    let err = run(ZeroStage::Stage2, 3, &trainer(None)?, &sgd, Some(&saved)).expect_err("corrupted");
    assert!(err.to_string().contains("SHA-256") && err.to_string().contains("rank-00001"), "{err}");
    // Torn: truncated.
    std::fs::write(&file, &original[..original.len() / 2])?;
    let err = run(ZeroStage::Stage3, 1, &trainer(None)?, &sgd, Some(&saved)).expect_err("torn");
    assert!(err.to_string().contains("truncated"), "{err}");
    std::fs::write(&file, &original)?;

    // Another model.
    let config = InProcessConfig {
        world_size: NonZeroUsize::new(2).expect("> 0"),
        stage: ZeroStage::Stage1,
        timeout: TIMEOUT,
    };
    let other = GptConfig { n_embd: 18, n_head: 2, ..model_config() };
    let err = resume_in_process(&config, &trainer(None)?, &corpus()?, &sgd, &saved, |_| {
        Gpt::new(other, DType::F32, &Device::Cpu, 0)
    })
    .expect_err("another model");
    assert!(err.to_string().contains("another model"), "{err}");

    // A single-device run cannot continue a sharded checkpoint.
    let model = Gpt::new(model_config(), DType::F32, &Device::Cpu, 0)?;
    let mut updater = LocalUpdater::from_config(model.parameters(), &sgd)?;
    let err = trainer(None)?.resume(&model, &corpus()?, &mut updater, &saved).expect_err("single device");
    assert!(err.to_string().contains("sharded"), "{err}");

    // A run directory that cannot be created (a file is in the way) fails every rank with
    // rank 0's I/O error, promptly, and leaves nothing behind.
    let blocked = dir.join("blocked");
    std::fs::write(&blocked, b"not a directory")?;
    let started = std::time::Instant::now();
    let err = run(ZeroStage::Stage3, 3, &trainer(Some(&blocked))?, &sgd, None).expect_err("unwritable");
    assert!(started.elapsed() < Duration::from_secs(60), "no rank waited for the timeout");
    assert!(err.to_string().contains("blocked"), "{err}");

    // An edited manifest (the optimizer's step count, as text, its checksum left as it was) is
    // refused by its checksum; sealed again with a step count that the progress contradicts, by
    // the consistency checks.
    let manifest = saved.join(MANIFEST_FILE);
    let original = std::fs::read(&manifest)?;
    let text = String::from_utf8(original.clone())?;
    let edited = text.replacen("\"optimizer_step\": 4", "\"optimizer_step\": 3", 1);
    assert_ne!(edited, text);
    std::fs::write(&manifest, &edited)?;
    let err = run(ZeroStage::Stage2, 2, &trainer(None)?, &sgd, Some(&saved)).expect_err("edited");
    assert!(err.to_string().contains("does not match its contents"), "{err}");
    let (_, body) = candle_fit::train::checkpoint::unseal_manifest(edited.as_bytes())
        .ok_or_else(|| anyhow::anyhow!("unsealed"))?;
    let resealed =
        candle_fit::train::checkpoint::seal_manifest(&body).ok_or_else(|| anyhow::anyhow!("empty"))?;
    std::fs::write(&manifest, resealed)?;
    let err = run(ZeroStage::Stage2, 2, &trainer(None)?, &sgd, Some(&saved)).expect_err("inconsistent");
    assert!(err.to_string().contains("disagrees with the progress"), "{err}");
    std::fs::write(&manifest, &original)?;

    // Intact again: it resumes.
    run(ZeroStage::Stage2, 3, &trainer(None)?, &sgd, Some(&dir))?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
