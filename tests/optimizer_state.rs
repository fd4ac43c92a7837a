//! Optimizer state saves and loads exactly; a saved state continues the run bit for bit;
//! state for another optimizer or shape is refused.

use candle_fit::train::optim::OptimizerState;
use candle_fit::train::{AdamW, AdamWConfig, Error, Optimizer, OptimizerConfig, Sgd, SgdConfig};

fn steps(opt: &mut dyn Optimizer, params: &mut [Vec<f32>], from: usize, to: usize) -> anyhow::Result<()> {
    for t in from..to {
        opt.begin_step();
        for (i, p) in params.iter_mut().enumerate() {
            let grad: Vec<f32> =
                (0..p.len()).map(|j| ((j * 31 + t * 7 + i) % 17) as f32 / 17.0 - 0.5).collect();
            opt.update(i, p, &grad, 1e-2, i == 0)?;
        }
    }
    Ok(())
}

#[test]
fn saved_state_resumes_bit_for_bit() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("candle-fit-optstate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sizes = [6, 3];
    for config in [OptimizerConfig::AdamW(AdamWConfig::default()), OptimizerConfig::Sgd(SgdConfig::default())]
    {
        let make = || config.build(&sizes);
        let init = || sizes.iter().map(|&n| vec![0.25f32; n]).collect::<Vec<_>>();
        let mut straight = make()?;
        let mut p_straight = init();
        steps(straight.as_mut(), &mut p_straight, 0, 6)?;

        let mut first = make()?;
        let mut p = init();
        steps(first.as_mut(), &mut p, 0, 3)?;
        let path = dir.join(format!("{}.safetensors", first.name()));
        first.state()?.save(&path)?;
        let loaded = OptimizerState::load(&path)?;
        assert_eq!(loaded, first.state()?);
        let mut resumed = make()?;
        resumed.load_state(&loaded)?;
        assert_eq!(resumed.step_count(), 3);
        steps(resumed.as_mut(), &mut p, 3, 6)?;
        assert_eq!(p, p_straight, "{}", first.name());
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn mismatched_state_is_refused_and_leaves_the_optimizer_unchanged() -> anyhow::Result<()> {
    let sgd = Sgd::new(SgdConfig::default(), &[4])?;
    let mut adamw = AdamW::new(AdamWConfig::default(), &[4])?;
    let before = adamw.state()?;
    assert!(matches!(adamw.load_state(&sgd.state()?), Err(Error::StateMismatch { .. })));
    let other = AdamW::new(AdamWConfig::default(), &[5])?;
    let err = adamw.load_state(&other.state()?).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("state mismatch for `exp_avg.0`: expected 4 values, found 5 values"), "{err}");
    assert_eq!(adamw.state()?, before);
    assert!(matches!(
        AdamW::new(AdamWConfig { beta1: 1.0, ..Default::default() }, &[1]),
        Err(Error::InvalidConfig { field: "beta1", .. })
    ));
    Ok(())
}
