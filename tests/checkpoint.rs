//! Training-state checkpoints: exact restore (BF16 with master weights and loss scaling), keep
//! the newest K, hostile checkpoints refused with a clear error and nothing changed, and the
//! non-finite guard keeping the last good checkpoint.

use std::path::{Path, PathBuf};

use candle::{DType, Device};
use candle_fit::ckpt::SegmentGradients;
use candle_fit::train::checkpoint::{
    self, list_checkpoints, sha256_hex, MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE,
};
use candle_fit::train::optim::Optimizer;
use candle_fit::train::updater::{StateBytes, UpdaterState};
use candle_fit::train::{
    Corpus, Error, Gpt, GptConfig, LocalUpdater, LossScalerConfig, LrSchedule, OptimizerConfig, SgdConfig,
    StepReport, Trainer, TrainerConfig, Updater,
};

fn corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS[..100_000].to_vec(),
        0.1,
    )?)
}

fn model_config(width: usize) -> GptConfig {
    GptConfig { n_ctx: 16, n_embd: width, n_layer: 1, n_head: 2, dropout: 0.1, ..GptConfig::default() }
}

fn trainer(dir: &Path, steps: usize, seed: u64, loss_scaling: bool) -> anyhow::Result<Trainer> {
    Ok(Trainer::new(
        TrainerConfig::builder()
            .micro_batch(2)
            .accumulation_steps(2)
            .steps(steps)
            .seq_len(16)
            // Independent of `steps`, so a longer run can continue a shorter one.
            .schedule(LrSchedule::Constant { lr: 3e-3 })
            .eval_windows(2)
            .eval_interval(0)
            .seed(seed)
            .loss_scaling(loss_scaling.then(LossScalerConfig::default))
            .max_consecutive_skips(3)
            .checkpoint(dir, 2, 2)
            .build()?,
    ))
}

fn adamw() -> OptimizerConfig {
    OptimizerConfig::AdamW(Default::default())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-fit-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every parameter's values, as raw f32 bits (exact comparison, NaN included).
fn snapshot(model: &Gpt) -> anyhow::Result<Vec<(String, Vec<u32>)>> {
    model
        .parameters()
        .iter()
        .map(|p| {
            let values = p.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok((p.name.clone(), values.iter().map(|v| v.to_bits()).collect()))
        })
        .collect()
}

#[test]
fn a_resumed_bf16_run_with_loss_scaling_equals_the_uninterrupted_run_bit_for_bit() -> anyhow::Result<()> {
    let corpus = corpus()?;
    let (full_dir, part_dir) = (scratch("full"), scratch("part"));
    let full = Gpt::new(model_config(32), DType::BF16, &Device::Cpu, 1)?;
    let mut updater = LocalUpdater::from_config(full.parameters(), &adamw())?;
    let report = trainer(&full_dir, 6, 0, true)?.fit(&full, &corpus, &mut updater)?;
    // Every 2 steps, keep 2: steps 4 and 6 remain.
    let steps: Vec<u64> = list_checkpoints(&full_dir)?.into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [4, 6]);
    assert_eq!(report.last_checkpoint, Some(full_dir.join("step-00000006")));

    // A stale temporary of an interrupted write is not a checkpoint, and the next save removes it.
    std::fs::create_dir_all(full_dir.join(".tmp-step-00000008-1"))?;
    assert_eq!(list_checkpoints(&full_dir)?.len(), 2);

    // A fresh model (other initial weights) resumed from step 4 ends equal to the full run.
    let resumed = Gpt::new(model_config(32), DType::BF16, &Device::Cpu, 99)?;
    let mut updater2 = LocalUpdater::from_config(resumed.parameters(), &adamw())?;
    let trainer2 = Trainer::new(TrainerConfig {
        checkpoint: Some(candle_fit::train::CheckpointConfig { dir: part_dir.clone(), every: 2, keep: 2 }),
        ..trainer(&full_dir, 6, 0, true)?.config().clone()
    });
    let report2 = trainer2.resume(&resumed, &corpus, &mut updater2, &full_dir.join("step-00000004"))?;
    assert_eq!(report2.start_step, 4);
    assert_eq!(report2.history.len(), 2);
    assert_eq!(snapshot(&resumed)?, snapshot(&full)?, "parameters after resuming differ");
    assert_eq!(updater2.save_state()?, updater.save_state()?, "master weights or optimizer state differ");
    let last =
        |r: &candle_fit::train::TrainReport| r.history.last().map(|h| (h.loss.to_bits(), h.loss_scale));
    assert_eq!(last(&report2), last(&report), "the last step's loss or loss scale differs");

    // Resuming into a run that continues in the same directory rewrites step 6 and removes the
    // stale temporary.
    let again = Gpt::new(model_config(32), DType::BF16, &Device::Cpu, 5)?;
    let mut updater3 = LocalUpdater::from_config(again.parameters(), &adamw())?;
    trainer(&full_dir, 6, 0, true)?.resume(
        &again,
        &corpus,
        &mut updater3,
        &full_dir.join("step-00000004"),
    )?;
    let names: Vec<String> = std::fs::read_dir(&full_dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
    assert_eq!(snapshot(&again)?, snapshot(&full)?);
    let _ = std::fs::remove_dir_all(&full_dir);
    let _ = std::fs::remove_dir_all(&part_dir);
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let mut value: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    edit(&mut value);
    std::fs::write(&path, serde_json::to_vec(&value)?)?;
    Ok(())
}

fn files(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out: Vec<(PathBuf, Vec<u8>)> =
        std::fs::read_dir(dir)?.map(|e| Ok((e?.path(), vec![]))).collect::<anyhow::Result<_>>()?;
    for (path, bytes) in &mut out {
        *bytes = std::fs::read(path)?;
    }
    out.sort();
    Ok(out)
}

#[test]
fn hostile_checkpoints_are_refused_by_name_and_change_nothing() -> anyhow::Result<()> {
    let corpus = corpus()?;
    let good_dir = scratch("good");
    let model = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 1)?;
    let mut updater = LocalUpdater::from_config(model.parameters(), &adamw())?;
    trainer(&good_dir, 2, 0, false)?.fit(&model, &corpus, &mut updater)?;
    let good = good_dir.join("step-00000002");

    type Mutation = Box<dyn Fn(&Path) -> anyhow::Result<()>>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "truncated weights",
            Box::new(|d| {
                let bytes = std::fs::read(d.join(MODEL_FILE))?;
                Ok(std::fs::write(d.join(MODEL_FILE), &bytes[..bytes.len() / 2])?)
            }),
            "truncated",
        ),
        (
            "a flipped byte in the optimizer state",
            Box::new(|d| {
                let mut bytes = std::fs::read(d.join(OPTIMIZER_FILE))?;
                let i = bytes.len() - 7;
                bytes[i] ^= 0x40;
                Ok(std::fs::write(d.join(OPTIMIZER_FILE), bytes)?)
            }),
            "corrupted",
        ),
        (
            "a garbled manifest",
            Box::new(|d| Ok(std::fs::write(d.join(MANIFEST_FILE), b"{\"format_vers")?)),
            "not valid JSON",
        ),
        (
            "no manifest",
            Box::new(|d| Ok(std::fs::remove_file(d.join(MANIFEST_FILE))?)),
            "holds no checkpoint",
        ),
        (
            "a missing optimizer file",
            Box::new(|d| Ok(std::fs::remove_file(d.join(OPTIMIZER_FILE))?)),
            "cannot read",
        ),
        (
            "a newer format",
            Box::new(|d| edit_manifest(d, |m| m["format_version"] = 99.into())),
            "format version 99",
        ),
        ("another world size", Box::new(|d| edit_manifest(d, |m| m["world_size"] = 2.into())), "2 ranks"),
        (
            "a torn split",
            Box::new(|d| edit_manifest(d, |m| m["progress"]["micro_batch"] = 3.into())),
            "is not the global batch",
        ),
        (
            "weights of another dtype, consistently checksummed",
            Box::new(|d| {
                let tensors = candle::safetensors::load(d.join(MODEL_FILE), &Device::Cpu)?;
                let f64s: Vec<(String, candle::Tensor)> = tensors
                    .into_iter()
                    .map(|(n, t)| Ok((n, t.to_dtype(DType::F64)?)))
                    .collect::<anyhow::Result<_>>()?;
                let bytes = safetensors::serialize(f64s, None)?;
                std::fs::write(d.join(MODEL_FILE), &bytes)?;
                edit_manifest(d, |m| {
                    for f in m["files"].as_array_mut().into_iter().flatten() {
                        if f["name"] == MODEL_FILE {
                            f["bytes"] = bytes.len().into();
                            f["sha256"] = sha256_hex(&bytes).into();
                        }
                    }
                })
            }),
            "found f64",
        ),
    ];
    for (i, (what, mutate, expected)) in cases.iter().enumerate() {
        let dir = scratch(&format!("bad{i}")).join("step-00000002");
        copy_dir(&good, &dir)?;
        mutate(&dir)?;
        let before = files(&dir)?;
        let fresh = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 7)?;
        let initial = snapshot(&fresh)?;
        let mut fresh_updater = LocalUpdater::from_config(fresh.parameters(), &adamw())?;
        let initial_state = fresh_updater.save_state()?;
        let err = trainer(&scratch("unused"), 4, 0, false)?
            .resume(&fresh, &corpus, &mut fresh_updater, &dir)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(expected), "{what}: expected an error containing {expected:?}, got {err:?}");
        assert_eq!(snapshot(&fresh)?, initial, "{what}: the model changed");
        assert_eq!(fresh_updater.save_state()?, initial_state, "{what}: the optimizer changed");
        assert_eq!(files(&dir)?, before, "{what}: the checkpoint was modified");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap_or(&dir));
    }

    // Another model, another precision, other run settings and another optimizer.
    let refused =
        |config: GptConfig, dtype: DType, seed: u64, optimizer: OptimizerConfig| -> anyhow::Result<String> {
            let m = Gpt::new(config, dtype, &Device::Cpu, 7)?;
            let mut u = LocalUpdater::from_config(m.parameters(), &optimizer)?;
            let initial = snapshot(&m)?;
            let err = trainer(&scratch("unused"), 4, seed, false)?.resume(&m, &corpus, &mut u, &good).err();
            assert_eq!(snapshot(&m)?, initial);
            Ok(err.map(|e| e.to_string()).unwrap_or_default())
        };
    assert!(refused(model_config(64), DType::F32, 0, adamw())?.contains("another model"));
    let bf16 = refused(model_config(32), DType::BF16, 0, adamw())?;
    assert!(bf16.contains("bf16") && bf16.contains("f32"), "{bf16}");
    assert!(refused(model_config(32), DType::F32, 1, adamw())?.contains("seed 0"));
    let sgd = OptimizerConfig::Sgd(SgdConfig::default());
    assert!(refused(model_config(32), DType::F32, 0, sgd)?.contains("optimizer adamw"));
    let _ = std::fs::remove_dir_all(&good_dir);
    let _ = std::fs::remove_dir_all(scratch("unused"));
    Ok(())
}

/// An updater whose gradients turn NaN from its `from`-th step on.
struct Poisoned {
    inner: LocalUpdater,
    steps: usize,
    from: usize,
}

impl Updater for Poisoned {
    fn accumulate(&mut self, gradients: &SegmentGradients) -> candle_fit::train::Result<()> {
        self.inner.accumulate(gradients)
    }

    fn step(&mut self, lr: f64, max_grad_norm: Option<f64>) -> candle_fit::train::Result<StepReport> {
        self.steps += 1;
        if self.steps >= self.from {
            self.inner.unscale(f32::NAN)?;
        }
        self.inner.step(lr, max_grad_norm)
    }

    fn unscale(&mut self, inv_scale: f32) -> candle_fit::train::Result<bool> {
        self.inner.unscale(inv_scale)
    }

    fn zero_grad(&mut self) {
        self.inner.zero_grad()
    }

    fn optimizer(&self) -> &dyn Optimizer {
        self.inner.optimizer()
    }

    fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        self.inner.optimizer_mut()
    }

    fn state_bytes(&self) -> StateBytes {
        self.inner.state_bytes()
    }

    fn save_state(&self) -> candle_fit::train::Result<UpdaterState> {
        self.inner.save_state()
    }

    fn load_state(&mut self, state: UpdaterState) -> candle_fit::train::Result<()> {
        self.inner.load_state(state)
    }
}

#[test]
fn non_finite_steps_are_skipped_and_too_many_stop_keeping_the_last_good_checkpoint() -> anyhow::Result<()> {
    let corpus = corpus()?;
    let dir = scratch("nan");
    let model = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 1)?;
    let inner = LocalUpdater::from_config(model.parameters(), &adamw())?;
    // Steps 1-4 are good (checkpoints at 2 and 4); from step 5 every gradient is NaN.
    let mut updater = Poisoned { inner, steps: 0, from: 5 };
    let result = trainer(&dir, 20, 0, false)?.fit(&model, &corpus, &mut updater);
    let last_good = dir.join("step-00000004");
    match result {
        Err(Error::TooManyNonFiniteSteps { count, step, last_checkpoint }) => {
            assert_eq!((count, step), (3, 7));
            assert_eq!(last_checkpoint.as_deref(), Some(last_good.as_path()));
        }
        other => panic!("expected TooManyNonFiniteSteps, got {other:?}"),
    }
    assert_eq!(updater.inner.optimizer().step_count(), 4, "skipped steps must not advance the optimizer");
    let steps: Vec<u64> = list_checkpoints(&dir)?.into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [2, 4], "no checkpoint after a skipped step");
    // The weights were never touched by the NaN steps: they equal the checkpoint's.
    let check = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 8)?;
    let mut check_updater = LocalUpdater::from_config(check.parameters(), &adamw())?;
    checkpoint::Checkpoint::open(&dir)?.restore(check.parameters(), &mut check_updater)?;
    assert_eq!(snapshot(&check)?, snapshot(&model)?);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
