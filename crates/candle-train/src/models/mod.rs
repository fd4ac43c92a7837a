//! Models expressed as segments for the recompute engine, and pretrained encoders and
//! decoders (Hugging Face safetensors, GGUF).

pub mod bert;
pub mod bert_classifier;
pub mod gguf;
pub mod gpt;
pub mod gpt2;
pub mod llama;

pub use bert::{mean_pool, Bert, BertConfig, BertLayer};
pub use bert_classifier::{BertClassifier, ClassificationBatch, Pooling};
pub use gguf::GgufFile;
pub use gpt::{Gpt, GptBlock, GptConfig, TokenBatch};
pub use gpt2::{gpt2_config, GPT2_PREFIX};
pub use llama::{DecoderFamily, DecoderLayer, KvCache, Llama, Llama3RopeScaling, LlamaConfig};

/// [`crate::Error::InvalidConfig`] naming the first of `fields` whose value is zero.
pub(crate) fn check_positive(fields: &[(&'static str, usize)]) -> crate::Result<()> {
    match fields.iter().find(|(_, value)| *value == 0) {
        Some((field, _)) => Err(crate::Error::config(field, "must be at least 1")),
        None => Ok(()),
    }
}
