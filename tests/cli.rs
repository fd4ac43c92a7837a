//! The command-line tool: bad input is one clear line naming the problem and a non-zero exit,
//! never a panic; a tiny run succeeds and reports both losses and the entropy.

use std::process::Command;

fn run(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_candle-fit")).args(args).output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

const TINY: &[&str] = &[
    "train",
    "--quiet",
    "--layers",
    "1",
    "--width",
    "16",
    "--heads",
    "2",
    "--context",
    "32",
    "--seq-len",
    "32",
    "--micro-batch",
    "2",
    "--eval-windows",
    "4",
    "--steps",
    "3",
];

fn tiny_with(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = TINY.iter().map(|s| s.to_string()).collect();
    // A later flag overrides an earlier one only for clap "overrides"; replace instead.
    for pair in extra.chunks(2) {
        if let Some(i) = args.iter().position(|a| a == pair[0]) {
            args[i + 1] = pair[1].to_string();
        } else {
            args.extend(pair.iter().map(|s| s.to_string()));
        }
    }
    args
}

fn assert_clear_error(extra: &[&str], expected: &str) -> anyhow::Result<()> {
    let args = tiny_with(extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, stderr) = run(&refs)?;
    assert_ne!(code, 0, "{extra:?} should fail");
    assert!(!stderr.contains("panicked"), "{extra:?} panicked: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{extra:?}: one line expected, got {stderr}");
    assert!(stderr.contains(expected), "{extra:?}: expected `{expected}` in {stderr}");
    Ok(())
}

#[test]
fn bad_input_is_one_clear_line_and_a_failure_exit() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("candle-fit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, b"")?;
    let binary = dir.join("binary.txt");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x41])?;
    let short = dir.join("short.txt");
    std::fs::write(&short, "Too short for a window.")?;

    assert_clear_error(&["--steps", "0"], "invalid `steps`: must be at least 1")?;
    assert_clear_error(&["--micro-batch", "0"], "invalid `micro_batch`: must be at least 1")?;
    assert_clear_error(&["--accumulation-steps", "0"], "invalid `accumulation_steps`: must be at least 1")?;
    assert_clear_error(&["--seq-len", "0"], "invalid `seq_len`: must be at least 1")?;
    assert_clear_error(&["--seq-len", "64"], "sequence length 64 exceeds the model's context length 32")?;
    assert_clear_error(&["--heads", "3"], "invalid `n_head`: 3 heads do not divide the width 16")?;
    assert_clear_error(&["--layers", "0"], "invalid `n_layer`: must be at least 1")?;
    assert_clear_error(&["--lr", "-1"], "invalid `lr`")?;
    assert_clear_error(&["--dropout", "1.5"], "invalid `dropout`")?;
    assert_clear_error(&["--corpus", "/no/such/file.txt"], "cannot read `/no/such/file.txt`")?;
    assert_clear_error(&["--corpus", empty.to_str().unwrap_or_default()], "is empty")?;
    assert_clear_error(&["--corpus", binary.to_str().unwrap_or_default()], "is not UTF-8 text")?;
    assert_clear_error(
        &["--corpus", short.to_str().unwrap_or_default()],
        "fewer than the 33 one sequence needs",
    )?;
    assert_clear_error(&["--precision", "f8"], "unknown precision `f8`: expected f32, bf16 or f16")?;
    assert_clear_error(&["--loss-scaling", "maybe"], "invalid `--loss-scaling`")?;
    assert_clear_error(&["--device", "tpu"], "unknown or unavailable device `tpu`")?;
    assert_clear_error(&["--validation-fraction", "1.5"], "invalid `validation_fraction`")?;
    assert_clear_error(
        &["--recompute", "every:0"],
        "invalid `--recompute`: unknown recompute policy `every:0`",
    )?;
    // Checkpoints, resume and memory limits.
    let run_dir = dir.join("run");
    let run_dir = run_dir.to_str().unwrap_or_default();
    assert_clear_error(&["--checkpoint-every", "5"], "`--checkpoint-every` needs `--checkpoint-dir`")?;
    assert_clear_error(
        &["--checkpoint-dir", run_dir, "--keep-checkpoints", "0"],
        "invalid `keep_checkpoints`",
    )?;
    assert_clear_error(
        &["--checkpoint-dir", run_dir, "--checkpoint-every", "0"],
        "invalid `checkpoint_every`",
    )?;
    assert_clear_error(
        &["--max-memory", "12Q"],
        "invalid `--max-memory`: `12Q` is not a positive byte count",
    )?;
    assert_clear_error(&["--max-memory", "0"], "invalid `--max-memory`")?;
    assert_clear_error(&["--resume", "/no/such/run"], "no such checkpoint or run directory")?;
    let written =
        run(&tiny_with(&["--checkpoint-dir", run_dir]).iter().map(String::as_str).collect::<Vec<_>>())?;
    assert_eq!(written.0, 0, "{}", written.2);
    assert_clear_error(
        &["--resume", run_dir, "--seed", "5"],
        "it was written with seed 0, but this run has seed 5",
    )?;
    assert_clear_error(
        &["--resume", run_dir, "--width", "32"],
        "in this model (another model or precision)",
    )?;
    assert_clear_error(&["--resume", dir.to_str().unwrap_or_default()], "holds no checkpoint")?;
    assert_clear_error(&["--max-memory", "1K"], "out of memory on cpu")?;
    assert_clear_error(
        &["--zero", "1", "--world-size", "2", "--resume", run_dir],
        "a sharded run resumes only sharded checkpoints",
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_tiny_run_reports_losses_entropy_and_saves_loadable_weights() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("candle-fit-cli-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let weights = dir.join("model.safetensors");
    let metrics = dir.join("metrics.jsonl");
    let args = tiny_with(&[
        "--save",
        weights.to_str().unwrap_or_default(),
        "--metrics",
        metrics.to_str().unwrap_or_default(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = run(&refs)?;
    assert_eq!(code, 0, "{stderr}");
    for expected in [
        "unigram byte entropy",
        "validation loss before training",
        "validation loss after 3 steps",
        "peak heap",
    ] {
        assert!(stdout.contains(expected), "missing `{expected}` in {stdout}");
    }
    let lines = std::fs::read_to_string(&metrics)?;
    assert_eq!(lines.lines().count(), 3);
    for line in lines.lines() {
        let record: serde_json::Value = serde_json::from_str(line)?;
        assert!(record["loss"].as_f64().is_some_and(f64::is_finite));
    }
    let tensors = candle::safetensors::load(&weights, &candle::Device::Cpu)?;
    for name in ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.0.mlp.c_proj.bias", "ln_f.weight"] {
        assert!(tensors.contains_key(name), "{name} missing from saved weights");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn bench_writes_every_schema_field_and_refuses_unknown_configurations() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("candle-fit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("rows.json");
    let chart = dir.join("chart.svg");
    let (code, stdout, stderr) = run(&[
        "bench",
        "--configs",
        "fp32,recompute-all,accum4",
        "--layers",
        "2",
        "--width",
        "32",
        "--batch",
        "4",
        "--seq-len",
        "16",
        "--steps",
        "5",
        "--warmup",
        "1",
        "--eval-windows",
        "2",
        "--json",
        json.to_str().unwrap_or_default(),
        "--chart",
        chart.to_str().unwrap_or_default(),
    ])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("| L2-W32 | recompute-all |"), "{stdout}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(rows.len(), 3);
    for row in &rows {
        for key in [
            "config",
            "model",
            "framework",
            "device",
            "precision",
            "micro_batch",
            "accum_steps",
            "world_size",
            "peak_bytes",
            "memory_source",
            "tf32",
            "bytes_by_category",
            "predicted_peak_bytes",
            "step_time_s",
            "tokens_per_s",
            "final_loss",
        ] {
            assert!(row.get(key).is_some(), "missing `{key}` in {row}");
        }
        assert!(row["peak_bytes"].as_u64().is_some_and(|b| b > 0));
        assert_eq!(row["framework"], "candle-fit");
        assert_eq!(row["memory_source"], "heap");
        assert_eq!(row["tf32"], false);
        assert!(row["step_time_s"]["min"].as_f64() <= row["step_time_s"]["median"].as_f64());
    }
    assert_eq!(rows[0]["peak_vs_baseline"].as_f64(), Some(1.0));
    let svg = std::fs::read_to_string(&chart)?;
    assert!(svg.starts_with("<svg") && svg.contains("L2-W32 recompute-all") && svg.contains("activations"));
    assert_eq!(rows[2]["micro_batch"].as_u64(), Some(1));
    assert_eq!(rows[2]["accum_steps"].as_u64(), Some(4));

    let (code, stdout, stderr) = run(&[
        "bench",
        "--model",
        "llama",
        "--configs",
        "fp32",
        "--layers",
        "1",
        "--width",
        "32",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--eval-windows",
        "1",
    ])?;
    assert_eq!(code, 0, "{stderr}");
    let row = stdout.lines().find(|l| l.starts_with("| LLaMA-L1-W32 | fp32 |")).unwrap_or_default();
    // The predicted column (the twelfth) holds the estimator's MiB.
    let predicted = row.split('|').nth(12).map(str::trim).unwrap_or_default();
    assert!(predicted.parse::<f64>().is_ok(), "{stdout}");
    let (code, _, stderr) = run(&["bench", "--model", "bert"])?;
    assert_ne!(code, 0);
    assert!(stderr.contains("invalid `--model bert`"), "{stderr}");
    let (code, _, stderr) = run(&["bench", "--configs", "fp32,turbo"])?;
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown benchmark configuration `turbo`: known ones are fp32"), "{stderr}");
    let (code, _, stderr) = run(&["bench", "--configs", "accum4", "--batch", "6"])?;
    assert_ne!(code, 0);
    assert!(stderr.contains("does not divide the batch of 6"), "{stderr}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn estimate_predicts_the_measured_peak_without_training() -> anyhow::Result<()> {
    let mut args = tiny_with(&[]);
    args[0] = "estimate".into();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = run(&refs)?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("predicted peak heap of a training step:"), "{stdout}");
    for category in ["parameters", "gradients", "optimizer_state", "activations", "h.0"] {
        assert!(stdout.contains(category), "missing `{category}` in {stdout}");
    }
    for (family, block) in [("llama", "model.layers.0"), ("bert", "encoder.layer.0")] {
        let mut args = tiny_with(&["--model", family, "--vocab", "300"]);
        args[0] = "estimate".into();
        let (code, stdout, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains(&family.to_uppercase()) && stdout.contains(block), "{stdout}");
    }
    // LoRA (finetune's default targets) and QLoRA: the frozen base named, the flags checked as
    // finetune checks them.
    for (extra, expected) in [
        (&["--lora-rank", "4"][..], "LoRA rank 4 alpha 8 on q_proj,v_proj over a frozen f32 base"),
        (
            &["--lora-rank", "2", "--lora-targets", "all-linear", "--quantize-base", "q8_0"][..],
            "LoRA rank 2 alpha 4 on all-linear over a frozen q8_0 base",
        ),
    ] {
        let mut args =
            tiny_with(&[&["--model", "llama", "--width", "32", "--intermediate", "64"], extra].concat());
        args[0] = "estimate".into();
        let (code, stdout, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains(expected) && stdout.contains("per model parameter"), "{stdout}");
    }
    for (extra, expected) in [
        (&["--model", "llama", "--quantize-base", "nf4"][..], "`--quantize-base` needs `--lora-rank`"),
        (&["--model", "llama", "--lora-targets", "q_proj"][..], "`--lora-targets` needs `--lora-rank`"),
        (&["--lora-rank", "2", "--quantize-base", "nf4"][..], "is a LLaMA's; this model is gpt"),
        (&["--model", "bert", "--lora-rank", "2"][..], "LoRA is not available for a BERT classifier"),
        (
            &["--model", "llama", "--lora-rank", "2", "--quantize-base", "nf5"][..],
            "invalid `--quantize-base`",
        ),
    ] {
        let mut args = tiny_with(extra);
        args[0] = "estimate".into();
        let (code, _, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        assert_ne!(code, 0, "{extra:?}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
    let mut bad = tiny_with(&["--recompute", "sometimes"]);
    bad[0] = "estimate".into();
    let refs: Vec<&str> = bad.iter().map(String::as_str).collect();
    let (code, _, stderr) = run(&refs)?;
    assert_ne!(code, 0);
    assert!(stderr.contains("unknown recompute policy `sometimes`"), "{stderr}");
    // Sharded: rank 0's model state per stage against REFERENCE.md's formula (the tiny model's
    // flat buffers pad a little), stage 3 with its gathered segment.
    for zero in ["0", "1", "2", "3"] {
        let mut args = tiny_with(&["--micro-batch", "4", "--zero", zero, "--world-size", "4"]);
        args[0] = "estimate".into();
        let (code, stdout, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.starts_with(&format!("ZeRO {zero} on 4 ranks, rank 0")), "{stdout}");
        let ratio: f64 = stdout
            .lines()
            .find_map(|l| l.split("(ratio ").nth(1))
            .and_then(|r| r.trim_end_matches(')').parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no ratio in {stdout}"))?;
        assert!((ratio - 1.0).abs() < 0.05, "{stdout}");
        assert_eq!(stdout.contains("gathered (at most)"), zero == "3", "{stdout}");
    }
    Ok(())
}

/// `--zero S --world-size N` trains on N in-process ranks and ends where one process ends
/// (F32; losses printed to 4 decimals); a stage that does not exist or a micro-batch too small
/// to split is one clear line.
#[test]
fn sharded_training_on_in_process_ranks_matches_one_process() -> anyhow::Result<()> {
    let final_loss = |stdout: &str| -> Option<String> {
        let line = stdout.lines().find(|l| l.starts_with("validation loss after"))?;
        line.split_whitespace().nth(5).map(str::to_string)
    };
    let args = tiny_with(&["--micro-batch", "4"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, single, stderr) = run(&refs)?;
    assert_eq!(code, 0, "{stderr}");
    let expected = final_loss(&single).ok_or_else(|| anyhow::anyhow!("no final loss in {single}"))?;
    for zero in ["0", "1", "2", "3"] {
        let args = tiny_with(&["--micro-batch", "4", "--zero", zero, "--world-size", "2"]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = run(&refs)?;
        assert_eq!(code, 0, "--zero {zero}: {stderr}");
        assert!(stdout.contains("on 2 in-process ranks"), "{stdout}");
        assert!(stdout.contains("rank 1"), "{stdout}");
        assert_eq!(final_loss(&stdout), Some(expected.clone()), "--zero {zero}: {stdout}");
    }
    // A sharded run checkpointed at every step on 2 ranks, resumed from step 2 on 3 ranks at
    // stage 3, ends where one process ends.
    let dir = std::env::temp_dir().join(format!("candle-fit-cli-sharded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run_dir = dir.to_str().unwrap_or_default();
    let args = tiny_with(&[
        "--micro-batch",
        "4",
        "--zero",
        "2",
        "--world-size",
        "2",
        "--checkpoint-dir",
        run_dir,
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "3",
    ]);
    let (code, _, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert_eq!(code, 0, "{stderr}");
    let step2 = dir.join("step-00000002");
    let args = tiny_with(&[
        "--micro-batch",
        "4",
        "--zero",
        "3",
        "--world-size",
        "3",
        "--resume",
        step2.to_str().unwrap_or_default(),
    ]);
    let (code, stdout, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("resumed       from step 2"), "{stdout}");
    assert_eq!(final_loss(&stdout), Some(expected.clone()), "resumed: {stdout}");
    std::fs::remove_dir_all(&dir)?;
    let args = tiny_with(&["--zero", "4", "--world-size", "2"]);
    let (code, _, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert!(code != 0 && stderr.contains("4 is not in 0..=3"), "{stderr}");
    assert_clear_error(&["--zero", "1", "--world-size", "3"], "cannot be split over 3 ranks")?;
    Ok(())
}

/// `launch --nproc 2 -- train ... --zero S` runs two processes that rendezvous over TCP (the
/// launcher sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun does) and end where
/// one process ends; each rank reports its own peak heap.
#[test]
fn launched_processes_train_like_one_process() -> anyhow::Result<()> {
    let final_loss = |stdout: &str| -> Option<String> {
        let line = stdout.lines().find(|l| l.starts_with("validation loss after"))?;
        line.split_whitespace().nth(5).map(str::to_string)
    };
    let args = tiny_with(&["--micro-batch", "4"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, single, stderr) = run(&refs)?;
    assert_eq!(code, 0, "{stderr}");
    let expected = final_loss(&single).ok_or_else(|| anyhow::anyhow!("no final loss in {single}"))?;
    for zero in ["1", "2", "3"] {
        let mut launch: Vec<String> =
            ["launch", "--nproc", "2", "--"].iter().map(|s| s.to_string()).collect();
        launch.extend(tiny_with(&["--micro-batch", "4", "--zero", zero]));
        let refs: Vec<&str> = launch.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = run(&refs)?;
        assert_eq!(code, 0, "--zero {zero}: {stderr}");
        assert!(stdout.contains("on 2 processes (TCP)"), "{stdout}");
        assert_eq!(stdout.matches("peak heap during a step").count(), 2, "{stdout}");
        assert_eq!(final_loss(&stdout), Some(expected.clone()), "--zero {zero}: {stdout}");
    }
    Ok(())
}

#[test]
fn the_offloaded_optimizer_and_its_benchmark_run_from_the_command_line() -> anyhow::Result<()> {
    let mut args = tiny_with(&["--optimizer", "adamw8bit"]);
    args.push("--offload-optimizer".into());
    let (code, stdout, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("8-bit AdamW (offloaded)"), "{stdout}");

    let mut sharded = tiny_with(&["--zero", "1", "--world-size", "2"]);
    sharded.push("--offload-optimizer".into());
    let (code, _, stderr) = run(&sharded.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert_ne!(code, 0);
    assert!(stderr.contains("invalid `--offload-optimizer`") && !stderr.contains("panicked"), "{stderr}");

    let (code, stdout, stderr) = run(&["bench-optimizer", "--params", "70000", "--repeats", "1"])?;
    assert_eq!(code, 0, "{stderr}");
    // The streaming kernels run over AdamW's footprint, 16 bytes per parameter: copy over two
    // arrays of 2n values, scale over one of 4n.
    for kernel in [
        "| copy | 1 | 140000 |",
        "| scale | 1 | 280000 |",
        "| adamw | 1 | 70000 |",
        "| adamw8bit | 1 | 70000 |",
    ] {
        assert!(stdout.contains(kernel), "missing `{kernel}` in {stdout}");
    }
    let (code, _, stderr) = run(&["bench-optimizer", "--params", "0"])?;
    assert_ne!(code, 0);
    assert!(stderr.contains("invalid `--params`"), "{stderr}");
    Ok(())
}

/// Runs the binary with `args`, killing it after `limit`: `None` when it was still running
/// (a huge count that is simply long, accepted), else its exit code (`None` for a signal is
/// reported as -1) and stderr.
fn run_bounded(args: &[String], limit: std::time::Duration) -> anyhow::Result<Option<(i32, String)>> {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_candle-fit"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                e.read_to_string(&mut stderr)?;
            }
            return Ok(Some((status.code().unwrap_or(-1), stderr)));
        }
        if started.elapsed() > limit {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn u64_max_scale_values_in_every_numeric_flag_are_refused_or_run_never_crash() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("candle-fit-cli-huge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    const HUGE: &str = "18446744073709551615";
    const HUGE_F: &str = "1e308";
    let tiny_train: Vec<String> = TINY.iter().map(|s| s.to_string()).collect();
    let mut tiny_estimate = tiny_train.clone();
    tiny_estimate[0] = "estimate".into();
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let bench = strs(&[
        "bench",
        "--configs",
        "fp32",
        "--layers",
        "1",
        "--width",
        "32",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--eval-windows",
        "1",
    ]);
    let optim = strs(&["bench-optimizer", "--params", "1000", "--repeats", "1"]);
    let mut launch = strs(&["launch", "--nproc", "1", "--"]);
    launch.extend(tiny_train.clone());
    let train_flags: &[(&str, &str)] = &[
        ("--validation-fraction", HUGE_F),
        ("--steps", HUGE),
        ("--micro-batch", HUGE),
        ("--accumulation-steps", HUGE),
        ("--seq-len", HUGE),
        ("--lr", HUGE_F),
        ("--warmup-steps", HUGE),
        ("--max-grad-norm", HUGE_F),
        ("--weight-decay", HUGE_F),
        ("--layers", HUGE),
        ("--width", HUGE),
        ("--heads", HUGE),
        ("--context", HUGE),
        ("--dropout", HUGE_F),
        ("--seed", HUGE),
        ("--eval-interval", HUGE),
        ("--eval-windows", HUGE),
        ("--keep-checkpoints", HUGE),
        ("--checkpoint-every", HUGE),
        ("--world-size", HUGE),
        ("--comm-timeout", HUGE),
        ("--max-memory", HUGE),
        ("--max-memory", "18446744073709551615G"),
        ("--zero", HUGE),
    ];
    let mut cases: Vec<(String, Vec<String>)> = Vec::new();
    for base in [&tiny_train, &tiny_estimate] {
        for (flag, value) in train_flags {
            let mut args = base.clone();
            if let Some(i) = args.iter().position(|a| a == flag) {
                args[i + 1] = value.to_string();
            } else {
                args.extend([flag.to_string(), value.to_string()]);
            }
            if flag.starts_with("--checkpoint-every") || flag.starts_with("--keep") {
                let run_dir = dir.join(format!("run-{}-{}", base[0], cases.len()));
                args.extend(["--checkpoint-dir".to_string(), run_dir.display().to_string()]);
            }
            cases.push((format!("{} {flag} {value}", base[0]), args));
        }
    }
    for (base, flags) in [
        (
            &bench,
            &[
                "--layers",
                "--width",
                "--batch",
                "--seq-len",
                "--steps",
                "--warmup",
                "--eval-windows",
                "--seed",
                "--lr",
            ][..],
        ),
        (&optim, &["--params", "--repeats"][..]),
        (&launch, &["--nproc", "--master-port"][..]),
    ] {
        for flag in flags {
            let value = if *flag == "--lr" { HUGE_F } else { HUGE };
            let mut args = base.clone();
            match args.iter().position(|a| a == flag) {
                Some(i) => args[i + 1] = value.to_string(),
                None => args.splice(1..1, [flag.to_string(), value.to_string()]).for_each(drop),
            }
            cases.push((format!("{} {flag} {value}", base[0]), args));
        }
    }
    for (what, args) in &cases {
        let outcome = run_bounded(args, std::time::Duration::from_secs(4))?;
        eprintln!(
            "{what}: {}",
            outcome
                .as_ref()
                .map_or("still running (killed)".into(), |(c, e)| format!("exit {c} {}", e.trim()))
        );
        match outcome {
            None => {} // still running: a long but valid request
            Some((code, stderr)) => {
                assert!(
                    !stderr.contains("panicked") && !stderr.contains("memory allocation"),
                    "{what}: {stderr}"
                );
                assert!(code == 0 || code == 2, "{what}: exit {code} (a crash or signal): {stderr}");
                if code == 2 {
                    assert!(stderr.starts_with("error"), "{what}: {stderr}");
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn outputs_are_checked_before_training_and_never_overwrite_inputs() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("candle-fit-cli-outputs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, candle_fit::BUNDLED_CORPUS.get(..20_000).unwrap_or_default())?;
    let corpus_s = corpus.display().to_string();
    let original = std::fs::read(&corpus)?;
    assert_clear_error(&["--corpus", &corpus_s, "--save", &corpus_s], "invalid `--save`")?;
    assert_clear_error(&["--corpus", &corpus_s, "--metrics", &corpus_s], "invalid `--metrics`")?;
    assert_eq!(std::fs::read(&corpus)?, original, "the corpus was written");
    // Nothing is written into the checkpoint being resumed; its run directory may hold metrics.
    let run_dir = dir.join("run");
    let run_s = run_dir.display().to_string();
    let written = run(&tiny_with(&["--corpus", &corpus_s, "--checkpoint-dir", &run_s])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())?;
    assert_eq!(written.0, 0, "{}", written.2);
    let inside = run_dir.join("step-00000003").join("w.safetensors").display().to_string();
    assert_clear_error(&["--corpus", &corpus_s, "--resume", &run_s, "--save", &inside], "invalid `--save`")?;
    let metrics = run_dir.join("metrics.jsonl").display().to_string();
    let resumed = run(&tiny_with(&["--corpus", &corpus_s, "--resume", &run_s, "--metrics", &metrics])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())?;
    assert_eq!(resumed.0, 0, "{}", resumed.2);
    // Unwritable places fail at once, before a step (the error names the flag).
    assert_clear_error(&["--save", "/no/such/dir/w.safetensors"], "invalid `--save`")?;
    assert_clear_error(&["--metrics", "/no/such/dir/m.jsonl"], "invalid `--metrics`")?;
    assert_clear_error(&["--save", dir.to_str().unwrap_or_default()], "is a directory")?;
    // --max-grad-norm: 0 disables clipping; NaN and negatives are refused, like inf.
    for bad in ["NaN", "-1", "inf"] {
        assert_clear_error(&["--max-grad-norm", bad], "invalid `max_grad_norm`")?;
    }
    // An OS error is printed once.
    let args = tiny_with(&["--corpus", "/no/such/file.txt"]);
    let (_, _, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert_eq!(stderr.matches("os error 2").count(), 1, "{stderr}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The live children of `parent` with their `RANK` (Linux `/proc`); zombies count as gone.
#[cfg(target_os = "linux")]
fn ranks_of(parent: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`: the fields after the last ')'.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        if fields.first() == Some(&"Z") || fields.get(1).and_then(|p| p.parse::<u32>().ok()) != Some(parent) {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let rank = environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(b"RANK="))
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .unwrap_or_default();
        out.push((pid, rank));
    }
    out
}

#[cfg(target_os = "linux")]
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.split_whitespace().next() != Some("Z")))
        .unwrap_or(false)
}

#[cfg(target_os = "linux")]
#[test]
fn launch_names_a_rank_killed_by_a_signal_and_its_ranks_die_with_it() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let mut args: Vec<String> = ["launch", "--nproc", "2", "--"].iter().map(|s| s.to_string()).collect();
    args.extend(tiny_with(&[
        "--micro-batch",
        "4",
        "--zero",
        "1",
        "--steps",
        "100000",
        "--comm-timeout",
        "20",
    ]));
    let start = |args: &[String]| -> anyhow::Result<(std::process::Child, Vec<(u32, String)>)> {
        let child = Command::new(env!("CARGO_BIN_EXE_candle-fit"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let started = Instant::now();
        loop {
            let ranks = ranks_of(child.id());
            if ranks.len() == 2 || started.elapsed() > Duration::from_secs(30) {
                return Ok((child, ranks));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // A rank killed by SIGKILL is named, with its signal, not the peer that lost it.
    let (child, ranks) = start(&args)?;
    let victim = ranks.iter().find(|(_, r)| r == "1").map(|(p, _)| *p);
    let victim = victim.ok_or_else(|| anyhow::anyhow!("rank 1 not found among {ranks:?}"))?;
    std::thread::sleep(Duration::from_millis(500)); // let the group form
    Command::new("kill").args(["-KILL", &victim.to_string()]).status()?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("rank 1 of 2 was killed by signal 9 (SIGKILL)"), "{stderr}");

    // The launcher killed with SIGKILL: its ranks stop by themselves, not training on.
    let (mut child, ranks) = start(&args)?;
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    child.kill()?;
    child.wait()?;
    let killed = Instant::now();
    while ranks.iter().any(|(p, _)| alive(*p)) && killed.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let orphans: Vec<u32> = ranks.iter().map(|(p, _)| *p).filter(|p| alive(*p)).collect();
    for p in &orphans {
        let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
    }
    assert!(orphans.is_empty(), "ranks {orphans:?} outlived their launcher");
    Ok(())
}
