//! The tensor-op AdamW (state and step on the parameters' device) against the flat-slice
//! AdamW that is bit-equal to torch: from the same state, one step agrees within 2 ulp of each
//! operation's largest operand per element (parameters and both moments; only the unfused
//! lerp/addcmul round differently, and a result that cancels can be many ulps of itself off),
//! with and without weight decay; 20 steps stay within a small relative distance; the state
//! round-trips through the flat optimizer's format.

use candle::{Device, Tensor};
use candle_fit::train::optim::{AdamW, AdamWConfig, Optimizer, TensorAdamW};

/// A deterministic pseudo-random sequence (SplitMix64) of values of varied magnitude.
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let exponent = ((z >> 8) % 7) as i32 - 3;
            unit * scale * 10f32.powi(exponent)
        })
        .collect()
}

/// One tensor-op update; the tensor-op path always returns new values.
fn step(
    optimizer: &mut TensorAdamW,
    index: usize,
    param: &Tensor,
    grad: &Tensor,
    lr: f64,
    decay: bool,
) -> anyhow::Result<Tensor> {
    optimizer
        .update_tensor(index, param, grad, lr, decay)?
        .ok_or_else(|| anyhow::anyhow!("the tensor-op AdamW updated in place"))
}

#[test]
fn one_step_agrees_with_the_flat_kernel_within_two_operand_ulps() -> anyhow::Result<()> {
    let device = Device::Cpu;
    let sizes = [1usize, 7, 4096 + 3];
    let config = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    let mut flat = AdamW::new(config, &sizes)?;
    let mut params: Vec<Vec<f32>> =
        sizes.iter().enumerate().map(|(i, &n)| values(i as u64, n, 1.0)).collect();
    // A few flat steps first, so the moments are non-trivial and the bias corrections not 1.
    for step in 0..3u64 {
        flat.begin_step();
        for (i, p) in params.iter_mut().enumerate() {
            let g = values(100 + step * 10 + i as u64, p.len(), 0.1);
            flat.update(i, p, &g, 1e-3, i != 0)?;
        }
    }
    let tensors: Vec<Tensor> = params
        .iter()
        .zip(&sizes)
        .map(|(p, &n)| Tensor::from_slice(p, n, &device))
        .collect::<Result<_, _>>()?;
    let mut on_device = TensorAdamW::new(config, &tensors.iter().collect::<Vec<_>>())?;
    on_device.load_state(&flat.state()?)?;
    assert_eq!(on_device.step_count(), 3);
    flat.begin_step();
    on_device.begin_step();
    let before = flat.state()?;
    let mut worst = [0f32; 3];
    for (i, p) in params.iter_mut().enumerate() {
        let g = values(999 + i as u64, p.len(), 0.1);
        let stepped =
            step(&mut on_device, i, &tensors[i], &Tensor::from_slice(&g, g.len(), &device)?, 1e-3, i != 0)?;
        let p_old = p.clone();
        flat.update(i, p, &g, 1e-3, i != 0)?;
        let (m, v) = on_device.moments(i)?;
        let after = flat.state()?;
        let key = |name: &str| format!("{name}.{i}");
        let (m_old, v_old) = (&before.buffers[&key("exp_avg")], &before.buffers[&key("exp_avg_sq")]);
        // Error in units of the largest operand's ulp: a lerp or addcmul rounded twice instead
        // of once is off by at most 2 of them, however much the result cancels.
        let mut check = |slot: usize, got: &[f32], want: &[f32], scale: &dyn Fn(usize) -> f32| {
            for (k, (&a, &b)) in got.iter().zip(want).enumerate() {
                let unit = scale(k).max(b.abs()).max(f32::MIN_POSITIVE) * f32::EPSILON;
                worst[slot] = worst[slot].max((a - b).abs() / unit);
            }
        };
        // The parameter's update carries the first moment's error, scaled as the update is:
        // |update| * (the moment's operand scale) / |m|.
        let m_new = &after.buffers[&key("exp_avg")];
        check(0, &stepped.to_vec1::<f32>()?, p, &|k| {
            let update = (p[k] - p_old[k]).abs();
            let carried =
                if m_new[k] != 0.0 { update * m_old[k].abs().max(g[k].abs()) / m_new[k].abs() } else { 0.0 };
            p_old[k].abs().max(p[k].abs()).max(update).max(carried)
        });
        check(1, &m.to_vec1::<f32>()?, &after.buffers[&key("exp_avg")], &|k| m_old[k].abs().max(g[k].abs()));
        check(2, &v.to_vec1::<f32>()?, &after.buffers[&key("exp_avg_sq")], &|k| v_old[k].max(g[k] * g[k]));
    }
    println!(
        "worst differences in ulps of the largest operand: parameters {}, exp_avg {}, exp_avg_sq {}",
        worst[0], worst[1], worst[2]
    );
    assert!(worst.iter().all(|&w| w <= 2.0), "{worst:?}");
    // Mismatched shapes and dtypes are refused by name.
    let wrong = Tensor::zeros(5, candle::DType::F32, &device)?;
    assert!(step(&mut on_device, 1, &wrong, &wrong, 1e-3, true).is_err());
    assert!(step(&mut on_device, 9, &tensors[0], &tensors[0], 1e-3, true).is_err());
    Ok(())
}

#[test]
fn twenty_steps_stay_close_and_the_state_round_trips() -> anyhow::Result<()> {
    let device = Device::Cpu;
    let n = 3000;
    let config = AdamWConfig::default();
    let mut flat = AdamW::new(config, &[n])?;
    let mut p = values(1, n, 1.0);
    let mut t = Tensor::from_slice(&p, n, &device)?;
    let mut on_device = TensorAdamW::new(config, &[&t])?;
    for k in 0..20u64 {
        let g = values(50 + k, n, 0.1);
        flat.begin_step();
        flat.update(0, &mut p, &g, 3e-3, true)?;
        on_device.begin_step();
        t = step(&mut on_device, 0, &t, &Tensor::from_slice(&g, n, &device)?, 3e-3, true)?;
    }
    let got = t.to_vec1::<f32>()?;
    let worst = got.iter().zip(&p).map(|(a, b)| (a - b).abs() / b.abs().max(1e-6)).fold(0f32, f32::max);
    println!("after 20 steps: worst relative difference {worst:e}");
    assert!(worst <= 1e-5, "{worst:e}");
    let saved = on_device.state()?;
    assert_eq!((saved.kind.as_str(), saved.step), ("adamw", 20));
    let mut other = TensorAdamW::new(config, &[&t])?;
    other.load_state(&saved)?;
    assert_eq!(other.state()?.buffers, saved.buffers);
    assert_eq!(on_device.state_bytes(), 2 * 4 * n);
    Ok(())
}
