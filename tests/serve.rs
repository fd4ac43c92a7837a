//! Serving while training: every answer is computed from one complete published weight
//! version, never from a half-updated one, while another thread changes the live model one
//! parameter at a time and publishes new versions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle::{DType, Device, Tensor};
use candle_fit::ckpt::Rng;
use candle_fit::train::models::{mean_pool, Bert, BertConfig, Llama, LlamaConfig};
use candle_fit::train::serve::{Publisher, WeightVersions};
use candle_fit::train::{Corpus, Hooks, LocalUpdater, OptimizerConfig, SgdConfig, Trainer, TrainerConfig};

const VERSIONS: u64 = 12;

/// Sets every parameter of `model` to its version-`v` value: the seed-1 initial weights
/// scaled by `1 + v / 10`.
fn set_version(model: &Bert, initial: &[Tensor], v: u64, mut between: impl FnMut()) -> anyhow::Result<()> {
    for (p, init) in model.parameters().iter().zip(initial) {
        p.var()?.set(&(init * (1.0 + v as f64 / 10.0))?)?;
        between();
    }
    Ok(())
}

fn embed(model: &Bert, ids: &Tensor, mask: &Tensor) -> anyhow::Result<Vec<f32>> {
    let h = model.forward(ids, None, mask, &mut Rng::seeded(0), false)?;
    Ok(mean_pool(&h, mask)?.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn every_answer_comes_from_one_complete_weight_version() -> anyhow::Result<()> {
    let config = BertConfig::tiny();
    let live = Bert::new(&config, "", DType::F32, &Device::Cpu, 1)?;
    let initial: Vec<Tensor> =
        live.parameters().iter().map(|p| p.tensor()?.copy()).collect::<Result<_, _>>()?;
    let ids = Tensor::new(&[[2u32, 5, 7, 1], [3, 3, 9, 0]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &Device::Cpu)?;

    // The expected answer of every version, computed up front on a separate model.
    let reference = Bert::new(&config, "", DType::F32, &Device::Cpu, 1)?;
    let mut expected = Vec::new();
    for v in 0..=VERSIONS {
        set_version(&reference, &initial, v, || ())?;
        expected.push(embed(&reference, &ids, &mask)?);
    }

    let versions = Arc::new(WeightVersions::new(&live)?);
    let done = Arc::new(AtomicBool::new(false));
    let server = {
        let (versions, done, ids, mask) =
            (Arc::clone(&versions), Arc::clone(&done), ids.clone(), mask.clone());
        std::thread::spawn(move || -> anyhow::Result<Vec<(u64, Vec<f32>)>> {
            let mut answers = Vec::new();
            while !done.load(Ordering::Acquire) || answers.is_empty() {
                let version = versions.current()?;
                // Yield mid-request so the trainer can publish while this request runs.
                let first = embed(&version.model, &ids, &mask)?;
                std::thread::yield_now();
                let second = embed(&version.model, &ids, &mask)?;
                anyhow::ensure!(first == second, "version {} changed during a request", version.number);
                answers.push((version.number, first));
            }
            Ok(answers)
        })
    };

    // The trainer: change the live weights one parameter at a time (yielding between them, so a
    // reader of the live model would see mixtures), publish after each complete update.
    for v in 1..=VERSIONS {
        set_version(&live, &initial, v, std::thread::yield_now)?;
        assert_eq!(versions.publish(&live)?, v);
    }
    done.store(true, Ordering::Release);
    let answers = server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;

    let mut seen = std::collections::BTreeSet::new();
    for (number, answer) in &answers {
        let want = &expected[*number as usize];
        assert_eq!(answer, want, "answer tagged version {number} is not that version's output");
        seen.insert(*number);
    }
    assert!(seen.contains(&VERSIONS) || versions.current()?.number == VERSIONS);
    eprintln!("{} answers over versions {:?}", answers.len(), seen);
    Ok(())
}

#[test]
fn a_snapshot_does_not_follow_later_changes_to_the_live_model() -> anyhow::Result<()> {
    let config = BertConfig::tiny();
    let live = Bert::new(&config, "", DType::F32, &Device::Cpu, 1)?;
    let versions = WeightVersions::new(&live)?;
    let held = versions.current()?;
    let before: Vec<f32> = held
        .model
        .parameters()
        .iter()
        .next()
        .map(|p| p.tensor()?.flatten_all())
        .transpose()?
        .map(|t| t.to_vec1())
        .transpose()?
        .unwrap_or_default();
    for p in live.parameters().iter() {
        p.var()?.set(&p.tensor()?.zeros_like()?)?;
    }
    versions.publish(&live)?;
    let after: Vec<f32> = held
        .model
        .parameters()
        .iter()
        .next()
        .map(|p| p.tensor()?.flatten_all())
        .transpose()?
        .map(|t| t.to_vec1())
        .transpose()?
        .unwrap_or_default();
    assert_eq!(before, after, "a held version is never modified");
    assert_eq!(versions.current()?.number, 1);
    assert!(versions.current()?.model.parameters().iter().all(|p| p
        .tensor()
        .and_then(|t| t.abs())
        .and_then(|t| t.sum_all())
        .and_then(|t| t.to_scalar::<f32>())
        .map(|s| s == 0.0)
        .unwrap_or(false)));
    Ok(())
}

fn bits(model: &Llama) -> anyhow::Result<Vec<Vec<u32>>> {
    model
        .parameters()
        .iter()
        .map(|p| {
            Ok(p.var()?.as_tensor().flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

/// The Trainer publishes through `Publisher`: every `every` steps and once more after a last
/// step that was not published; the last version holds the trained weights.
#[test]
fn the_trainer_publishes_versions_through_the_publisher_callback() -> anyhow::Result<()> {
    let config = LlamaConfig { vocab_size: 256, ..LlamaConfig::tiny() };
    let corpus = Corpus::from_bytes("bundled".as_ref(), candle_fit::BUNDLED_CORPUS[..20_000].to_vec(), 0.1)?;
    let sgd = OptimizerConfig::Sgd(SgdConfig::default());
    for (steps, every, published) in [(5, 2, vec![(1, 2), (2, 4), (3, 5)]), (4, 2, vec![(1, 2), (2, 4)])] {
        let live = Llama::new(&config, DType::F32, &Device::Cpu, 3)?;
        let versions = Arc::new(WeightVersions::new(&live)?);
        let trainer = Trainer::new(
            TrainerConfig::builder()
                .micro_batch(2)
                .steps(steps)
                .seq_len(16)
                .lr(0.1)
                .warmup_steps(0)
                .eval_windows(1)
                .eval_interval(0)
                .build()?,
        );
        let mut updater = LocalUpdater::from_config(live.parameters(), &sgd)?;
        let seen = std::cell::RefCell::new(Vec::new());
        let publisher = Publisher::new(&live, Arc::clone(&versions), every)?
            .on_publish(|version, step| seen.borrow_mut().push((version, step)));
        trainer.fit_with(&live, &corpus, &mut updater, Hooks::new().callback(publisher))?;
        assert_eq!(seen.into_inner(), published, "{steps} steps, every {every}");
        // The last version is the trained model, bit for bit, and training moved it.
        let last = versions.current()?;
        assert_eq!(last.number, published.len() as u64);
        assert!(bits(&last.model)? == bits(&live)?, "the last version holds the final weights");
        assert!(bits(&Llama::new(&config, DType::F32, &Device::Cpu, 3)?)? != bits(&live)?);
    }
    let live = Llama::new(&config, DType::F32, &Device::Cpu, 3)?;
    assert!(Publisher::new(&live, Arc::new(WeightVersions::new(&live)?), 0).is_err(), "every 0 is refused");
    Ok(())
}
