//! `candle-fit eval` and `candle-fit generate` on folders written by `candle_fit::export`
//! (a tiny LLaMA and a tiny BERT classifier with a 23-token tokenizer): the numbers they print
//! are the library's, and bad input is one clear line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle::{DType, Device, Tensor, D};
use candle_fit::export::{save_classifier, save_llama};
use candle_fit::train::generate::{generate, GenerationConfig};
use candle_fit::train::models::{Bert, BertClassifier, BertConfig, Llama, LlamaConfig, Pooling};
use common::tiny_tokenizer;

fn run(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out =
        Command::new(env!("CARGO_BIN_EXE_candle-fit")).args(args).env("CANDLE_NUM_THREADS", "1").output()?;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-fit-cli19-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn metric(stdout: &str, name: &str) -> anyhow::Result<f64> {
    let prefix = format!("{name}=");
    let value = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .ok_or_else(|| anyhow::anyhow!("no `{name}=` in {stdout}"))?;
    Ok(value.parse()?)
}

fn llama_folder(dir: &Path) -> anyhow::Result<Llama> {
    let model = Llama::new(&LlamaConfig::tiny(), DType::F32, &Device::Cpu, 8)?;
    save_llama(&model, &tiny_tokenizer()?, dir)?;
    Ok(model)
}

#[test]
fn eval_prints_the_language_models_loss_and_perplexity() -> anyhow::Result<()> {
    let dir = temp_dir("lm");
    let model = llama_folder(&dir)?;
    let data = dir.join("data.jsonl");
    std::fs::write(&data, "{\"prompt\": \"ab\", \"completion\": \"cde\"}\n")?;
    let (code, stdout, stderr) = run(&[
        "eval",
        "--model",
        dir.to_str().unwrap_or_default(),
        "--data",
        data.to_str().unwrap_or_default(),
    ])?;
    assert_eq!(code, 0, "{stderr}");
    // ids a b c d e <eos>; the loss counts the completion and eos: targets c d e <eos>.
    let ids = Tensor::new(&[[0u32, 1, 2, 3, 4]], &Device::Cpu)?;
    let log_probs =
        candle_nn::ops::log_softmax(&model.logits(&ids)?.squeeze(0)?, D::Minus1)?.to_vec2::<f32>()?;
    let expected = -[(1, 2), (2, 3), (3, 4), (4, 22)]
        .iter()
        .map(|&(row, id)| f64::from(log_probs[row][id]))
        .sum::<f64>()
        / 4.0;
    let (loss, perplexity) = (metric(&stdout, "loss")?, metric(&stdout, "perplexity")?);
    assert!((loss - expected).abs() < 1e-3, "printed {loss}, expected {expected}");
    assert!((perplexity - expected.exp()).abs() < 1e-2 * expected.exp(), "{perplexity}");
    assert_eq!(metric(&stdout, "tokens")?, 4.0);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn eval_prints_the_classifiers_accuracy_and_refuses_unknown_labels() -> anyhow::Result<()> {
    let (dir, tokenizer_dir) = (temp_dir("cls"), temp_dir("cls-tokenizer"));
    std::fs::create_dir_all(&tokenizer_dir)?;
    tiny_tokenizer()?.save(&tokenizer_dir.join("tokenizer.json"))?;
    let config = BertConfig { vocab_size: 23, ..BertConfig::tiny() };
    let encoder = Bert::new(&config, "", DType::F32, &Device::Cpu, 3)?;
    let model = BertClassifier::with_pooling(encoder, 2, Pooling::ClsPooler, 9)?;
    save_classifier(&model, &["ham".into(), "spam".into()], &tokenizer_dir, &dir)?;
    let texts = ["abc", "ddd", "ab ba", "r", "cab", "bbb"];
    let mut expected_correct = 0;
    let mut lines = String::new();
    for (i, text) in texts.iter().enumerate() {
        let ids: Vec<u32> = text.bytes().map(|b| if b == b' ' { 19 } else { u32::from(b - b'a') }).collect();
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let predicted =
            model.logits(&ids, &ids.zeros_like()?, &ids.ones_like()?)?.argmax(D::Minus1)?.to_vec1::<u32>()?
                [0];
        let label = i % 2;
        expected_correct += usize::from(predicted as usize == label);
        lines.push_str(&format!("{{\"text\": \"{text}\", \"label\": \"{}\"}}\n", ["ham", "spam"][label]));
    }
    let data = dir.join("data.jsonl");
    std::fs::write(&data, &lines)?;
    let dir_arg = dir.to_str().unwrap_or_default();
    let (code, stdout, stderr) =
        run(&["eval", "--model", dir_arg, "--data", data.to_str().unwrap_or_default(), "--batch", "4"])?;
    assert_eq!(code, 0, "{stderr}");
    let accuracy = metric(&stdout, "accuracy")?;
    assert!((accuracy - expected_correct as f64 / texts.len() as f64).abs() < 1e-4, "{stdout}");
    assert_eq!(metric(&stdout, "samples")?, texts.len() as f64);

    std::fs::write(
        &data,
        "{\"text\": \"abc\", \"label\": \"ham\"}\n{\"text\": \"abc\", \"label\": \"eggs\"}\n",
    )?;
    let (code, _, stderr) = run(&["eval", "--model", dir_arg, "--data", data.to_str().unwrap_or_default()])?;
    assert_eq!(code, 2);
    assert!(
        stderr.contains("data.jsonl:2") && stderr.contains("`label`") && stderr.contains("eggs"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    std::fs::write(&data, "{\"text\": \"abc\"}\n")?;
    let (code, _, stderr) = run(&["eval", "--model", dir_arg, "--data", data.to_str().unwrap_or_default()])?;
    assert_eq!(code, 2);
    assert!(stderr.contains("classifier"), "{stderr}");
    std::fs::remove_dir_all(&dir)?;
    std::fs::remove_dir_all(&tokenizer_dir)?;
    Ok(())
}

#[test]
fn bad_model_paths_are_one_clear_line() -> anyhow::Result<()> {
    let dir = temp_dir("bad");
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"abc\"}\n")?;
    let data_arg = data.to_str().unwrap_or_default();
    let (code, _, stderr) = run(&["eval", "--model", "no-such-model", "--data", data_arg])?;
    assert_eq!(code, 2);
    assert!(stderr.contains("no-such-model") && stderr.contains("smollm2"), "{stderr}");
    std::fs::write(
        dir.join("config.json"),
        "{\"architectures\": [\"PhiForCausalLM\"], \"model_type\": \"phi\"}",
    )?;
    let (code, _, stderr) = run(&["eval", "--model", dir.to_str().unwrap_or_default(), "--data", data_arg])?;
    assert_eq!(code, 2);
    assert!(
        stderr.contains("config.json")
            && stderr.contains("architectures")
            && stderr.contains("PhiForCausalLM"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn generate_streams_the_librarys_tokens_with_and_without_the_cache() -> anyhow::Result<()> {
    let dir = temp_dir("gen");
    let model = llama_folder(&dir)?;
    let tokenizer = tiny_tokenizer()?;
    let config = GenerationConfig { max_new_tokens: 6, stop_tokens: vec![22], ..GenerationConfig::default() };
    let tokens = generate(&model, &tokenizer.encode("abc")?, &config, |_| Ok(()))?;
    let kept: Vec<u32> = tokens.into_iter().filter(|&t| t != 22).collect();
    let expected = tokenizer.decode(&kept)?;
    let dir_arg = dir.to_str().unwrap_or_default();
    let args = ["generate", "--model", dir_arg, "--prompt", "abc", "--max-new-tokens", "6"];
    let (code, stdout, stderr) = run(&args)?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim_end_matches('\n'), expected);
    let (_, plain, _) = run(&[&args[..], &["--no-cache"]].concat())?;
    assert_eq!(plain, stdout);

    let sampled =
        [&args[..], &["--temperature", "1.2", "--top-k", "8", "--top-p", "0.95", "--seed", "4"]].concat();
    let (code, first, stderr) = run(&sampled)?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(run(&sampled)?.1, first, "the same seed gives the same text");

    let (code, _, stderr) = run(&[&args[..], &["--temperature", "1", "--top-p", "2"]].concat())?;
    assert_eq!(code, 2);
    assert!(stderr.contains("top_p"), "{stderr}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn generate_renders_a_messages_file_through_the_chat_template() -> anyhow::Result<()> {
    use candle_fit::datasets::{ChatTemplate, Message};
    let dir = temp_dir("messages");
    let model = llama_folder(&dir)?;
    let tokenizer = tiny_tokenizer()?;
    let conversation = [("system", "bad"), ("user", "abc"), ("assistant", "ed"), ("user", "fed")];
    let messages: Vec<Message> = conversation
        .iter()
        .map(|(role, content)| Message { role: (*role).into(), content: (*content).into() })
        .collect();
    let file = dir.join("chat.json");
    std::fs::write(&file, serde_json::to_string(&messages)?)?;
    // The library's tokens for the rendered conversation, with the assistant's opening.
    let template = ChatTemplate::new(common::TEMPLATE, "<|im_start|>", "<|im_end|>")?;
    let rendered = template.render(&messages, true)?;
    assert!(rendered.ends_with("<|im_start|>assistant\n"), "{rendered}");
    let config = GenerationConfig { max_new_tokens: 5, stop_tokens: vec![22], ..GenerationConfig::default() };
    let tokens = generate(&model, &tokenizer.encode(&rendered)?, &config, |_| Ok(()))?;
    let kept: Vec<u32> = tokens.into_iter().filter(|&t| t != 22).collect();
    let expected = tokenizer.decode(&kept)?;
    let (dir_arg, file_arg) = (dir.to_str().unwrap_or_default(), file.to_str().unwrap_or_default());
    let args = ["generate", "--model", dir_arg, "--messages", file_arg, "--max-new-tokens", "5"];
    let (code, stdout, stderr) = run(&args)?;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim_end_matches('\n'), expected);
    // `{"messages": [...]}` reads the same; one user message is `--chat --prompt`.
    std::fs::write(&file, serde_json::json!({ "messages": messages }).to_string())?;
    assert_eq!(run(&args)?.1, stdout);
    std::fs::write(&file, r#"[{"role": "user", "content": "abc"}]"#)?;
    let (code, single, stderr) = run(&args)?;
    assert_eq!(code, 0, "{stderr}");
    let chat = ["generate", "--model", dir_arg, "--prompt", "abc", "--chat", "--max-new-tokens", "5"];
    assert_eq!(run(&chat)?.1, single);

    // A bad file is one line naming the file and the field.
    for (content, field) in [
        (r#"[{"role": "user", "content": "abc"}, {"role": "assistant"}]"#, "messages[1].content"),
        (r#"[{"role": "user", "content": 3}]"#, "messages[0].content"),
        (r#"[{"content": "abc"}]"#, "messages[0].role"),
        (r#"[]"#, "empty"),
        (r#"{"turns": []}"#, "messages"),
        (r#"[{"role": "user""#, "not JSON"),
    ] {
        std::fs::write(&file, content)?;
        let (code, _, stderr) = run(&args)?;
        assert_eq!(code, 2, "{content}: {stderr}");
        assert!(stderr.contains(file_arg) && stderr.contains(field), "{content}: {stderr}");
    }
    let missing = dir.join("absent.json");
    let (code, _, stderr) =
        run(&["generate", "--model", dir_arg, "--messages", missing.to_str().unwrap_or_default()])?;
    assert_eq!(code, 2);
    assert!(stderr.contains("absent.json"), "{stderr}");
    // `--prompt` and `--messages` are one or the other.
    let (code, _, stderr) = run(&[&args[..], &["--prompt", "abc"]].concat())?;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--messages") && stderr.contains("--prompt"), "{stderr}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// GPT-2's key/value cache: the prompt in one pass, then one token at a time, gives the
/// logits of the whole sequence (within 1e-5 relative in F32: only the attention's summation
/// order differs), and `generate` the same tokens with and without it, greedy and sampled.
#[test]
fn gpt2_generates_the_same_tokens_with_and_without_the_cache() -> anyhow::Result<()> {
    use candle_fit::train::generate::Sampling;
    use candle_fit::train::models::{Gpt, GptConfig, KvCache};
    let config =
        GptConfig { vocab_size: 23, n_ctx: 24, n_embd: 16, n_layer: 2, n_head: 4, ..GptConfig::default() };
    let model = Gpt::new(config, DType::F32, &Device::Cpu, 11)?;
    let ids: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3];
    let whole = model.logits(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?.squeeze(0)?;
    let mut cache = KvCache::new();
    let prompt = Tensor::new(&ids[..4], &Device::Cpu)?.unsqueeze(0)?;
    let mut rows = vec![model.logits_cached(&prompt, &mut cache)?.squeeze(0)?];
    for &id in &ids[4..] {
        rows.push(model.logits_cached(&Tensor::new(&[[id]], &Device::Cpu)?, &mut cache)?.squeeze(0)?);
    }
    assert_eq!(cache.len(), ids.len());
    let cached = Tensor::cat(&rows, 0)?;
    let scale = whole.abs()?.max_all()?.to_scalar::<f32>()?;
    let difference = (cached - &whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(difference <= 1e-5 * scale, "cached logits differ by {difference} (scale {scale})");
    for sampling in
        [Sampling::Greedy, Sampling::Sample { temperature: 1.5, top_k: Some(10), top_p: Some(0.9) }]
    {
        let config =
            GenerationConfig { max_new_tokens: 12, sampling, seed: 7, ..GenerationConfig::default() };
        let cached = generate(&model, &ids[..3], &config, |_| Ok(()))?;
        let plain =
            generate(&model, &ids[..3], &GenerationConfig { use_cache: false, ..config }, |_| Ok(()))?;
        assert_eq!(cached.len(), 12);
        assert_eq!(cached, plain, "{sampling:?}");
    }
    Ok(())
}
