//! Precision, optimizers, gradient utilities, accumulation, memory accounting, trainable
//! layers and models, and the Trainer, on Candle.
//!
//! Every layer here has a real backward (Candle's fused norms and softmax have none and
//! silently drop gradients); models are cut into segments that `candle-ckpt` drives;
//! optimizers own their FP32 state.
//!
//! ```
//! use candle::{DType, Device};
//! use candle_train::{Corpus, Gpt, GptConfig, LocalUpdater, OptimizerConfig, Trainer, TrainerConfig};
//! # fn main() -> candle_train::Result<()> {
//! let text = "It is a truth universally acknowledged. ".repeat(40);
//! let corpus = Corpus::from_bytes("doc.txt".as_ref(), text.into_bytes(), 0.2)?;
//! let config = GptConfig { n_ctx: 16, n_embd: 16, n_layer: 1, n_head: 2, ..GptConfig::default() };
//! let model = Gpt::new(config, DType::F32, &Device::Cpu, 0)?;
//! let mut updater = LocalUpdater::from_config(model.parameters(), &OptimizerConfig::AdamW(Default::default()))?;
//! let trainer = Trainer::new(TrainerConfig::builder().micro_batch(4).seq_len(16).steps(20).eval_windows(8).build()?);
//! let report = trainer.fit(&model, &corpus, &mut updater)?;
//! assert!(report.final_val_loss < report.initial_val_loss);
//! # Ok(()) }
//! ```

pub mod callback;
pub mod checkpoint;
pub mod cpu_runtime;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod device;
pub mod error;
pub mod estimate;
pub mod evaluate;
pub mod generate;
pub mod host;
pub mod io;
pub mod layers;
pub mod lora;
pub mod loss_scale;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod module;
pub mod nn;
pub mod offload;
pub mod optim;
pub mod params;
pub mod precision;
pub mod quant;
pub mod schedule;
pub mod serve;
pub mod source;
pub mod trainer;
pub mod updater;

pub use callback::Callback;
/// The crates [`segmented_stack!`] expands to, so a crate using it needs no dependency of its
/// own on them.
#[doc(hidden)]
pub use {candle as __candle, candle_ckpt as __ckpt};

pub use data::{Corpus, Split};
pub use error::{Error, Result};
pub use estimate::{
    estimate_memory, estimate_stacked, EstimateInput, MemoryEstimate, ModelShape, StepSettings,
};
pub use evaluate::{ClassifierEvaluator, Evaluator, LossEvaluator, Metrics};
pub use loss_scale::{LossScaler, LossScalerConfig, ScaleDecision};
pub use memory::{CountingAllocator, DeviceMeter, MemoryReport};
pub use models::{Gpt, GptConfig, Llama, LlamaConfig, TokenBatch};
pub use optim::{AdamW, AdamWConfig, Optimizer, OptimizerConfig, Sgd, SgdConfig};
pub use params::{ParamBuilder, Parameter, Parameters};
pub use precision::Precision;
pub use schedule::LrSchedule;
pub use source::{Counted, DataShape, DataSource};
pub use trainer::{
    BackwardMode, CheckpointConfig, DataRank, Hooks, LanguageModel, MicroBatchSearch, MicroBatchTrial,
    OomRecovery, TrainReport, TrainableModel, Trainer, TrainerBuilder, TrainerConfig,
};
pub use updater::{LocalUpdater, StepReport, Transfers, Updater, UpdaterState};

#[cfg(test)]
#[global_allocator]
static ALLOC: memory::CountingAllocator = memory::CountingAllocator;
