//! Writes the seed corpus: a real checkpoint of the tiny model (BF16, so master weights exist),
//! flattened, plus a few mutilated variants.

use candle_train::checkpoint::{save, Progress, RunIdentity};
use candle_train::{LocalUpdater, LrSchedule, OptimizerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus/checkpoint".into()));
    std::fs::create_dir_all(&out)?;
    let model = candle_fit_fuzz::model();
    let updater = LocalUpdater::from_config(model.parameters(), &OptimizerConfig::AdamW(Default::default()))?;
    let run_dir = std::env::temp_dir().join(format!("candle-fit-seed-{}", std::process::id()));
    let progress = Progress {
        step: 1,
        optimizer_step: 0,
        skipped_steps: 0,
        consecutive_skips: 0,
        micro_batch: 2,
        accumulation_steps: 1,
        loss_scaler: None,
    };
    let run = RunIdentity {
        seed: 0,
        global_batch: 2,
        schedule: LrSchedule::Constant { lr: 1e-3 },
        max_grad_norm: None,
        loss_scaling: None,
        optimizer: "adamw".into(),
        optimizer_settings: String::new(),
        model: String::new(),
        backward: "segmented".into(),
        data: String::new(),
    };
    let dir = save(&run_dir, 1, model.parameters(), &updater, progress, run)?;
    let parts: Vec<Vec<u8>> =
        candle_fit_fuzz::FILES.iter().map(|f| std::fs::read(dir.join(f))).collect::<Result<_, _>>()?;
    assert!(candle_fit_fuzz::load(&candle_fit_fuzz::join(&parts)), "the seed must load");
    std::fs::write(out.join("valid"), candle_fit_fuzz::join(&parts))?;
    for (i, part) in parts.iter().enumerate() {
        let mut cut = parts.clone();
        cut[i].truncate(part.len() / 2);
        std::fs::write(out.join(format!("cut{i}")), candle_fit_fuzz::join(&cut))?;
    }
    // The manifest target's seed: the manifest's body (it seals what it is given).
    if let Some(manifest_dir) = std::env::args().nth(2).map(std::path::PathBuf::from) {
        std::fs::create_dir_all(&manifest_dir)?;
        let body = candle_train::checkpoint::unseal_manifest(&parts[0]).map(|(_, b)| b).unwrap_or_default();
        std::fs::write(manifest_dir.join("valid"), body)?;
    }
    std::fs::remove_dir_all(&run_dir)?;
    Ok(())
}
