//! Issue 16: ZeRO stages 0-3 with the gradient accumulators, master weights (stage 3: the
//! rank's parameter slices) and optimizer state as tensors on the parameters' device
//! (`ZeroUpdater::on_device`, `ShardedModel::on_device`; what a GPU gets by default) and tensor
//! collectives. On the CPU they run through the tensor-op optimizers and
//! the communicators' host implementations of the tensor collectives: N ranks end where the
//! host-resident ZeRO updater ends (the flat-slice kernels, bit-equal to torch) within the
//! tensor-op path's rounding, stage 1 and 2 are bit-equal to stage 0 on the device (elementwise
//! optimizers stepped piece by piece), the state is sharded by 1/N, and a sharded checkpoint
//! written on the device resumes bit-identically, on the device or on the host.

use std::time::Duration;

use candle::{DType, Device};
use candle_fit::shard::comm::{Communicator, LocalGroup};
use candle_fit::shard::stage3::ShardedModel;
use candle_fit::shard::zero::{segment_units, ZeroUpdater};
use candle_fit::shard::ZeroStage;
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LrSchedule, OptimizerConfig, SgdConfig, TrainReport, Trainer,
    TrainerConfig, Transfers, Updater,
};

fn corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS[..100_000].to_vec(),
        0.1,
    )?)
}

/// 8,347 parameters: no N in 2..=3 divides it, so every world size pads.
fn odd_model() -> GptConfig {
    GptConfig { n_ctx: 16, n_embd: 17, n_layer: 1, n_head: 1, ..GptConfig::default() }
}

fn trainer(steps: usize, checkpoint: Option<&std::path::Path>) -> anyhow::Result<Trainer> {
    let mut builder = TrainerConfig::builder()
        .micro_batch(6)
        .accumulation_steps(2)
        .steps(steps)
        .seq_len(16)
        .schedule(LrSchedule::Constant { lr: 1e-2 })
        .max_grad_norm(Some(0.5))
        .eval_windows(2)
        .eval_interval(0);
    if let Some(dir) = checkpoint {
        builder = builder.checkpoint(dir, 2, 2);
    }
    Ok(Trainer::new(builder.build()?))
}

struct Run {
    model: Gpt,
    report: TrainReport,
    state: candle_fit::train::updater::StateBytes,
    transfers: Transfers,
    /// Stage 3: the most parameter bytes gathered at once.
    peak_gathered: usize,
}

/// `world_size` in-process ranks of `stage`, the state on the device or on the host, rank r's
/// model initialised with seed 7 + 100 r (rank 0's parameters are broadcast).
fn ranks(
    stage: ZeroStage,
    world_size: usize,
    on_device: bool,
    dtype: DType,
    optimizer: &OptimizerConfig,
    trainer: &Trainer,
    resume: Option<&std::path::Path>,
) -> anyhow::Result<Vec<Run>> {
    let corpus = corpus()?;
    let comms = LocalGroup::ranks(world_size, Duration::from_secs(120));
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let corpus = &corpus;
                scope.spawn(move || -> anyhow::Result<Run> {
                    let model = Gpt::new(odd_model(), dtype, &Device::Cpu, 7 + 100 * rank as u64)?;
                    let trainer = trainer.clone().data_parallel(rank, world_size)?;
                    if stage == ZeroStage::Stage3 {
                        let comm: Box<dyn Communicator> = Box::new(comm);
                        let (sharded, mut updater) = if on_device {
                            ShardedModel::on_device(model, optimizer, comm)?
                        } else {
                            ShardedModel::new(model, optimizer, comm)?
                        };
                        assert_eq!(updater.is_device_resident(), on_device);
                        let report = match resume {
                            Some(path) => trainer.resume(&sharded, corpus, &mut updater, path)?,
                            None => trainer.fit(&sharded, corpus, &mut updater)?,
                        };
                        let peak_gathered = sharded.peak_gathered_bytes();
                        return Ok(Run {
                            model: sharded.into_inner()?,
                            report,
                            state: updater.state_bytes(),
                            transfers: updater.take_transfers(),
                            peak_gathered,
                        });
                    }
                    let units = match stage {
                        ZeroStage::Stage2 => segment_units(&model, model.parameters()),
                        _ => Vec::new(),
                    };
                    let comm: Box<dyn Communicator> = Box::new(comm);
                    let mut updater = if on_device {
                        ZeroUpdater::on_device(stage, model.parameters(), &units, optimizer, comm)?
                    } else {
                        ZeroUpdater::with_units(stage, model.parameters(), &units, optimizer, comm)?
                    };
                    assert_eq!(updater.is_device_resident(), on_device);
                    updater.broadcast_parameters()?;
                    let report = match resume {
                        Some(path) => trainer.resume(&model, corpus, &mut updater, path)?,
                        None => trainer.fit(&model, corpus, &mut updater)?,
                    };
                    Ok(Run {
                        model,
                        report,
                        state: updater.state_bytes(),
                        transfers: updater.take_transfers(),
                        peak_gathered: 0,
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?).collect()
    })
}

/// Every parameter's values as raw f32 bits.
fn snapshot(model: &Gpt) -> anyhow::Result<Vec<Vec<u32>>> {
    model
        .parameters()
        .iter()
        .map(|p| {
            let v = p.tensor()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn worst_difference(a: &Gpt, b: &Gpt) -> anyhow::Result<(String, f64)> {
    let mut worst = (String::new(), 0.0);
    for (pa, pb) in a.parameters().iter().zip(b.parameters().iter()) {
        let (ta, tb) = (pa.tensor()?.to_dtype(DType::F64)?, pb.tensor()?.to_dtype(DType::F64)?);
        let scale = ta.abs()?.max_all()?.to_scalar::<f64>()?.max(f64::MIN_POSITIVE);
        let diff = (&ta - &tb)?.abs()?.max_all()?.to_scalar::<f64>()?;
        if diff / scale > worst.1 {
            worst = (pa.name.clone(), diff / scale);
        }
    }
    Ok(worst)
}

#[test]
fn device_resident_stages_follow_the_host_updater_and_agree_with_each_other() -> anyhow::Result<()> {
    let adamw = OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() });
    let sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..SgdConfig::default() });
    let trainer = trainer(3, None)?;
    for (optimizer, tolerance) in [(sgd, 1e-5), (adamw, 1e-4)] {
        let host = ranks(ZeroStage::Stage1, 2, false, DType::F32, &optimizer, &trainer, None)?;
        let device0 = ranks(ZeroStage::Stage0, 2, true, DType::F32, &optimizer, &trainer, None)?;
        for stage in [ZeroStage::Stage1, ZeroStage::Stage2] {
            let device = ranks(stage, 2, true, DType::F32, &optimizer, &trainer, None)?;
            for (rank, run) in device.iter().enumerate() {
                assert_eq!(run.transfers, Transfers::default(), "the CPU device moves nothing");
                // Elementwise optimizers on shard pieces: stage 1 (one reduction per step, as
                // stage 0) gives the same bits as stepping whole; stage 2 reduces each
                // micro-batch's gradients separately and sums the reduced chunks, another order.
                if stage == ZeroStage::Stage1 {
                    assert!(
                        snapshot(&run.model)? == snapshot(&device0[rank].model)?,
                        "{stage:?} rank {rank} differs from stage 0 on the device: {:?}",
                        worst_difference(&run.model, &device0[rank].model)?
                    );
                } else {
                    let (name, worst) = worst_difference(&run.model, &device0[rank].model)?;
                    assert!(worst <= tolerance, "{stage:?} rank {rank}: `{name}` differs by {worst:e}");
                }
                let (name, worst) = worst_difference(&host[rank].model, &run.model)?;
                println!("{optimizer:?} {stage:?} rank {rank}: device vs host {worst:.2e} ({name})");
                assert!(worst <= tolerance, "{stage:?} rank {rank}: `{name}` differs by {worst:e}");
                // Sharded: half the optimizer state of stage 0 (to the padding of each unit).
                let whole = device0[rank].state.optimizer_state;
                assert!(run.state.optimizer_state * 100 <= whole * 51, "{:?} vs {whole}", run.state);
                let h = &host[rank].report.history;
                for (a, b) in h.iter().zip(&run.report.history) {
                    assert_eq!(a.stepped, b.stepped);
                    assert!((a.loss - b.loss).abs() <= 1e-4 * a.loss.abs(), "losses {} {}", a.loss, b.loss);
                }
            }
        }
        // Training moved the parameters.
        let fresh = Gpt::new(odd_model(), DType::F32, &Device::Cpu, 7)?;
        assert!(worst_difference(&fresh, &device0[0].model)?.1 > 1e-3);
    }
    Ok(())
}

#[test]
fn bf16_device_stages_keep_master_slices_and_follow_the_host_updater() -> anyhow::Result<()> {
    let sgd = OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, ..SgdConfig::default() });
    let trainer = trainer(3, None)?;
    for stage in [ZeroStage::Stage1, ZeroStage::Stage2] {
        let host = ranks(stage, 2, false, DType::BF16, &sgd, &trainer, None)?;
        let device = ranks(stage, 2, true, DType::BF16, &sgd, &trainer, None)?;
        for (h, d) in host.iter().zip(&device) {
            // The host keeps its slices' padding too (one per unit in stage 2); the device keeps
            // the pieces only.
            let (host_bytes, device_bytes) = (h.state.master_weights, d.state.master_weights);
            assert!(
                device_bytes <= host_bytes && host_bytes <= device_bytes + device_bytes / 100,
                "{stage:?}: {device_bytes} vs {host_bytes}"
            );
            let (name, worst) = worst_difference(&h.model, &d.model)?;
            assert!(worst <= 1e-2, "{stage:?}: `{name}` differs by {worst:e}");
        }
    }
    Ok(())
}

/// A device run of `stage` checkpointed at step 2 of 4 and resumed on the device ends
/// bit-identically with the uninterrupted run; the host updater at `host_stage` (the sharded
/// format is shared) resumes the same checkpoint and ends within `host_tolerance`.
fn resumes_bit_identically(
    stage: ZeroStage,
    dtype: DType,
    host_stage: ZeroStage,
    host_tolerance: f64,
) -> anyhow::Result<()> {
    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    let dir = |name: &str| {
        let d = std::env::temp_dir()
            .join(format!("candle-fit-device-zero-{stage:?}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    };
    let (full_dir, device_dir, host_dir) = (dir("full"), dir("device"), dir("host"));
    let full = ranks(stage, 2, true, dtype, &adamw, &trainer(4, Some(&full_dir))?, None)?;
    let from = full_dir.join("step-00000002");
    let resumed = ranks(stage, 2, true, dtype, &adamw, &trainer(4, Some(&device_dir))?, Some(&from))?;
    for (a, b) in full.iter().zip(&resumed) {
        assert_eq!(b.report.start_step, 2);
        assert!(
            snapshot(&a.model)? == snapshot(&b.model)?,
            "{stage:?} resumed on the device: {:?}",
            worst_difference(&a.model, &b.model)?
        );
    }
    let host = ranks(host_stage, 2, false, dtype, &adamw, &trainer(4, Some(&host_dir))?, Some(&from))?;
    for (a, b) in full.iter().zip(&host) {
        let (name, worst) = worst_difference(&a.model, &b.model)?;
        assert!(worst <= host_tolerance, "{stage:?} resumed on the host: `{name}` differs by {worst:e}");
    }
    for d in [full_dir, device_dir, host_dir] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}

#[test]
fn a_device_sharded_checkpoint_resumes_bit_identically_on_the_device_and_on_the_host() -> anyhow::Result<()> {
    resumes_bit_identically(ZeroStage::Stage2, DType::F32, ZeroStage::Stage1, 1e-4)
}

#[test]
fn a_device_stage3_checkpoint_resumes_bit_identically() -> anyhow::Result<()> {
    resumes_bit_identically(ZeroStage::Stage3, DType::BF16, ZeroStage::Stage3, 1e-2)
}

#[test]
fn device_stage3_steps_device_slices_like_device_stage2_and_follows_the_host_stage3() -> anyhow::Result<()> {
    let adamw = OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() });
    let trainer = trainer(3, None)?;
    for dtype in [DType::F32, DType::BF16] {
        let stage2 = ranks(ZeroStage::Stage2, 2, true, dtype, &adamw, &trainer, None)?;
        let device = ranks(ZeroStage::Stage3, 2, true, dtype, &adamw, &trainer, None)?;
        let host = ranks(ZeroStage::Stage3, 2, false, dtype, &adamw, &trainer, None)?;
        for (rank, ((s2, d), h)) in stage2.iter().zip(&device).zip(&host).enumerate() {
            // The same reduction per unit and the same tensor-op step on the same FP32 values
            // (stage 2's F32 variables or BF16 master pieces, stage 3's slices): the same bits.
            assert!(
                snapshot(&d.model)? == snapshot(&s2.model)?,
                "{dtype:?} rank {rank}: device stage 3 differs from device stage 2: {:?}",
                worst_difference(&d.model, &s2.model)?
            );
            let (name, worst) = worst_difference(&h.model, &d.model)?;
            let tolerance = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
            assert!(worst <= tolerance, "{dtype:?} rank {rank}: `{name}` differs from the host by {worst:e}");
            assert_eq!(d.transfers, Transfers::default(), "the CPU device moves nothing");
            // The slices and the gradient slices are the host's (padding included); the
            // optimizer state is stage 2's (the same pieces).
            assert_eq!(d.state.master_weights, h.state.master_weights, "{dtype:?}: slice bytes");
            assert_eq!(d.state.gradients, h.state.gradients, "{dtype:?}: gradient slices");
            assert_eq!(d.state.optimizer_state, s2.state.optimizer_state);
            // Released between uses: at most one segment's buffers plus shared ones at once,
            // as on the host.
            assert!(
                d.peak_gathered > 0 && d.peak_gathered == h.peak_gathered,
                "{} vs {}",
                d.peak_gathered,
                h.peak_gathered
            );
            for (a, b) in s2.report.history.iter().zip(&d.report.history) {
                assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "losses {} {}", a.loss, b.loss);
            }
        }
    }
    Ok(())
}

#[test]
fn eight_bit_adamw_has_no_device_form_off_cuda_and_stays_on_the_host_by_default() -> anyhow::Result<()> {
    let adamw8bit = OptimizerConfig::AdamW8bit(AdamWConfig::default());
    let model = Gpt::new(odd_model(), DType::F32, &Device::Cpu, 7)?;
    let comm = || -> anyhow::Result<Box<dyn Communicator>> {
        let comm = LocalGroup::ranks(1, Duration::from_secs(120)).pop();
        Ok(Box::new(comm.ok_or_else(|| anyhow::anyhow!("a group of one"))?))
    };
    let err = ZeroUpdater::on_device(ZeroStage::Stage1, model.parameters(), &[], &adamw8bit, comm()?)
        .expect_err("8-bit AdamW has no device form on the CPU");
    assert!(err.to_string().contains("CUDA"), "{err}");
    let err = ShardedModel::on_device(model, &adamw8bit, comm()?).expect_err("nor under stage 3");
    assert!(err.to_string().contains("CUDA"), "{err}");
    // The default picks the host form on the CPU.
    let model = Gpt::new(odd_model(), DType::F32, &Device::Cpu, 7)?;
    let updater = ZeroUpdater::with_units(ZeroStage::Stage1, model.parameters(), &[], &adamw8bit, comm()?)?;
    assert!(!updater.is_device_resident());
    Ok(())
}
