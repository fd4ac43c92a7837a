//! Hugging Face model folders: what a fine-tuned model is saved as, so that `transformers`
//! (`AutoModelForCausalLM`, `AutoModelForSequenceClassification`, `AutoTokenizer`) and this
//! crate load it back.
//!
//! A LLaMA-family or GPT-2 folder holds `config.json` (`LlamaForCausalLM`, `MistralForCausalLM`,
//! `Qwen2ForCausalLM`, `Qwen3ForCausalLM` or `GPT2LMHeadModel`, with every field of the config it was loaded
//! from), `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template) and
//! `generation_config.json` (bos/eos/pad ids). A classifier folder holds `config.json`
//! (`BertForSequenceClassification`, `num_labels`, `id2label`, `label2id`),
//! `model.safetensors` (encoder and pooler under `bert.`, the head as `classifier.*`) and the
//! source model's tokenizer files.

use std::path::Path;

use anyhow::Context;
use candle::{DType, Device};
use candle_train::models::{BertClassifier, Gpt, Llama, LlamaConfig};
use serde_json::json;

use crate::gguf_tokenizer::LmTokenizer;

/// The tokenizer files copied from a BERT model folder into a classifier's export, when they
/// exist there.
pub const BERT_TOKENIZER_FILES: [&str; 4] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"];

/// Writes `model` and `tokenizer` as a Hugging Face folder of its family (LLaMA, Mistral,
/// Qwen2, Qwen3) in `dir` (created).
///
/// # Errors
/// When a file cannot be written, naming it.
pub fn save_llama(model: &Llama, tokenizer: &LmTokenizer, dir: &Path) -> anyhow::Result<()> {
    model.save_pretrained(dir).with_context(|| format!("saving the model into {}", dir.display()))?;
    save_lm_tokenizer(tokenizer, model.config().max_position_embeddings, dir)
}

/// Writes `model` and `tokenizer` as a Hugging Face GPT-2 folder in `dir` (created):
/// `config.json` (`GPT2LMHeadModel` with every field of the config it was loaded from),
/// `model.safetensors` (the names it was loaded with), and the tokenizer files as
/// [`save_llama`] writes them.
///
/// # Errors
/// When a file cannot be written, naming it.
pub fn save_gpt2(model: &Gpt, tokenizer: &LmTokenizer, dir: &Path) -> anyhow::Result<()> {
    model.save_pretrained(dir).with_context(|| format!("saving the model into {}", dir.display()))?;
    save_lm_tokenizer(tokenizer, model.config().n_ctx, dir)
}

/// `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` of a causal language
/// model of `max_length` positions.
fn save_lm_tokenizer(tokenizer: &LmTokenizer, max_length: usize, dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path).with_context(|| format!("writing {}", path.display()))?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer.tokenizer_config_json(max_length))?;
    write_json(&dir.join("generation_config.json"), &generation_config(tokenizer))
}

/// The `generation_config.json` for `tokenizer`'s special tokens (greedy decoding by default,
/// as `transformers` assumes without sampling fields).
pub fn generation_config(tokenizer: &LmTokenizer) -> serde_json::Value {
    json!({
        "bos_token_id": tokenizer.bos_id(),
        "eos_token_id": tokenizer.eos_id(),
        "pad_token_id": tokenizer.pad_id(),
        "do_sample": false,
    })
}

/// A LLaMA-family folder (as [`save_llama`] or `transformers` writes it) in `dtype` on
/// `device`, with its tokenizer.
///
/// # Errors
/// When `config.json`, `model.safetensors`, `tokenizer.json` or `tokenizer_config.json` does not
/// load, naming the file (and the field where one is at fault).
pub fn load_llama(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<(Llama, LmTokenizer)> {
    let config_path = dir.join("config.json");
    let config =
        LlamaConfig::from_json_file(&config_path).with_context(|| format!("{}", config_path.display()))?;
    let weights = dir.join("model.safetensors");
    let model = Llama::from_safetensors(&config, &weights, dtype, device)
        .with_context(|| format!("loading the LLaMA-family model from {}", weights.display()))?;
    Ok((model, load_lm_tokenizer(dir)?))
}

/// A GPT-2 folder (`GPT2LMHeadModel` or `GPT2Model`, as [`save_gpt2`] or `transformers` writes
/// it) in `dtype` on `device`, with its tokenizer; the bos/eos ids `tokenizer_config.json` does
/// not name come from `config.json`'s `bos_token_id`/`eos_token_id` (as in the Hub's `gpt2`).
///
/// # Errors
/// As [`load_llama`].
pub fn load_gpt2(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<(Gpt, LmTokenizer)> {
    let model = Gpt::from_pretrained(dir, dtype, device)
        .with_context(|| format!("loading the GPT-2 model in {}", dir.display()))?;
    let config_path = dir.join("config.json");
    let bytes = candle_train::io::read_bounded(&config_path, candle_train::io::MAX_CONFIG_BYTES)?;
    let config: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}", config_path.display()))?;
    let id = |field: &str| config.get(field).and_then(serde_json::Value::as_u64).map(|id| id as u32);
    let tokenizer = load_lm_tokenizer(dir)?.or_special_ids(id("bos_token_id"), id("eos_token_id"));
    Ok((model, tokenizer))
}

/// `tokenizer.json` with the special tokens and chat template of `tokenizer_config.json`
/// (when there is one) in `dir`.
fn load_lm_tokenizer(dir: &Path) -> anyhow::Result<LmTokenizer> {
    Ok(LmTokenizer::from_files(&dir.join("tokenizer.json"), &dir.join("tokenizer_config.json"))?)
}

/// Writes `model` as a Hugging Face `BertForSequenceClassification` folder in `dir` (created),
/// with label names `labels` and the tokenizer files ([`BERT_TOKENIZER_FILES`]) copied from
/// `tokenizer_dir` (the folder the encoder came from).
///
/// # Errors
/// A mean-pooling classifier is refused (it has no `transformers` equivalent); `labels` must
/// name every output; `tokenizer_dir` must hold `tokenizer.json`; a file-system error names
/// the file.
pub fn save_classifier(
    model: &BertClassifier,
    labels: &[String],
    tokenizer_dir: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let source = tokenizer_dir.join("tokenizer.json");
    anyhow::ensure!(source.is_file(), "{}: not found (the classifier's tokenizer)", source.display());
    model
        .save_pretrained(dir, labels)
        .with_context(|| format!("saving the classifier into {}", dir.display()))?;
    for name in BERT_TOKENIZER_FILES {
        let from = tokenizer_dir.join(name);
        if from.is_file() {
            let bytes = candle_train::io::read_bounded(&from, 1 << 30)?;
            candle_train::io::write_atomic(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    candle_train::io::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
