//! The device matrix: each equivalence case is written once as `fn case(device: &Device)` and
//! instantiated for the CPU (module `cpu`) and, in a build with the `cuda` feature, for CUDA
//! device 0 (module `cuda`), where it skips with a message when no GPU is present.
//!
//! Cases: recomputation gives the gradients of no recomputation; k accumulated micro-batches
//! give the update of one batch k times the size; BF16 and FP16 (loss-scaled) follow the FP32
//! loss curve; the device's memory meter sees a step's peak; the offloaded optimizer ends where
//! the default one does; ZeRO stages 0-3 on a group of one (NCCL on CUDA with the `nccl`
//! feature) and stage 3's release and gather end where the single-device updater does; QLoRA's
//! quantized base keeps its blocks on the device and dequantizes there to the CPU's values. CUDA
//! adds the memory pool's counters and pinned host buffers.
//!
//! A CUDA build of this file needs no GPU to compile (`scripts/cuda-env.sh cargo test --no-run
//! --features cuda`), but its binary needs the driver's `libcuda.so.1` to start at all: run it
//! only on a GPU machine (`scripts/gpu-kit.sh`).

use std::collections::HashMap;

use candle::{DType, Device, Tensor};
use candle_fit::ckpt::{
    forward_backward, segment_infos, Decision, Recompute, RecomputePolicy, SegmentContext,
};
use candle_fit::train::memory::{CountingAllocator, DeviceMeter};
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LocalUpdater, OptimizerConfig, Parameters, Precision, SgdConfig,
    TrainReport, Trainer, TrainerConfig,
};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// Memory counters are process-wide (and a GPU is shared): the cases run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS[..200_000].to_vec(),
        0.1,
    )?)
}

fn small(dropout: f32) -> GptConfig {
    GptConfig { n_ctx: 32, n_embd: 32, n_layer: 3, n_head: 2, dropout, ..GptConfig::default() }
}

/// The largest difference between two gradient (or parameter) sets, relative to the largest
/// magnitude of each pair of tensors (all-zero pairs are equal): (name, relative difference).
fn worst_relative(
    reference: &HashMap<String, Tensor>,
    other: &HashMap<String, Tensor>,
) -> anyhow::Result<(String, f64)> {
    let mut worst = (String::new(), 0.0);
    for (name, a) in reference {
        let b = other.get(name).ok_or_else(|| anyhow::anyhow!("`{name}` missing"))?;
        let a = a.to_dtype(DType::F32)?;
        let b = b.to_dtype(DType::F32)?;
        let largest =
            |t: &Tensor| -> anyhow::Result<f64> { Ok(t.abs()?.max_all()?.to_scalar::<f32>()? as f64) };
        let scale = largest(&a)?.max(largest(&b)?);
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        if scale > 0.0 && diff / scale >= worst.1 {
            worst = (name.clone(), diff / scale);
        }
    }
    Ok(worst)
}

fn engine_gradients(
    model: &Gpt,
    device: &Device,
    decisions: &[Decision],
) -> anyhow::Result<HashMap<String, Tensor>> {
    let batch = corpus()?.train_batch(1, 0, 0, 4, 32, device)?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    forward_backward(model, &batch, SegmentContext::train(7, 0, 0), decisions, 1.0, |g| {
        for p in g.gradients {
            let sum = match out.remove(&p.name) {
                Some(previous) => (previous + &p.grad)?,
                None => p.grad,
            };
            out.insert(p.name, sum);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Every built-in recompute policy gives the gradients of keeping every graph, dropout on (the
/// recomputed masks must replay). F32, 1e-5 of each gradient's largest magnitude: the same
/// kernels run on the same inputs, so only reassociation inside a device's kernels can differ.
fn recompute_gives_the_gradients_of_no_recompute(device: &Device) -> anyhow::Result<()> {
    let model = Gpt::new(small(0.1), DType::F32, device, 5)?;
    let infos = segment_infos(&model);
    let reference = engine_gradients(&model, device, &Recompute::Never.decide(&infos)?)?;
    assert_eq!(reference.len(), model.parameters().iter().count());
    for policy in [Recompute::All, Recompute::Sqrt, Recompute::EveryK(2)] {
        let decisions = policy.decide(&infos)?;
        assert!(decisions.contains(&Decision::Recompute), "{policy:?} recomputes nothing");
        let (name, rel) = worst_relative(&reference, &engine_gradients(&model, device, &decisions)?)?;
        println!("{device:?} {policy:?}: worst relative gradient difference {rel:.2e} ({name})");
        assert!(rel <= 1e-5, "{policy:?}: `{name}` differs by {rel:.2e} of its magnitude");
    }
    Ok(())
}

/// One SGD step (lr 0.5) of `accumulation_steps` micro-batches of `micro_batch` sequences.
fn one_sgd_step(micro_batch: usize, accumulation_steps: usize) -> anyhow::Result<Trainer> {
    Ok(Trainer::new(
        TrainerConfig::builder()
            .micro_batch(micro_batch)
            .accumulation_steps(accumulation_steps)
            .steps(1)
            .seq_len(32)
            .lr(0.5)
            .warmup_steps(0)
            .eval_windows(2)
            .eval_interval(0)
            .build()?,
    ))
}

fn parameters_after_one_step(
    device: &Device,
    micro_batch: usize,
    accumulation_steps: usize,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let model = Gpt::new(small(0.0), DType::F32, device, 3)?;
    let sgd = OptimizerConfig::Sgd(SgdConfig::default());
    let mut updater = LocalUpdater::from_config(model.parameters(), &sgd)?;
    let trainer = one_sgd_step(micro_batch, accumulation_steps)?;
    trainer.fit(&model, &corpus()?, &mut updater)?;
    values(model.parameters())
}

/// Every parameter's value, by name.
fn values(params: &Parameters) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(params.iter().map(|p| Ok((p.name.clone(), p.tensor()?))).collect::<candle::Result<_>>()?)
}

/// ZeRO stage 3 on one in-process rank (the model's variables released between uses and
/// gathered back around each segment's forward and backward: on CUDA through the device's
/// storage swap) ends a step where the single-device updater does, within 1e-5 of each
/// parameter's magnitude, and never held more than part of the parameters at once.
fn stage_three_on_one_rank_equals_the_local_updater(device: &Device) -> anyhow::Result<()> {
    use candle_fit::shard::{comm::LocalGroup, driver::fit_rank, ZeroStage};
    let reference = parameters_after_one_step(device, 8, 1)?;
    let trainer = one_sgd_step(8, 1)?;
    let comm = LocalGroup::ranks(1, std::time::Duration::from_secs(120))
        .pop()
        .ok_or_else(|| anyhow::anyhow!("a group of one"))?;
    let model = Gpt::new(small(0.0), DType::F32, device, 3)?;
    let sgd = OptimizerConfig::Sgd(SgdConfig::default());
    let run = fit_rank(ZeroStage::Stage3, Box::new(comm), &trainer, &corpus()?, &sgd, model)?;
    let sharded = values(run.model.parameters())?;
    let (name, rel) = worst_relative(&reference, &sharded)?;
    assert!(rel <= 1e-5, "`{name}` differs by {rel:.2e} of its magnitude");
    let whole = run.model.parameters().size_in_bytes();
    assert!(
        run.peak_gathered_bytes > 0 && run.peak_gathered_bytes < whole,
        "{} of {whole}",
        run.peak_gathered_bytes
    );
    // Stage 3 keeps its slices on the parameters' device: a gather is a device collective
    // (this in-process group stages it through the host, which counts as collective bytes,
    // not parameters); no parameter is uploaded, on any device.
    let moved = run.report.history.iter().map(|r| r.transfers.parameters).sum::<u64>();
    assert_eq!(moved, 0, "stage 3 uploaded {moved} bytes of parameters");
    Ok(())
}

/// A communicator group of one rank on `device`: NCCL on a CUDA device in a build with the
/// `nccl` feature, the in-process group otherwise.
fn group_of_one(device: &Device) -> anyhow::Result<Box<dyn candle_fit::shard::comm::Communicator>> {
    #[cfg(feature = "nccl")]
    if let Device::Cuda(cuda) = device {
        use candle_fit::shard::nccl::{NcclCommunicator, NcclId};
        return Ok(Box::new(NcclCommunicator::new(cuda, 0, 1, &NcclId::new()?)?));
    }
    let _ = device;
    let comm = candle_fit::shard::comm::LocalGroup::ranks(1, std::time::Duration::from_secs(120)).pop();
    Ok(Box::new(comm.ok_or_else(|| anyhow::anyhow!("a group of one"))?))
}

/// ZeRO stages 0-3 over a group of one (NCCL on CUDA with feature `nccl`: issue 10's "stages
/// 0-3 with world size 1 over NCCL"; the in-process group on the CPU) end a step where the
/// single-device updater does, within 1e-5 of each parameter's magnitude.
fn zero_stages_on_a_group_of_one_equal_the_local_updater(device: &Device) -> anyhow::Result<()> {
    use candle_fit::shard::{driver::fit_rank, ZeroStage};
    let reference = parameters_after_one_step(device, 8, 1)?;
    let trainer = one_sgd_step(8, 1)?;
    let sgd = OptimizerConfig::Sgd(SgdConfig::default());
    for stage in 0..=3 {
        let model = Gpt::new(small(0.0), DType::F32, device, 3)?;
        let run = fit_rank(
            ZeroStage::from_number(stage)?,
            group_of_one(device)?,
            &trainer,
            &corpus()?,
            &sgd,
            model,
        )?;
        let sharded = values(run.model.parameters())?;
        let (name, rel) = worst_relative(&reference, &sharded)?;
        println!("{device:?} ZeRO stage {stage} on a group of one: worst {rel:.2e} ({name})");
        assert!(rel <= 1e-5, "stage {stage}: `{name}` differs by {rel:.2e} of its magnitude");
    }
    Ok(())
}

/// Four micro-batches of 2 give the SGD update of one batch of 8. The gradient sums run in
/// another order, so F32 rounding: 1e-5 of each parameter's largest magnitude (measured on
/// CPU: 9e-7). The step itself moves the parameters by far more (checked: over 1e-3), so a
/// wrong normalisation fails by orders of magnitude.
fn accumulation_equals_one_large_batch(device: &Device) -> anyhow::Result<()> {
    let initial = Gpt::new(small(0.0), DType::F32, device, 3)?;
    let initial = values(initial.parameters())?;
    let one = parameters_after_one_step(device, 8, 1)?;
    let accumulated = parameters_after_one_step(device, 2, 4)?;
    let (moved_name, moved) = worst_relative(&initial, &one)?;
    assert!(moved > 1e-3, "the step must change the parameters: {moved_name} moved {moved:.2e}");
    let (name, rel) = worst_relative(&one, &accumulated)?;
    println!("{device:?}: accumulated vs one batch, worst {rel:.2e} ({name}); the step moved {moved:.2e}");
    assert!(rel <= 1e-5, "`{name}` differs by {rel:.2e} of its magnitude");
    Ok(())
}

/// The offloaded optimizer (rayon step on the host; on CUDA, host-resident F32 parameters and
/// pinned transfers) ends at the parameters of the default step: F32 and BF16 (FP32 master
/// weights), AdamW with clipping, 3 steps of 2 accumulated micro-batches. Bit-identical on the
/// CPU (tests/offload.rs); 1e-6 of each parameter's magnitude allowed elsewhere.
fn offloaded_optimizer_equals_the_on_device_one(device: &Device) -> anyhow::Result<()> {
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(2)
            .accumulation_steps(2)
            .steps(3)
            .seq_len(32)
            .lr(1e-2)
            .warmup_steps(0)
            .max_grad_norm(Some(0.5))
            .eval_windows(2)
            .eval_interval(0)
            .build()?,
    );
    let optimizer = OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.1, ..Default::default() });
    for dtype in [DType::F32, DType::BF16] {
        let mut runs = Vec::new();
        for offload in [false, true] {
            let model = Gpt::new(small(0.0), dtype, device, 3)?;
            let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
            if offload {
                updater = updater.offloaded()?;
            }
            trainer.fit(&model, &corpus()?, &mut updater)?;
            let params: HashMap<String, Tensor> = model
                .parameters()
                .iter()
                .map(|p| Ok((p.name.clone(), p.tensor()?.to_dtype(DType::F32)?)))
                .collect::<anyhow::Result<_>>()?;
            runs.push(params);
        }
        let (name, rel) = worst_relative(&runs[0], &runs[1])?;
        println!("{device:?} {dtype:?}: offloaded vs on-device, worst {rel:.2e} ({name})");
        // Off the CPU the default step is the device-resident one (fused kernels, bit-equal per
        // element to the host's) but its gradient norm is a device reduction in another order,
        // so a clipped step can differ in the last bit; AdamW's sign-like updates of tiny
        // gradients carry that to ~1e-5 of a bias's scale (as the tensor-op path does on the
        // CPU, tests/device_state.rs).
        let bound = if device.is_cpu() { 0.0 } else { 1e-4 };
        assert!(rel <= bound, "{dtype:?}: `{name}` differs by {rel:.2e} of its magnitude");
    }
    Ok(())
}

fn train(device: &Device, precision: Precision, steps: usize) -> anyhow::Result<TrainReport> {
    let config = GptConfig { n_ctx: 64, n_embd: 64, n_layer: 2, n_head: 2, ..GptConfig::default() };
    let model = Gpt::new(config, precision.dtype(), device, 0)?;
    let optimizer = OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.1, ..Default::default() });
    let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(8)
            .seq_len(64)
            .steps(steps)
            .warmup_steps(10)
            .eval_interval(0)
            .eval_windows(32)
            .loss_scaling(precision.default_loss_scaling())
            .build()?,
    );
    Ok(trainer.fit(&model, &corpus()?, &mut updater)?)
}

/// BF16 and FP16 (dynamic loss scaling) end within 3% of the FP32 validation loss after 60
/// steps of a small GPT that learns (the FP32 loss falls by more than a fifth). The half types
/// round each matmul input to 8 or 11 significant bits, hence percents, not ulps.
fn half_precision_follows_the_f32_loss_curve(device: &Device) -> anyhow::Result<()> {
    let steps = 60;
    let f32 = train(device, Precision::F32, steps)?;
    assert!(f32.final_val_loss < 0.8 * f32.initial_val_loss, "the run must learn: {f32:?}");
    for precision in [Precision::Bf16, Precision::F16] {
        let half = train(device, precision, steps)?;
        let rel = (half.final_val_loss - f32.final_val_loss).abs() / f32.final_val_loss;
        println!(
            "{device:?} {precision}: final validation loss {:.4} vs f32 {:.4} ({:.2}%), {} skipped steps",
            half.final_val_loss,
            f32.final_val_loss,
            100.0 * rel,
            half.skipped_steps
        );
        assert!(
            rel <= 0.03,
            "{precision} ends at {} against f32's {}",
            half.final_val_loss,
            f32.final_val_loss
        );
    }
    Ok(())
}

/// The device's meter sees a 4 MiB tensor in its peak, and the Trainer reports a step peak at
/// least as large as the model state it holds. Other tests of this binary allocate at the same
/// time on CPU, so only lower bounds are exact.
fn memory_meter_sees_the_peak(device: &Device) -> anyhow::Result<()> {
    let meter = DeviceMeter::for_device(device);
    assert!(meter.is_available(), "{} meter unavailable", meter.source());
    let start = meter.reset_peak();
    let block = Tensor::ones(1 << 20, DType::F32, device)?;
    let peak = meter.peak_bytes();
    // On CPU the counter is process-wide: libtest's threads may free a few bytes meanwhile.
    let slack = if device.is_cpu() { 1 << 20 } else { 0 };
    assert!(peak + slack >= start + (4 << 20), "{}: peak {peak} < start {start} + 4 MiB", meter.source());
    assert!(meter.current_bytes() >= 4 << 20);
    drop(block);
    let report = train(device, Precision::F32, 2)?;
    let state = report.memory.parameters + report.memory.gradients + report.memory.optimizer_state;
    assert!(report.memory.peak >= state, "step peak {} below the model state {state}", report.memory.peak);
    Ok(())
}

/// Runs `case` alone: under the lock, on a thread of its own that has ended (its thread-local
/// A deterministic pseudo-random sequence (SplitMix64) of values of varied magnitude.
fn varied(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            unit * scale * 10f32.powi(((z >> 8) % 7) as i32 - 3)
        })
        .collect()
}

/// The device-resident optimizers (on CUDA the fused kernels, on the CPU the tensor-op path)
/// against the host's flat-slice kernels (bit-equal to torch): AdamW and Nesterov SGD with
/// weight decay and (on CUDA) 8-bit AdamW, 3 steps on parameters of 1, 7 and 5000 elements. The
/// fused kernels repeat the flat kernels' arithmetic with IEEE intrinsics (8-bit AdamW's
/// requantization included): bit-equal, state too, and the BF16 copy a fused step writes beside
/// the master is the master rounded to nearest even. The tensor-op path rounds its unfused
/// lerp/addcmul twice: within 1e-5 of each parameter's magnitude.
fn device_optimizers_equal_the_flat_kernels(device: &Device) -> anyhow::Result<()> {
    let sizes = [1usize, 7, 5000];
    let configs = [
        OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.1, ..Default::default() }),
        OptimizerConfig::Sgd(SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.01, dampening: 0.0 }),
        // 5000 elements: 8-bit moments in three blocks (the last one partial); 1 and 7: FP32.
        OptimizerConfig::AdamW8bit(AdamWConfig { weight_decay: 0.1, ..Default::default() }),
    ];
    for config in configs {
        if matches!(config, OptimizerConfig::AdamW8bit(_)) && !device.is_cuda() {
            // Its device-resident form is the fused CUDA kernel: elsewhere it is refused.
            let t = Tensor::zeros(4, DType::F32, device)?;
            let refused = config.build_on_device(&[&t]).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(refused.contains("8-bit AdamW"), "{refused}");
            continue;
        }
        let mut flat = config.build(&sizes)?;
        let mut host: Vec<Vec<f32>> =
            sizes.iter().enumerate().map(|(i, &n)| varied(i as u64, n, 1.0)).collect();
        let masters: Vec<Tensor> =
            host.iter().map(|p| Tensor::from_slice(p, p.len(), device)).collect::<Result<_, _>>()?;
        let copies: Vec<candle::Var> = masters
            .iter()
            .map(|m| candle::Var::from_tensor(&m.to_dtype(DType::BF16)?))
            .collect::<Result<_, _>>()?;
        let mut masters = masters;
        let mut on_device = config.build_on_device(&masters.iter().collect::<Vec<_>>())?;
        assert!(on_device.device().is_some_and(|d| d.same_device(device)), "{config:?}: state on {device:?}");
        for step in 0..3u64 {
            flat.begin_step();
            on_device.begin_step();
            for (i, p) in host.iter_mut().enumerate() {
                let g = varied(100 + 10 * step + i as u64, p.len(), 0.1);
                flat.update(i, p, &g, 1e-3, i != 0)?;
                let g = Tensor::from_slice(&g, g.len(), device)?;
                if let Some(new) = on_device.update_master(i, &masters[i], &g, &copies[i], 1e-3, i != 0)? {
                    masters[i] = new;
                }
            }
        }
        let mut worst = 0f64;
        for (i, p) in host.iter().enumerate() {
            let got = masters[i].to_vec1::<f32>()?;
            let copy = copies[i].to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let rounded = masters[i].to_dtype(DType::BF16)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            assert_eq!(copy, rounded, "{config:?}: parameter {i}'s BF16 copy is not its master rounded");
            let scale = p.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            for (a, b) in got.iter().zip(p) {
                worst = worst.max(f64::from((a - b).abs()) / scale);
            }
            if device.is_cuda() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(p),
                    "{config:?}: fused parameter {i} is not bit-equal to the flat kernel"
                );
            }
        }
        let state = on_device.state()?;
        assert_eq!(state.step, 3);
        println!("{device:?} {config:?}: device-resident vs flat, worst {worst:.2e}");
        assert!(worst <= 1e-5, "{config:?}: differs by {worst:.2e} of a parameter's magnitude");
        if device.is_cuda() {
            assert_eq!(state, flat.state()?, "{config:?}: fused state is not bit-equal to the flat kernel's");
        }
    }
    // The global norm's FP64 sum of squares (one fused pass on CUDA) against the host's.
    for n in [1usize, 1000, 300_001] {
        let values = varied(7, n, 1.0);
        let want: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let t = Tensor::from_slice(&values, n, device)?;
        let got = candle_fit::train::updater::sum_of_squares_f64(&t)?.to_scalar::<f64>()?;
        assert!((got - want).abs() <= 1e-12 * want, "{n} values: {got} vs {want}");
    }
    Ok(())
}

/// What a training step moves between the host and the device: with the state on the device
/// (the default), only scalars (one loss per micro-batch, found-inf and the gradient norm);
/// offloaded, every gradient down per micro-batch and every parameter up per step (and down
/// once, the first time), exactly. On the CPU, nothing.
fn a_device_step_moves_only_scalars(device: &Device) -> anyhow::Result<()> {
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(2)
            .accumulation_steps(2)
            .steps(2)
            .seq_len(32)
            .lr(1e-3)
            .warmup_steps(0)
            .max_grad_norm(Some(1.0))
            .eval_windows(2)
            .eval_interval(0)
            .build()?,
    );
    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    for offload in [false, true] {
        let model = Gpt::new(small(0.0), DType::F32, device, 3)?;
        let elements: u64 = model.parameters().iter().map(|p| p.elem_count() as u64).sum();
        let mut updater = LocalUpdater::from_config(model.parameters(), &adamw)?;
        assert_eq!(updater.is_device_resident(), !device.is_cpu());
        if offload {
            updater = updater.offloaded()?;
        }
        let report = trainer.fit(&model, &corpus()?, &mut updater)?;
        for (k, record) in report.history.iter().enumerate() {
            let t = record.transfers;
            println!("{device:?} offload={offload} step {}: {t:?}", record.step);
            if device.is_cpu() {
                assert_eq!(t.total(), 0, "the CPU device moves nothing");
            } else if !offload {
                assert_eq!((t.gradients, t.parameters, t.state, t.collectives), (0, 0, 0, 0), "{t:?}");
                // Two losses (f64) and the gradient norm (f64).
                assert_eq!(t.scalars, 2 * 8 + 8, "{t:?}");
            } else {
                assert_eq!(t.gradients, 2 * 4 * elements, "every gradient, each micro-batch");
                let first = if k == 0 { 2 } else { 1 };
                assert_eq!(t.parameters, first * 4 * elements, "{t:?}");
            }
        }
        assert!(
            report.history.iter().any(|r| r.transfers == report.memory.transfers),
            "the memory report carries its step's transfers"
        );
    }
    Ok(())
}

/// QLoRA's quantized base on `device`: a weight quantized from a tensor there keeps its blocks
/// there (`QuantizedWeight::device`), holds the bytes the CPU's does, and dequantizes chunk by
/// chunk to the CPU's values: NF4 bit for bit (its tensor ops round as the host loop does),
/// GGML blocks within 1e-6 of the largest value (candle's kernels may contract `d * q + m`);
/// `quantized_linear`'s forward and input gradient follow within 1e-5.
fn quantized_base_lives_and_dequantizes_on_the_device(device: &Device) -> anyhow::Result<()> {
    use candle_fit::train::quant::{quantized_linear, BaseQuantization};
    let (rows, cols) = (37, 128);
    let dense = Tensor::from_vec(varied(11, rows * cols, 1.0), (rows, cols), &Device::Cpu)?;
    let largest = dense.abs()?.max_all()?.to_scalar::<f32>()?;
    let x_values = varied(12, 3 * cols, 1.0);
    for quantization in
        [BaseQuantization::Nf4, BaseQuantization::Q4_0, BaseQuantization::Q4_1, BaseQuantization::Q8_0]
    {
        let cpu = quantization.quantize("w", &dense)?.with_chunk_rows(5)?;
        let here = quantization.quantize("w", &dense.to_device(device)?)?.with_chunk_rows(5)?;
        assert!(here.device().same_device(device), "{quantization}: blocks on {:?}", here.device());
        assert_eq!(here.storage_bytes(), cpu.storage_bytes(), "{quantization}");
        for (start, len) in here.chunks() {
            let want = cpu.dequantize_rows(start, len, &Device::Cpu)?;
            let got = here.dequantize_rows(start, len, device)?;
            assert!(got.device().same_device(device));
            let got = got.to_device(&Device::Cpu)?;
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let exact = quantization == BaseQuantization::Nf4;
            assert!(
                if exact { diff == 0.0 } else { diff <= 1e-6 * largest },
                "{quantization}: rows {start}+{len} differ by {diff:e}"
            );
        }
        let linear = |weight: candle_fit::train::quant::QuantizedWeight, on: &Device| -> anyhow::Result<_> {
            let x = candle::Var::from_tensor(&Tensor::from_vec(x_values.clone(), (3, cols), on)?)?;
            let y = quantized_linear(x.as_tensor(), &std::sync::Arc::new(weight), None)?;
            let grads = (y.sqr()?.sum_all()? * 0.5)?.backward()?;
            let gx = grads.get(x.as_tensor()).ok_or_else(|| anyhow::anyhow!("no input gradient"))?;
            Ok((y.to_device(&Device::Cpu)?, gx.to_device(&Device::Cpu)?))
        };
        let (y_cpu, g_cpu) = linear(cpu, &Device::Cpu)?;
        let (y, g) = linear(here, device)?;
        for (what, a, b) in [("output", &y, &y_cpu), ("input gradient", &g, &g_cpu)] {
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-5 * scale, "{quantization}: {what} differs by {diff:e} of {scale:e}");
        }
    }
    Ok(())
}

/// buffers, such as the matmul's L2-sized scratch, freed) before the next case starts, so the
/// memory cases' exact lower bounds never see another case's frees.
fn serially(case: impl FnOnce() -> anyhow::Result<()> + Send) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::scope(|scope| scope.spawn(case).join())
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

macro_rules! device_matrix {
    ($($case:ident),* $(,)?) => {
        mod cpu {
            $(
                #[test]
                fn $case() -> anyhow::Result<()> {
                    super::serially(|| super::$case(&candle::Device::Cpu))
                }
            )*
        }

        #[cfg(feature = "cuda")]
        mod cuda {
            $(
                #[test]
                fn $case() -> anyhow::Result<()> {
                    super::serially(|| match super::cuda_device() {
                        Some(device) => super::$case(&device),
                        None => Ok(()),
                    })
                }
            )*
        }
    };
}

device_matrix!(
    recompute_gives_the_gradients_of_no_recompute,
    accumulation_equals_one_large_batch,
    half_precision_follows_the_f32_loss_curve,
    memory_meter_sees_the_peak,
    offloaded_optimizer_equals_the_on_device_one,
    stage_three_on_one_rank_equals_the_local_updater,
    zero_stages_on_a_group_of_one_equal_the_local_updater,
    device_optimizers_equal_the_flat_kernels,
    a_device_step_moves_only_scalars,
    quantized_base_lives_and_dequantizes_on_the_device,
    // Cases below need CUDA; on CPU they check what can be checked there.
    pinned_buffer_round_trips,
    pool_counters_track_allocations,
    nccl_group_of_one_is_the_identity,
);

/// NCCL with world size 1 on the GPU (feature `nccl`): every collective leaves the data as it
/// is, chunk arithmetic and root checks hold, a unique id survives its byte form, and the
/// `Communicator` trait forwards to it. Without `nccl`, nothing to check.
fn nccl_group_of_one_is_the_identity(device: &Device) -> anyhow::Result<()> {
    #[cfg(feature = "nccl")]
    if let Device::Cuda(cuda) = device {
        use candle_fit::shard::nccl::{NcclCommunicator, NcclError, NcclId};
        let id = NcclId::new()?;
        assert_eq!(NcclId::from_bytes(&id.as_bytes())?.as_bytes(), id.as_bytes());
        assert!(matches!(NcclId::from_bytes(&[0; 7]), Err(NcclError::BadId(7))));
        let comm = NcclCommunicator::new(cuda, 0, 1, &id)?;
        assert_eq!((comm.rank(), comm.world_size()), (0, 1));
        let original: Vec<f32> = (0..1024).map(|i| (i as f32).sin()).collect();
        let mut values = original.clone();
        comm.all_reduce_f32(&mut values)?;
        assert_eq!(values, original);
        comm.reduce_scatter_f32(&mut values)?;
        assert_eq!(values, original);
        comm.reduce_f32(&mut values, 0)?;
        assert_eq!(values, original);
        let mut wide: Vec<f64> = original.iter().map(|&v| v as f64).collect();
        comm.all_reduce_f64(&mut wide)?;
        assert_eq!(wide[5], original[5] as f64);
        let mut bytes: Vec<u8> = (0..=255).collect();
        comm.all_gather(&mut bytes)?;
        comm.broadcast(&mut bytes, 0)?;
        assert_eq!(bytes, (0..=255).collect::<Vec<u8>>());
        assert!(matches!(comm.broadcast(&mut bytes, 1), Err(NcclError::BadRank { rank: 1, .. })));
        comm.barrier()?;
        assert!(matches!(NcclCommunicator::new(cuda, 1, 1, &id), Err(NcclError::BadRank { .. })));
        // Through the `Communicator` trait: the same results, errors as `CommError`, counted.
        use candle_fit::shard::comm::{Communicator, Op};
        let shared: &dyn Communicator = &comm;
        shared.all_reduce_f32(&mut values)?;
        assert_eq!(values, original);
        assert!(matches!(
            shared.broadcast(&mut bytes, 1),
            Err(candle_fit::shard::CommError::BadRoot { root: 1, .. })
        ));
        assert_eq!(shared.stats().op(Op::AllReduce).calls, 1);
    }
    let _ = device;
    Ok(())
}

/// CUDA device 0, or `None` (with a message saying the case is skipped) when there is none.
/// With `CANDLE_FIT_REQUIRE_CUDA=1` (the GPU kit's `scripts/gpu/device-run.sh` sets it) a
/// missing device fails the case instead, so a GPU run cannot pass by skipping.
#[cfg(feature = "cuda")]
fn cuda_device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) if std::env::var_os("CANDLE_FIT_REQUIRE_CUDA").is_some_and(|v| v == "1") => {
            panic!("CANDLE_FIT_REQUIRE_CUDA=1 but CUDA device 0 cannot be opened: {e}")
        }
        Err(e) => {
            eprintln!("skipping: no CUDA device 0 ({e})");
            None
        }
    }
}

/// A pinned host buffer uploads to a device tensor and downloads back unchanged (CUDA); on
/// CPU there is nothing to pin and the case checks that the meter is the heap's.
fn pinned_buffer_round_trips(device: &Device) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_fit::train::cuda::PinnedBuffer;
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let mut buffer = PinnedBuffer::zeros(cuda, values.len())?;
        assert!(buffer.as_slice()?.iter().all(|&v| v == 0.0));
        buffer.as_mut_slice()?.copy_from_slice(&values);
        let tensor = buffer.upload((10, 100))?;
        assert_eq!(tensor.dims(), &[10, 100]);
        assert!(tensor.device().is_cuda());
        assert_eq!(tensor.flatten_all()?.to_vec1::<f32>()?, values);
        let doubled = (tensor * 2.0)?;
        let mut back = PinnedBuffer::zeros(cuda, values.len())?;
        back.download(&doubled)?;
        let expected: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
        assert_eq!(back.as_slice()?, expected.as_slice());
        assert!(buffer.upload(7).is_err(), "a wrong element count must be refused");
        return Ok(());
    }
    assert_eq!(DeviceMeter::for_device(device).source(), "heap");
    Ok(())
}

/// The pool's bytes in use rise by an allocation and fall back when it is freed; its peak keeps
/// the high-water mark until reset; reserved bytes cover used bytes (CUDA). On CPU the same
/// rules are checked on the counting allocator.
fn pool_counters_track_allocations(device: &Device) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_fit::train::cuda::{device_memory, pool_stats, reset_peak};
        let before = reset_peak(cuda)?;
        let block = Tensor::zeros(16 << 20, DType::F32, device)?; // 64 MiB
        let during = pool_stats(cuda)?;
        assert!(during.used_current >= before + (64 << 20), "{during:?} vs {before}");
        assert!(during.reserved_current >= during.used_current, "{during:?}");
        drop(block);
        let after = pool_stats(cuda)?;
        assert!(after.used_current + (64 << 20) <= during.used_current, "{after:?} vs {during:?}");
        assert!(after.used_high >= during.used_current, "the peak must survive the free: {after:?}");
        let reset = reset_peak(cuda)?;
        assert!(pool_stats(cuda)?.used_high < during.used_current, "reset to {reset}");
        let (free, total) = device_memory(cuda)?;
        assert!(free <= total && total > 0);
        println!("{device:?}: {during:?}, {free} of {total} bytes free");
        return Ok(());
    }
    let meter = DeviceMeter::for_device(device);
    let start = meter.reset_peak();
    let block = std::hint::black_box(vec![1u8; 8 << 20]);
    // The heap counter is process-wide: libtest's own threads (reporting the previous case)
    // may free a few bytes between the reset and the allocation, so allow 1 MiB of them.
    let peak = meter.peak_bytes();
    assert!(peak + (1 << 20) >= start + (8 << 20), "peak {peak} after an 8 MiB block from {start}");
    drop(block);
    Ok(())
}
