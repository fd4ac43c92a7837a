//! The GPU run kit stays in step with the harness: the PyTorch reference writes every field of
//! `candle-fit bench --json`'s rows and knows every configuration candle-fit can mirror, and
//! the kit's scripts parse.

use std::path::Path;
use std::process::Command;

use candle_fit::bench::{configurations, BenchRow, StepTime};

const REFERENCE: &str = "benches/pytorch_reference.py";

fn repo_file(path: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))?)
}

#[test]
fn pytorch_reference_writes_every_field_of_a_bench_row() -> anyhow::Result<()> {
    let row = BenchRow {
        config: "fp32".into(),
        model: "L1-W32".into(),
        framework: "candle-fit".into(),
        device: "cpu".into(),
        precision: "f32".into(),
        micro_batch: 1,
        accum_steps: 1,
        world_size: 1,
        peak_bytes: 1,
        memory_source: "heap".into(),
        tf32: false,
        bytes_by_category: Default::default(),
        predicted_peak_bytes: None,
        step_time_s: StepTime { median: 1.0, min: 1.0, max: 1.0 },
        tokens_per_s: 1.0,
        final_loss: 1.0,
        peak_vs_baseline: None,
        time_vs_baseline: None,
        transfers_per_step: None,
    };
    let serde_json::Value::Object(fields) = serde_json::to_value(&row)? else {
        anyhow::bail!("a row must serialise to an object");
    };
    let script = repo_file(REFERENCE)?;
    for key in fields.keys() {
        assert!(script.contains(&format!("\"{key}\":")), "{REFERENCE} does not write `{key}`");
    }
    for key in [
        "median",
        "min",
        "max",
        "parameters",
        "gradients",
        "master_weights",
        "optimizer_state",
        "activations",
    ] {
        assert!(script.contains(&format!("\"{key}\":")), "{REFERENCE} does not write `{key}`");
    }
    Ok(())
}

#[test]
fn pytorch_reference_mirrors_every_configuration_with_a_torch_counterpart() -> anyhow::Result<()> {
    let script = repo_file(REFERENCE)?;
    for config in configurations() {
        let entry = format!("    \"{}\": (", config.name);
        if config.name == "candle-plain"
            || config.zero.is_some()
            || config.adamw8bit
            || config.offload
            || config.state_on_device
        {
            // Candle's one-shot backward has no PyTorch counterpart; nor do in-process ZeRO
            // ranks in the single-process reference; 8-bit and offloaded optimizers need
            // bitsandbytes or DeepSpeed, which the GPU machines do not have; PyTorch's state is
            // always on the device (its `fp32` row is `device-state`'s counterpart).
            assert!(!script.contains(&entry));
            continue;
        }
        assert!(script.contains(&entry), "{REFERENCE} has no configuration `{}`", config.name);
    }
    Ok(())
}

#[test]
fn kit_scripts_parse() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (shell, script) in [
        ("bash", "scripts/cuda-env.sh"),
        ("bash", "scripts/cuda/make-link-stubs.sh"),
        ("bash", "scripts/gpu-kit.sh"),
        ("bash", "scripts/gpu/device-run.sh"),
        ("sh", "scripts/gpu/with-cuda-libs.sh"),
    ] {
        let status = Command::new(shell).arg("-n").arg(root.join(script)).status()?;
        assert!(status.success(), "{script} does not parse");
    }
    let parse = "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])";
    match Command::new("python3").args(["-c", parse]).arg(root.join(REFERENCE)).status() {
        Ok(status) => assert!(status.success(), "{REFERENCE} does not parse"),
        Err(e) => eprintln!("skipping the Python syntax check: no python3 ({e})"),
    }
    Ok(())
}
