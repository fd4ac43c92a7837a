//! Training-state checkpoints: exact restore (BF16 with master weights and loss scaling), keep
//! the newest K, hostile checkpoints refused with a clear error and nothing changed, and the
//! non-finite guard keeping the last good checkpoint.

use std::path::{Path, PathBuf};

use candle::{DType, Device};
use candle_fit::ckpt::SegmentGradients;
use candle_fit::train::checkpoint::{
    self, list_checkpoints, seal_manifest, sha256_hex, unseal_manifest, RunLock, LOCK_FILE, MANIFEST_FILE,
    MODEL_FILE, OPTIMIZER_FILE,
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
            let values = p.tensor()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
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
        checkpoint: Some(candle_fit::train::CheckpointConfig {
            dir: part_dir.clone(),
            every: 2,
            keep: 2,
            overwrite: false,
        }),
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
    assert!(names.iter().all(|n| n.starts_with("step-") || n == LOCK_FILE), "{names:?}");
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

/// Edits the manifest as a careless user would: the JSON changes, its checksum does not.
fn edit_manifest_only(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path)?;
    let (sum, body) = unseal_manifest(&bytes).ok_or_else(|| anyhow::anyhow!("manifest not sealed"))?;
    let mut value: serde_json::Value = serde_json::from_slice(&body)?;
    edit(&mut value);
    let body = serde_json::to_string_pretty(&value)?;
    let rest = body.strip_prefix('{').unwrap_or(&body);
    std::fs::write(&path, format!("{{\"manifest_sha256\": \"{sum}\",{rest}"))?;
    Ok(())
}

/// Edits the manifest as a determined user would: the JSON changes and its checksum is
/// recomputed, so only the cross-checks behind the checksum can refuse it.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path)?;
    let body = unseal_manifest(&bytes).map_or(bytes, |(_, body)| body);
    let mut value: serde_json::Value = serde_json::from_slice(&body)?;
    edit(&mut value);
    let sealed =
        seal_manifest(&serde_json::to_vec_pretty(&value)?).ok_or_else(|| anyhow::anyhow!("empty"))?;
    std::fs::write(&path, sealed)?;
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
            "a step far in the future, checksum not updated",
            Box::new(|d| edit_manifest_only(d, |m| m["progress"]["step"] = 1000.into())),
            "does not match its contents",
        ),
        (
            "two same-shape parameters swapped, checksum not updated",
            Box::new(|d| {
                edit_manifest_only(d, |m| {
                    m["parameters"].as_array_mut().into_iter().for_each(|a| a.swap(2, 3))
                })
            }),
            "does not match its contents",
        ),
        (
            "a step far in the future, checksum updated",
            Box::new(|d| edit_manifest(d, |m| m["progress"]["step"] = 1000.into())),
            "past this run's 4 steps",
        ),
        (
            "an optimizer file of another step, checksums updated",
            Box::new(|d| {
                // The optimizer state after one step instead of two: retrained from scratch.
                let other = scratch(&format!("other-step-{}", d.display().to_string().len()));
                let m = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 1)?;
                let mut u = LocalUpdater::from_config(m.parameters(), &adamw())?;
                trainer(&other, 1, 0, false)?.fit(&m, &crate::corpus()?, &mut u)?;
                let bytes = std::fs::read(other.join("step-00000001").join(OPTIMIZER_FILE))?;
                std::fs::write(d.join(OPTIMIZER_FILE), &bytes)?;
                let _ = std::fs::remove_dir_all(&other);
                edit_manifest(d, |m| {
                    for f in m["files"].as_array_mut().into_iter().flatten() {
                        if f["name"] == OPTIMIZER_FILE {
                            f["bytes"] = bytes.len().into();
                            f["sha256"] = sha256_hex(&bytes).into();
                        }
                    }
                })
            }),
            "the manifest says 2",
        ),
        (
            "a manifest without its checksum (format 1)",
            Box::new(|d| {
                let bytes = std::fs::read(d.join(MANIFEST_FILE))?;
                let (_, body) = unseal_manifest(&bytes).ok_or_else(|| anyhow::anyhow!("not sealed"))?;
                Ok(std::fs::write(d.join(MANIFEST_FILE), body)?)
            }),
            "does not start with its checksum",
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
    // Settings that keep every shape but change the trajectory.
    let heads = refused(GptConfig { n_head: 4, ..model_config(32) }, DType::F32, 0, adamw())?;
    assert!(heads.contains("model settings") && heads.contains("\"n_head\":2"), "{heads}");
    let dropout = refused(GptConfig { dropout: 0.2, ..model_config(32) }, DType::F32, 0, adamw())?;
    assert!(dropout.contains("model settings"), "{dropout}");
    let decay =
        OptimizerConfig::AdamW(candle_fit::train::AdamWConfig { weight_decay: 0.5, ..Default::default() });
    let wd = refused(model_config(32), DType::F32, 0, decay)?;
    assert!(wd.contains("optimizer settings") && wd.contains("weight_decay"), "{wd}");
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

#[test]
fn values_are_matched_to_parameters_by_name_not_by_position() -> anyhow::Result<()> {
    let corpus = corpus()?;
    let dir = scratch("byname");
    let model = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 1)?;
    let mut updater = LocalUpdater::from_config(model.parameters(), &adamw())?;
    trainer(&dir, 2, 0, false)?.fit(&model, &corpus, &mut updater)?;
    let ckpt = dir.join("step-00000002");
    // The list reordered (two same-shape norms, and two of different shapes), checksum updated:
    // the values still go to the parameters of their names.
    edit_manifest(&ckpt, |m| {
        if let Some(list) = m["parameters"].as_array_mut() {
            list.swap(2, 3);
            list.swap(0, 1);
        }
    })?;
    let restored = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 9)?;
    let mut restored_updater = LocalUpdater::from_config(restored.parameters(), &adamw())?;
    checkpoint::Checkpoint::open(&ckpt)?.restore(restored.parameters(), &mut restored_updater)?;
    assert_eq!(snapshot(&restored)?, snapshot(&model)?, "a value went to another parameter");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_run_directory_is_owned_by_one_run_and_never_silently_taken_over() -> anyhow::Result<()> {
    let corpus = corpus()?;
    let dir = scratch("owner");
    let model = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 1)?;
    let mut updater = LocalUpdater::from_config(model.parameters(), &adamw())?;
    trainer(&dir, 2, 0, false)?.fit(&model, &corpus, &mut updater)?;
    assert_eq!(list_checkpoints(&dir)?.len(), 1);

    // A new run (other settings) on the same directory is refused and touches nothing.
    let before = files(&dir.join("step-00000002"))?;
    let other = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 2)?;
    let mut other_updater = LocalUpdater::from_config(other.parameters(), &adamw())?;
    let initial = snapshot(&other)?;
    let err = trainer(&dir, 2, 5, false)?.fit(&other, &corpus, &mut other_updater).err();
    let err = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("checkpoints of another run") && err.contains("--overwrite"), "{err}");
    assert_eq!(snapshot(&other)?, initial, "the refused run trained");
    assert_eq!(files(&dir.join("step-00000002"))?, before);

    // While a run holds the directory, a second one is refused at the start, naming the owner.
    let held = RunLock::acquire(&dir)?;
    let err = Trainer::new(TrainerConfig {
        checkpoint: Some(candle_fit::train::CheckpointConfig {
            dir: dir.clone(),
            every: 2,
            keep: 1,
            overwrite: true,
        }),
        ..trainer(&dir, 2, 5, false)?.config().clone()
    })
    .fit(&other, &corpus, &mut other_updater)
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        err.contains("in use by another run") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert_eq!(snapshot(&other)?, initial);
    drop(held);

    // With `overwrite`, the other run's checkpoints are replaced by this run's.
    let report = Trainer::new(TrainerConfig {
        checkpoint: Some(candle_fit::train::CheckpointConfig {
            dir: dir.clone(),
            every: 1,
            keep: 1,
            overwrite: true,
        }),
        ..trainer(&dir, 1, 5, false)?.config().clone()
    })
    .fit(&other, &corpus, &mut other_updater)?;
    let steps: Vec<u64> = list_checkpoints(&dir)?.into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [1], "the other run's step 2 must be gone, this run's step 1 kept");
    // The report names a checkpoint that exists.
    assert!(report.last_checkpoint.is_some_and(|p| p.join(MANIFEST_FILE).is_file()));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn metrics_of_a_resumed_run_equal_the_uninterrupted_runs() -> anyhow::Result<()> {
    let corpus = corpus()?;
    let (full_dir, part_dir) = (scratch("metrics-full"), scratch("metrics-part"));
    std::fs::create_dir_all(&full_dir)?;
    std::fs::create_dir_all(&part_dir)?;
    let with_metrics = |dir: &Path, steps: usize| -> anyhow::Result<Trainer> {
        Ok(Trainer::new(TrainerConfig {
            metrics_path: Some(dir.join("metrics.jsonl")),
            ..trainer(dir, steps, 0, false)?.config().clone()
        }))
    };
    let full = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 1)?;
    let mut updater = LocalUpdater::from_config(full.parameters(), &adamw())?;
    with_metrics(&full_dir, 4)?.fit(&full, &corpus, &mut updater)?;

    // Steps 1-3 of the same run, then a crash: the metrics hold 3 records (step 3's after the
    // checkpoint at step 2) and a torn line.
    let part = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 1)?;
    let mut part_updater = LocalUpdater::from_config(part.parameters(), &adamw())?;
    with_metrics(&part_dir, 4)?.fit(&part, &corpus, &mut part_updater)?;
    let path = part_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)?;
    let first3: Vec<&str> = text.lines().take(3).collect();
    std::fs::write(&path, format!("{}\n{{\"step\": 4, \"lo", first3.join("\n")))?;
    let resumed = Gpt::new(model_config(32), DType::F32, &Device::Cpu, 3)?;
    let mut resumed_updater = LocalUpdater::from_config(resumed.parameters(), &adamw())?;
    let report = with_metrics(&part_dir, 4)?.resume(
        &resumed,
        &corpus,
        &mut resumed_updater,
        &part_dir.join("step-00000002"),
    )?;
    assert_eq!(report.start_step, 2);

    // Same steps, same values (times and memory aside).
    let records = |path: &Path| -> anyhow::Result<Vec<(u64, u64, u64)>> {
        std::fs::read_to_string(path)?
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)?;
                let bits = |k: &str| v[k].as_f64().map(f64::to_bits).unwrap_or_default();
                Ok((v["step"].as_u64().unwrap_or_default(), bits("loss"), bits("grad_norm")))
            })
            .collect()
    };
    let expected = records(&full_dir.join("metrics.jsonl"))?;
    assert_eq!(expected.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(records(&path)?, expected);
    let _ = std::fs::remove_dir_all(&full_dir);
    let _ = std::fs::remove_dir_all(&part_dir);
    Ok(())
}
