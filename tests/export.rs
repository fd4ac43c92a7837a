//! Hugging Face folders written by `candle_fit::export`: every file present and parseable with
//! the fields `transformers` reads, and the folder reloads here bit-identically. (The check that
//! `transformers` itself loads them to the same logits is `scripts/check_hf_export.py`, not run
//! in CI.)

mod common;

use common::{tiny_tokenizer, TEMPLATE};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use candle_fit::export::{load_llama, save_classifier, save_llama};
use candle_fit::train::models::{Bert, BertClassifier, BertConfig, Llama, LlamaConfig, Pooling};

fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("candle-fit-export-{name}-{}", std::process::id()))
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn values(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

#[test]
fn llama_folder_has_every_hugging_face_file_and_reloads_bit_identically() -> anyhow::Result<()> {
    let dir = temp_dir("llama");
    let tokenizer = tiny_tokenizer()?;
    let model = Llama::new(&LlamaConfig::tiny(), DType::F32, &Device::Cpu, 5)?;
    save_llama(&model, &tokenizer, &dir)?;

    let config = read_json(&dir.join("config.json"))?;
    assert_eq!(config["architectures"], serde_json::json!(["LlamaForCausalLM"]));
    assert_eq!(config["model_type"], "llama");
    let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
    assert_eq!(tokenizer_config["bos_token"], "<|im_start|>");
    assert_eq!(tokenizer_config["eos_token"], "<|im_end|>");
    assert_eq!(tokenizer_config["pad_token"], "<|endoftext|>");
    assert_eq!(tokenizer_config["chat_template"], TEMPLATE);
    assert_eq!(tokenizer_config["add_bos_token"], false);
    assert_eq!(tokenizer_config["model_max_length"], 32);
    assert_eq!(tokenizer_config["added_tokens_decoder"]["22"]["content"], "<|im_end|>");
    assert_eq!(tokenizer_config["added_tokens_decoder"]["22"]["special"], true);
    let generation = read_json(&dir.join("generation_config.json"))?;
    assert_eq!(generation["bos_token_id"], 21);
    assert_eq!(generation["eos_token_id"], 22);
    assert_eq!(generation["pad_token_id"], 20);
    let tokenizer_json = read_json(&dir.join("tokenizer.json"))?;
    assert_eq!(tokenizer_json["model"]["type"], "BPE");

    let (reloaded, reloaded_tokenizer) = load_llama(&dir, DType::F32, &Device::Cpu)?;
    for (a, b) in model.parameters().iter().zip(reloaded.parameters().iter()) {
        assert_eq!(a.name, b.name);
        assert_eq!(values(&a.tensor()?)?, values(&b.tensor()?)?, "{}", a.name);
    }
    assert_eq!(reloaded_tokenizer.bos_id(), Some(21));
    assert_eq!(reloaded_tokenizer.eos_id(), Some(22));
    assert_eq!(reloaded_tokenizer.pad_id(), Some(20));
    assert_eq!(reloaded_tokenizer.chat_template(), Some(TEMPLATE));
    let text = "abc<|im_end|>ra\n";
    assert_eq!(reloaded_tokenizer.encode(text)?, tokenizer.encode(text)?);
    assert_eq!(tokenizer.encode(text)?, vec![0, 1, 2, 22, 17, 0, 18]);
    let ids = Tensor::new(&[[0u32, 4, 9, 22, 3]], &Device::Cpu)?;
    assert_eq!(values(&model.logits(&ids)?)?, values(&reloaded.logits(&ids)?)?);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn bad_tokenizer_config_is_refused_naming_file_and_field() -> anyhow::Result<()> {
    let dir = temp_dir("badtok");
    save_llama(&Llama::new(&LlamaConfig::tiny(), DType::F32, &Device::Cpu, 5)?, &tiny_tokenizer()?, &dir)?;
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<|nope|>"}"#)?;
    let message = format!("{:#}", load_llama(&dir, DType::F32, &Device::Cpu).expect_err("refused"));
    assert!(message.contains("tokenizer_config.json") && message.contains("eos_token"), "{message}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tiny_bert() -> BertConfig {
    BertConfig { hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0, ..BertConfig::tiny() }
}

fn batch(vocab: usize) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let ids = Tensor::new(&[[1u32, 5, 7, 2, 0], [1, 3, 2, 0, 0]], &Device::Cpu)?;
    assert!(vocab > 7);
    let types = ids.zeros_like()?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 0, 0]], &Device::Cpu)?;
    Ok((ids, types, mask))
}

#[test]
fn classifier_pools_cls_through_the_pooler_as_bert_for_sequence_classification() -> anyhow::Result<()> {
    let config = tiny_bert();
    let encoder = Bert::new(&config, "", DType::F32, &Device::Cpu, 3)?;
    let model = BertClassifier::with_pooling(encoder, 3, Pooling::ClsPooler, 4)?;
    // Pooler pre-activations of order 1, where tanh is far from the identity.
    let pooler = model.parameters().get("pooler.dense.weight").expect("the pooler exists");
    pooler.var()?.set(&(pooler.tensor()? * 100.0)?)?;
    let (ids, types, mask) = batch(config.vocab_size)?;
    let hidden =
        model.encoder().forward(&ids, Some(&types), &mask, &mut candle_fit::ckpt::Rng::seeded(0), false)?;
    let get = |name: &str| model.parameters().get(name).expect("the parameter exists").tensor();
    let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
    let pooled =
        cls.matmul(&get("pooler.dense.weight")?.t()?)?.broadcast_add(&get("pooler.dense.bias")?)?.tanh()?;
    let expected = pooled.matmul(&get("classifier.weight")?.t()?)?.broadcast_add(&get("classifier.bias")?)?;
    let got = model.logits(&ids, &types, &mask)?;
    let (a, b) = (values(&expected)?, values(&got)?);
    assert!(
        values(&pooled)?.iter().any(|v| v.abs() > 0.5),
        "pre-activations large enough to tell tanh apart"
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{a:?} vs {b:?}");
    }
    Ok(())
}

#[test]
fn classifier_folder_is_bert_for_sequence_classification_and_reloads_bit_identically() -> anyhow::Result<()> {
    let (dir, tokenizer_dir) = (temp_dir("bert"), temp_dir("bert-tokenizer"));
    std::fs::create_dir_all(&tokenizer_dir)?;
    tiny_tokenizer()?.save(&tokenizer_dir.join("tokenizer.json"))?;
    std::fs::write(tokenizer_dir.join("vocab.txt"), "a\nb\n")?;
    let config = tiny_bert();
    let encoder = Bert::new(&config, "", DType::F32, &Device::Cpu, 3)?;
    let model = BertClassifier::with_pooling(encoder, 3, Pooling::ClsPooler, 4)?;
    let labels: Vec<String> = ["ham", "spam", "eggs"].map(String::from).to_vec();
    save_classifier(&model, &labels, &tokenizer_dir, &dir)?;

    let json = read_json(&dir.join("config.json"))?;
    assert_eq!(json["architectures"], serde_json::json!(["BertForSequenceClassification"]));
    assert_eq!(json["model_type"], "bert");
    assert_eq!(json["num_labels"], 3);
    assert_eq!(json["id2label"]["1"], "spam");
    assert_eq!(json["label2id"]["eggs"], 2);
    assert_eq!(json["hidden_size"], config.hidden_size);
    assert!(dir.join("tokenizer.json").is_file() && dir.join("vocab.txt").is_file());
    let saved: BTreeSet<String> =
        candle::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?.into_keys().collect();
    assert!(saved.contains("bert.pooler.dense.weight") && saved.contains("bert.pooler.dense.bias"));
    assert!(saved.contains("bert.embeddings.word_embeddings.weight"));
    assert!(saved.contains("classifier.weight") && saved.contains("classifier.bias"));
    assert!(saved.iter().all(|n| n.starts_with("bert.") || n.starts_with("classifier.")), "{saved:?}");

    let (reloaded, reloaded_labels) = BertClassifier::from_pretrained(&dir, DType::F32, &Device::Cpu)?;
    assert_eq!(reloaded_labels, labels);
    assert_eq!(reloaded.pooling(), Pooling::ClsPooler);
    let (ids, types, mask) = batch(config.vocab_size)?;
    assert_eq!(values(&model.logits(&ids, &types, &mask)?)?, values(&reloaded.logits(&ids, &types, &mask)?)?);
    std::fs::remove_dir_all(&dir)?;
    std::fs::remove_dir_all(&tokenizer_dir)?;
    Ok(())
}

#[test]
fn mean_pooling_classifier_export_is_refused_by_name() -> anyhow::Result<()> {
    let encoder = Bert::new(&tiny_bert(), "", DType::F32, &Device::Cpu, 3)?;
    let model = BertClassifier::new(encoder, 2, 4)?;
    let dir = temp_dir("mean");
    let message = model.save_pretrained(&dir, &["a".into(), "b".into()]).expect_err("refused").to_string();
    assert!(message.contains("pooling") && message.contains("BertForSequenceClassification"), "{message}");
    assert!(!dir.join("config.json").exists());
    Ok(())
}

#[test]
fn classifier_config_with_bad_labels_is_refused_naming_the_field() -> anyhow::Result<()> {
    let (dir, tokenizer_dir) = (temp_dir("badlabels"), temp_dir("badlabels-tokenizer"));
    std::fs::create_dir_all(&tokenizer_dir)?;
    tiny_tokenizer()?.save(&tokenizer_dir.join("tokenizer.json"))?;
    let encoder = Bert::new(&tiny_bert(), "", DType::F32, &Device::Cpu, 3)?;
    let model = BertClassifier::with_pooling(encoder, 2, Pooling::ClsPooler, 4)?;
    save_classifier(&model, &["x".into(), "y".into()], &tokenizer_dir, &dir)?;
    let path = dir.join("config.json");
    let mut json = read_json(&path)?;
    json["id2label"] = serde_json::json!({"0": "x", "2": "y"});
    std::fs::write(&path, serde_json::to_string(&json)?)?;
    let message =
        BertClassifier::from_pretrained(&dir, DType::F32, &Device::Cpu).expect_err("refused").to_string();
    assert!(message.contains("id2label"), "{message}");
    std::fs::remove_dir_all(&dir)?;
    std::fs::remove_dir_all(&tokenizer_dir)?;
    Ok(())
}
