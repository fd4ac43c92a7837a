//! Models expressed as segments for the recompute engine, and pretrained encoders.

pub mod bert;
pub mod gpt;

pub use bert::{mean_pool, Bert, BertConfig, BertLayer};
pub use gpt::{Gpt, GptConfig, TokenBatch};
