//! Models expressed as segments for the recompute engine, and pretrained encoders and
//! decoders (Hugging Face safetensors, GGUF).

pub mod bert;
pub mod bert_classifier;
pub mod gguf;
pub mod gpt;
pub mod llama;

pub use bert::{mean_pool, Bert, BertConfig, BertLayer};
pub use bert_classifier::{BertClassifier, ClassificationBatch, Pooling};
pub use gguf::GgufFile;
pub use gpt::{Gpt, GptBlock, GptConfig, TokenBatch};
pub use llama::{DecoderLayer, KvCache, Llama, LlamaConfig};

/// [`crate::Error::InvalidConfig`] naming the first of `fields` whose value is zero.
pub(crate) fn check_positive(fields: &[(&'static str, usize)]) -> crate::Result<()> {
    match fields.iter().find(|(_, value)| *value == 0) {
        Some((field, _)) => Err(crate::Error::config(field, "must be at least 1")),
        None => Ok(()),
    }
}

/// A Hugging Face `config.json`: `config`'s fields with the fields of `extra` (an object)
/// inserted over them in order, pretty-printed.
pub(crate) fn hf_config_json(
    config: &impl serde::Serialize,
    extra: serde_json::Value,
) -> crate::Result<String> {
    let bad = |e: serde_json::Error| crate::Error::config("config.json", e.to_string());
    let mut value = serde_json::to_value(config).map_err(bad)?;
    if let (Some(map), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
        map.extend(extra);
    }
    serde_json::to_string_pretty(&value).map_err(bad)
}
