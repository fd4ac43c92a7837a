//! Our optimizers against PyTorch's on the same inputs: AdamW bit for bit, SGD bit for bit.
//! The reference file comes from `scripts/reference/torch_optimizers.py` (its header says how).

use candle_fit::train::{AdamW, AdamWConfig, Optimizer, Sgd, SgdConfig};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    torch_version: String,
    sizes: Vec<usize>,
    steps: usize,
    lrs: Vec<f64>,
    decay: Vec<bool>,
    adamw: Vec<Vec<u32>>,
    adamw_mkl_sqrt: Vec<Vec<u32>>,
    sgd: Vec<Vec<u32>>,
}

/// The script's `value`: integer arithmetic, one f64 division, then f32 rounding.
fn values(n: usize, salt: u64, scale: f64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| ((((i * 7919 + salt * 104_729) % 2001) as f64 - 1000.0) / 1000.0 * scale) as f32)
        .collect()
}

fn reference() -> anyhow::Result<Reference> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/torch_optimizers.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn run(optimizer: &mut dyn Optimizer, r: &Reference) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut params: Vec<Vec<f32>> =
        r.sizes.iter().enumerate().map(|(k, &n)| values(n, 1 + k as u64, 0.5)).collect();
    for step in 0..r.steps {
        optimizer.begin_step();
        for (k, p) in params.iter_mut().enumerate() {
            let grad = values(p.len(), 100 + 10 * step as u64 + k as u64, 0.1 * (step + 1) as f64);
            optimizer.update(k, p, &grad, r.lrs[step], r.decay[k])?;
        }
    }
    Ok(params)
}

fn assert_bits_equal(name: &str, ours: &[Vec<f32>], theirs: &[Vec<u32>], torch: &str) {
    for (k, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a.len(), b.len());
        for (i, (x, &y)) in a.iter().zip(b).enumerate() {
            assert_eq!(
                x.to_bits(),
                y,
                "{name}: parameter {k} element {i}: ours {x:e}, torch {torch} {:e}",
                f32::from_bits(y)
            );
        }
    }
}

#[test]
fn adamw_equals_torch_adamw_bit_for_bit() -> anyhow::Result<()> {
    let r = reference()?;
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    let mut adamw = AdamW::new(config, &r.sizes)?;
    let ours = run(&mut adamw, &r)?;
    assert_bits_equal("adamw", &ours, &r.adamw, &r.torch_version);
    Ok(())
}

#[test]
fn adamw_is_within_four_ulps_of_torch_with_its_mkl_sqrt() -> anyhow::Result<()> {
    let r = reference()?;
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    let mut adamw = AdamW::new(config, &r.sizes)?;
    let ours = run(&mut adamw, &r)?;
    let mut worst = 0;
    for (a, b) in ours.iter().zip(&r.adamw_mkl_sqrt) {
        for (x, &y) in a.iter().zip(b) {
            worst = worst.max((x.to_bits() as i64 - y as i64).abs());
        }
    }
    assert!(worst <= 4, "{worst} ulps from torch's stock AdamW");
    Ok(())
}

#[test]
fn sgd_momentum_equals_torch_sgd_bit_for_bit() -> anyhow::Result<()> {
    let r = reference()?;
    let config = SgdConfig { momentum: 0.9, dampening: 0.0, weight_decay: 0.01, nesterov: false };
    let mut sgd = Sgd::new(config, &r.sizes)?;
    let ours = run(&mut sgd, &r)?;
    assert_bits_equal("sgd", &ours, &r.sgd, &r.torch_version);
    Ok(())
}
