//! candle-fit: train transformers on Candle that would not otherwise fit in memory.
//!
//! This facade re-exports the workspace's crates:
//!
//! - [`ckpt`] (`candle-ckpt`): the segmented forward/backward engine and recomputation;
//! - [`train`] (`candle-train`): layers, models, optimizers, memory accounting, the Trainer;
//! - [`shard`] (`candle-shard`): communicators and ZeRO stages 0-2 on N ranks.
//!
//! It also owns the `candle-fit` command-line tool, the examples, the integration tests and
//! the benchmarks.

pub mod bench;
pub mod chart;
pub mod datasets;
pub mod evaluation;
pub mod export;
pub mod finetune;
pub mod gguf_tokenizer;
pub mod model_source;
pub mod optim_bench;
pub mod pretrained;

pub use candle_ckpt as ckpt;
pub use candle_shard as shard;
pub use candle_train as train;

/// The bundled training corpus: Jane Austen's *Pride and Prejudice* (public domain).
pub const BUNDLED_CORPUS: &[u8] = include_bytes!("../data/austen/prideprejudice.txt");

/// The name the bundled corpus goes by in messages.
pub const BUNDLED_CORPUS_NAME: &str = "data/austen/prideprejudice.txt (bundled)";
