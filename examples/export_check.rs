//! Writes the two kinds of Hugging Face folder this crate exports, from the packaged models,
//! each with a `reference.json` of this crate's tokenization and F32 logits, for
//! `scripts/check_hf_export.py` to compare against `transformers`:
//!
//! - `DIR/llama`: SmolLM2-135M-Instruct (dequantized to F32) through `export::save_llama`;
//! - `DIR/bert`: all-MiniLM-L6-v2 with [CLS] + its pretrained pooler and a new 3-label head
//!   (seed 3) through `export::save_classifier`.
//!
//! ```text
//! cargo run --release --example export_check -- DIR
//! python3 scripts/check_hf_export.py DIR
//! ```

use std::path::PathBuf;

use anyhow::Context;
use candle::{DType, Device, Tensor};
use candle_fit::export::{save_classifier, save_llama};
use candle_fit::pretrained::{MiniLmFiles, SmolLm2Files};
use candle_fit::train::models::{BertClassifier, Pooling};
use serde_json::json;

const LM_TEXT: &str = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n";
const SENTENCES: [&str; 3] =
    ["The film was a delight from start to finish.", "I want my money back.", "It rained all day in Paris."];

fn main() -> anyhow::Result<()> {
    let dir: PathBuf = std::env::args().nth(1).context("usage: export_check DIR")?.into();
    let device = Device::Cpu;

    let files = SmolLm2Files::locate()?;
    let (model, tokenizer) = (files.model(DType::F32, &device)?, files.tokenizer()?);
    let llama_dir = dir.join("llama");
    save_llama(&model, &tokenizer, &llama_dir)?;
    let ids = tokenizer.encode(LM_TEXT)?;
    let logits = model.logits(&Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?)?.squeeze(0)?;
    let reference = json!({"text": LM_TEXT, "input_ids": ids, "logits": logits.to_vec2::<f32>()?});
    std::fs::write(llama_dir.join("reference.json"), serde_json::to_string(&reference)?)?;
    println!("wrote {} ({} tokens)", llama_dir.display(), ids.len());

    let files = MiniLmFiles::locate()?;
    let encoder = files.encoder(DType::F32, &device)?;
    let labels: Vec<String> = ["positive", "negative", "weather"].map(String::from).to_vec();
    let classifier = BertClassifier::with_pooling(encoder, labels.len(), Pooling::ClsPooler, 3)?;
    classifier.load_pooler(&files.weights)?;
    let bert_dir = dir.join("bert");
    let model_dir = files.config.parent().context("the package's model folder")?;
    save_classifier(&classifier, &labels, model_dir, &bert_dir)?;
    let batch = files.tokenizer(128)?.encode(&SENTENCES, &device)?;
    let logits = classifier.logits(&batch.ids, &batch.token_types, &batch.mask)?;
    let reference = json!({
        "texts": SENTENCES,
        "input_ids": batch.ids.to_vec2::<u32>()?,
        "attention_mask": batch.mask.to_vec2::<u32>()?,
        "logits": logits.to_vec2::<f32>()?,
    });
    std::fs::write(bert_dir.join("reference.json"), serde_json::to_string(&reference)?)?;
    println!("wrote {}", bert_dir.display());
    Ok(())
}
