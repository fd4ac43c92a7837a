//! The offloaded optimizer (`--offload-optimizer`): its multi-threaded step gives exactly the
//! parameters and optimizer state of the single-threaded one, for every optimizer, for
//! parameter sizes that do not divide into the rayon chunks, and inside a whole training run.

use candle::{DType, Device};
use candle_fit::train::optim::{AdamW, AdamW8bit, Optimizer, Sgd, SgdConfig, PARALLEL_CHUNK};
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, LocalUpdater, OptimizerConfig, Trainer, TrainerConfig, Updater,
};

/// Sizes below, at and across chunk and 8-bit block boundaries (the 8-bit optimizer keeps
/// 32-bit state below 4096).
const SIZES: [usize; 5] = [1, 4095, 2048 * 3 + 5, PARALLEL_CHUNK, 3 * PARALLEL_CHUNK + 17];

/// An optimizer's name and two identical instances: one stepped sequentially, one in parallel.
type Twins = (&'static str, Box<dyn Optimizer>, Box<dyn Optimizer>);

fn optimizers() -> anyhow::Result<Vec<Twins>> {
    let adamw = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    let sgd = SgdConfig { momentum: 0.9, weight_decay: 0.01, nesterov: true, ..Default::default() };
    Ok(vec![
        ("adamw", Box::new(AdamW::new(adamw, &SIZES)?), Box::new(AdamW::new(adamw, &SIZES)?)),
        ("adamw8bit", Box::new(AdamW8bit::new(adamw, &SIZES)?), Box::new(AdamW8bit::new(adamw, &SIZES)?)),
        ("sgd", Box::new(Sgd::new(sgd, &SIZES)?), Box::new(Sgd::new(sgd, &SIZES)?)),
    ])
}

fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) * scale).collect()
}

#[test]
fn the_parallel_step_equals_the_sequential_one_bit_for_bit() -> anyhow::Result<()> {
    // More threads than this machine's cores: the chunks really are stepped concurrently and
    // out of order.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build()?;
    for (name, mut sequential, mut parallel) in optimizers()? {
        let mut a: Vec<Vec<f32>> = SIZES.iter().map(|&n| values(n, 1, 1e-3)).collect();
        let mut b = a.clone();
        for step in 0..4 {
            sequential.begin_step();
            parallel.begin_step();
            for (i, &n) in SIZES.iter().enumerate() {
                let grad = values(n, step + 2, 1e-4 * (step + 1) as f32);
                let decay = i % 2 == 0;
                sequential.update(i, &mut a[i], &grad, 1e-2, decay)?;
                pool.install(|| parallel.update_parallel(i, &mut b[i], &grad, 1e-2, decay))?;
            }
        }
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{name}: parameter {i} ({} values) differs", x.len());
            assert!(x.iter().zip(values(x.len(), 1, 1e-3)).any(|(p, q)| *p != q), "{name}: {i} never moved");
        }
        assert_eq!(sequential.state()?, parallel.state()?, "{name}: optimizer state");
    }
    Ok(())
}

#[test]
fn a_wrong_index_or_length_is_an_error_not_a_panic() -> anyhow::Result<()> {
    for (name, _, mut parallel) in optimizers()? {
        parallel.begin_step();
        let (mut p, g) = (vec![0.0; 4], vec![0.0; 4]);
        assert!(parallel.update_parallel(SIZES.len(), &mut p, &g, 1e-3, true).is_err(), "{name}: index");
        assert!(parallel.update_parallel(1, &mut p, &g, 1e-3, true).is_err(), "{name}: length");
    }
    Ok(())
}

fn corpus() -> anyhow::Result<Corpus> {
    Ok(Corpus::from_bytes(
        candle_fit::BUNDLED_CORPUS_NAME.as_ref(),
        candle_fit::BUNDLED_CORPUS[..100_000].to_vec(),
        0.1,
    )?)
}

#[test]
fn offloaded_training_gives_the_same_parameters_as_on_device_training() -> anyhow::Result<()> {
    let corpus = corpus()?;
    let config = GptConfig { n_ctx: 32, n_embd: 64, n_layer: 2, n_head: 2, ..GptConfig::default() };
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(4)
            .accumulation_steps(2)
            .seq_len(32)
            .steps(6)
            .lr(3e-3)
            .warmup_steps(2)
            .max_grad_norm(Some(0.5))
            .eval_windows(4)
            .eval_interval(0)
            .build()?,
    );
    for dtype in [DType::F32, DType::BF16] {
        for optimizer in [
            OptimizerConfig::AdamW(AdamWConfig { weight_decay: 0.1, ..Default::default() }),
            OptimizerConfig::AdamW8bit(AdamWConfig { weight_decay: 0.1, ..Default::default() }),
        ] {
            let mut runs = Vec::new();
            for offload in [false, true] {
                let model = Gpt::new(config, dtype, &Device::Cpu, 3)?;
                let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
                if offload {
                    updater = updater.offloaded()?;
                }
                assert_eq!(updater.is_offloaded(), offload);
                let report = trainer.fit(&model, &corpus, &mut updater)?;
                let params = model
                    .parameters()
                    .iter()
                    .map(|p| {
                        Ok((
                            p.name.clone(),
                            p.tensor()?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                        ))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                runs.push((params, updater.save_state()?, updater.state_bytes(), report.final_val_loss));
            }
            let (on_device, offloaded) = (&runs[0], &runs[1]);
            assert_eq!(on_device.0, offloaded.0, "{dtype:?} {optimizer:?}: parameters");
            assert_eq!(
                on_device.1, offloaded.1,
                "{dtype:?} {optimizer:?}: master weights and optimizer state"
            );
            // On the CPU device the state is in host memory either way: no extra bytes.
            assert_eq!(on_device.2, offloaded.2, "{dtype:?} {optimizer:?}: state bytes");
            assert_eq!(on_device.3.to_bits(), offloaded.3.to_bits());
        }
    }
    Ok(())
}
