//! Issue 16: the device-resident training step. On the CPU it runs through the tensor-op
//! optimizers (`LocalUpdater::on_device`), the same code a GPU runs without a fused kernel;
//! here it is compared with the host store's flat-slice kernels (bit-equal to torch) through
//! whole `Trainer::fit` runs: the two differ only by the tensor-op path's unfused roundings
//! (2 ulp of an operation's largest operand, see tests/tensor_optimizer.rs) and the order of
//! the global norm's sum, so after a few steps parameters agree to about 1e-6 relative.
//! A checkpointed device-resident run resumes bit-identically, and nothing crosses to a host
//! that the CPU already is.

use candle::{DType, Device};
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LocalUpdater, LossScalerConfig, OptimizerConfig, SgdConfig,
    TrainReport, Trainer, TrainerConfig, Transfers, Updater,
};

fn corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS[..100_000].to_vec(),
        0.1,
    )?)
}

fn small() -> GptConfig {
    GptConfig { n_ctx: 16, n_embd: 32, n_layer: 2, n_head: 2, ..GptConfig::default() }
}

fn trainer(steps: usize, loss_scaling: bool) -> anyhow::Result<Trainer> {
    Ok(Trainer::new(
        TrainerConfig::builder()
            .micro_batch(2)
            .accumulation_steps(2)
            .steps(steps)
            .seq_len(small().n_ctx)
            .lr(3e-3)
            .warmup_steps(1)
            .max_grad_norm(Some(0.5))
            .eval_windows(2)
            .eval_interval(0)
            .loss_scaling(loss_scaling.then(LossScalerConfig::default))
            .build()?,
    ))
}

fn train(
    dtype: DType,
    optimizer: OptimizerConfig,
    on_device: bool,
    loss_scaling: bool,
) -> anyhow::Result<(Gpt, TrainReport, Transfers)> {
    let model = Gpt::new(small(), dtype, &Device::Cpu, 5)?;
    let mut updater = if on_device {
        LocalUpdater::on_device(model.parameters(), &optimizer)?
    } else {
        LocalUpdater::from_config(model.parameters(), &optimizer)?
    };
    assert_eq!(updater.is_device_resident(), on_device);
    let report = trainer(4, loss_scaling)?.fit(&model, &corpus()?, &mut updater)?;
    Ok((model, report, updater.take_transfers()))
}

/// The largest difference between the two models' parameters relative to each parameter's
/// largest magnitude, with the parameter's name.
fn worst_difference(a: &Gpt, b: &Gpt) -> anyhow::Result<(String, f64)> {
    let mut worst = (String::new(), 0.0);
    for (pa, pb) in a.parameters().iter().zip(b.parameters().iter()) {
        let (ta, tb) = (pa.tensor()?.to_dtype(DType::F64)?, pb.tensor()?.to_dtype(DType::F64)?);
        let scale = ta.abs()?.max_all()?.to_scalar::<f64>()?;
        let diff = (&ta - &tb)?.abs()?.max_all()?.to_scalar::<f64>()?;
        if diff / scale > worst.1 {
            worst = (pa.name.clone(), diff / scale);
        }
    }
    Ok(worst)
}

#[test]
fn the_device_resident_step_trains_like_the_host_step() -> anyhow::Result<()> {
    let adamw = OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() });
    let sgd =
        OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.01, dampening: 0.0 });
    // (dtype, optimizer, loss scaling, tolerance on parameters relative to their scale). AdamW
    // divides by sqrt(v): where a gradient is tiny the update is sign-like and a last-bit
    // difference in the clipped gradient moves it by up to ~1e-5 of a bias's small scale.
    let cases = [
        (DType::F32, adamw, false, 1e-4),
        (DType::F32, sgd, false, 1e-5),
        // BF16: FP32 master weights on the device; a last-bit difference in a master can round
        // the BF16 copy the other way (2^-8 relative).
        (DType::BF16, adamw, true, 1e-2),
    ];
    for (dtype, optimizer, loss_scaling, tolerance) in cases {
        let (host, host_report, _) = train(dtype, optimizer, false, loss_scaling)?;
        let (device, device_report, transfers) = train(dtype, optimizer, true, loss_scaling)?;
        let label = format!("{dtype:?} {optimizer:?}");
        assert_eq!(transfers, Transfers::default(), "{label}: the CPU device moves nothing");
        assert_eq!(host_report.history.len(), 4, "{label}");
        assert_eq!(host_report.skipped_steps, device_report.skipped_steps, "{label}");
        for (h, d) in host_report.history.iter().zip(&device_report.history) {
            assert_eq!(d.transfers, Transfers::default(), "{label}: step {}", d.step);
            assert_eq!(h.stepped, d.stepped, "{label}: step {}", d.step);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(1e-3);
            assert!(close(h.loss, d.loss), "{label}: step {} losses {} and {}", d.step, h.loss, d.loss);
            assert!(
                close(h.grad_norm, d.grad_norm),
                "{label}: step {} norms {} {}",
                d.step,
                h.grad_norm,
                d.grad_norm
            );
        }
        let (name, worst) = worst_difference(&host, &device)?;
        println!("{label}: worst relative parameter difference {worst:e} ({name})");
        assert!(worst <= tolerance, "{label}: {name} differs by {worst:e} relative");
        // The runs moved the parameters: a step that did nothing would pass the comparison.
        let fresh = Gpt::new(small(), dtype, &Device::Cpu, 5)?;
        assert!(worst_difference(&fresh, &device)?.1 > 1e-3, "{label}: training changed nothing");
    }
    Ok(())
}

/// Every parameter's values as raw f32 bits.
fn snapshot(model: &Gpt) -> anyhow::Result<Vec<Vec<u32>>> {
    model
        .parameters()
        .iter()
        .map(|p| {
            let values = p.tensor()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(values.iter().map(|v| v.to_bits()).collect())
        })
        .collect()
}

#[test]
fn a_device_resident_run_checkpoints_in_the_host_format_and_resumes_bit_identically() -> anyhow::Result<()> {
    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    let dir = |name: &str| {
        let d = std::env::temp_dir().join(format!("candle-fit-device-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    };
    let (full_dir, part_dir) = (dir("full"), dir("part"));
    let with_checkpoints = |dir: &std::path::Path| -> anyhow::Result<Trainer> {
        let config = trainer(4, true)?.config().clone();
        Ok(Trainer::new(TrainerConfig {
            schedule: candle_fit::train::LrSchedule::Constant { lr: 3e-3 },
            checkpoint: Some(candle_fit::train::CheckpointConfig {
                dir: dir.to_path_buf(),
                every: 2,
                keep: 2,
                overwrite: false,
            }),
            ..config
        }))
    };
    let corpus = corpus()?;
    let full = Gpt::new(small(), DType::BF16, &Device::Cpu, 7)?;
    let mut updater = LocalUpdater::on_device(full.parameters(), &adamw)?;
    with_checkpoints(&full_dir)?.fit(&full, &corpus, &mut updater)?;
    let saved = updater.save_state()?;
    assert_eq!((saved.optimizer.kind.as_str(), saved.optimizer.step), ("adamw", 4));
    assert_eq!(saved.master_weights.len(), full.parameters().len(), "every BF16 parameter has a master");

    // A fresh model with other weights, resumed on the device from step 2, ends bit-equal.
    let resumed = Gpt::new(small(), DType::BF16, &Device::Cpu, 99)?;
    let mut updater2 = LocalUpdater::on_device(resumed.parameters(), &adamw)?;
    let report = with_checkpoints(&part_dir)?.resume(
        &resumed,
        &corpus,
        &mut updater2,
        &full_dir.join("step-00000002"),
    )?;
    assert_eq!(report.start_step, 2);
    assert_eq!(snapshot(&resumed)?, snapshot(&full)?, "parameters after resuming differ");
    assert_eq!(updater2.save_state()?, saved, "master weights or optimizer state differ");

    // The checkpoint is in the host format: a host updater resumes from it too.
    let host_model = Gpt::new(small(), DType::BF16, &Device::Cpu, 99)?;
    let mut host = LocalUpdater::from_config(host_model.parameters(), &adamw)?;
    let report = with_checkpoints(&dir("host"))?.resume(
        &host_model,
        &corpus,
        &mut host,
        &full_dir.join("step-00000004"),
    )?;
    assert_eq!(report.start_step, 4);
    assert_eq!(snapshot(&host_model)?, snapshot(&full)?);
    for d in [full_dir, part_dir, dir("host")] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}
