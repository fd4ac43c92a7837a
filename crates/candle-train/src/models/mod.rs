//! Models expressed as segments for the recompute engine.

pub mod gpt;

pub use gpt::{Gpt, GptConfig, TokenBatch};
