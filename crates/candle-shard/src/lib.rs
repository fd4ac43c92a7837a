//! Data-parallel training with ZeRO-style sharding for candle-train: communicators, flat
//! parameter partitions, ZeRO stages 0-3 as candle-train [`Updater`](candle_train::Updater)s,
//! rank discovery from launcher variables, and a driver for N in-process ranks.
//!
//! - [`comm`]: the [`Communicator`](comm::Communicator) trait (all-reduce, reduce-scatter,
//!   all-gather, broadcast, barrier, each with a timeout, with byte counts), the in-process
//!   backend [`LocalGroup`](comm::LocalGroup) and a multi-process CPU backend over TCP
//!   [`TcpCommunicator`](comm::TcpCommunicator).
//! - [`partition`]: flat per-dtype buffers padded so each rank owns an equal contiguous slice.
//! - [`zero`]: [`ZeroUpdater`](zero::ZeroUpdater), stages 0-3; [`stage3`]:
//!   [`ShardedModel`](stage3::ShardedModel), the model wrapper of stage 3 that gathers each
//!   segment's parameters just before its forward or recompute and releases them after.
//! - [`checkpoint`]: sharded checkpoints (one file per rank and a manifest), resumable on any
//!   number of ranks.
//! - [`estimate`]: per-rank model-state bytes of each stage from shapes alone.
//! - [`discovery`]: rank discovery from torchrun and Slurm variables.
//! - [`driver`]: [`fit_rank`](driver::fit_rank), one rank over any communicator, and
//!   [`fit_in_process`](driver::fit_in_process), N ranks as threads.
//!
//! Two ranks of stage 1 train the same model as one rank on the same global batch:
//!
//! ```
//! use std::{num::NonZeroUsize, time::Duration};
//! use candle::{DType, Device};
//! use candle_shard::{driver::{fit_in_process, InProcessConfig}, ZeroStage};
//! use candle_train::{Corpus, Gpt, GptConfig, OptimizerConfig, Trainer, TrainerConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let text = "It is a truth universally acknowledged. ".repeat(40);
//! let corpus = Corpus::from_bytes("doc.txt".as_ref(), text.into_bytes(), 0.2)?;
//! let model = GptConfig { n_ctx: 16, n_embd: 16, n_layer: 1, n_head: 2, ..GptConfig::default() };
//! let trainer = Trainer::new(TrainerConfig::builder().micro_batch(4).seq_len(16).steps(5).eval_windows(4).build()?);
//! let config = InProcessConfig {
//!     world_size: NonZeroUsize::new(2).ok_or("2 > 0")?,
//!     stage: ZeroStage::Stage1,
//!     timeout: Duration::from_secs(60),
//! };
//! let optimizer = OptimizerConfig::AdamW(Default::default());
//! let ranks = fit_in_process(&config, &trainer, &corpus, &optimizer, |_rank| {
//!     Gpt::new(model, DType::F32, &Device::Cpu, 0)
//! })?;
//! assert!(ranks[0].report.final_val_loss < ranks[0].report.initial_val_loss);
//! assert_eq!(ranks[0].report.final_val_loss, ranks[1].report.final_val_loss);
//! # Ok(()) }
//! ```
//!
//! Under the `nccl` feature, module `nccl` holds an NCCL backend (`NcclCommunicator`, a
//! [`Communicator`](comm::Communicator) whose unique id travels over the TCP rendezvous): it
//! compiles in CI but has never run (no GPU yet).

#[cfg(feature = "nccl")]
pub mod nccl;

pub mod checkpoint;
pub mod comm;
pub mod device_zero;
pub mod discovery;
pub mod driver;
pub mod error;
pub mod estimate;
pub mod partition;
pub mod stage3;
pub mod zero;

pub use error::{CommError, Error, Result};

/// The ZeRO stages, all implemented by [`zero::ZeroUpdater`] (stage 3 with
/// [`stage3::ShardedModel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroStage {
    /// Plain data parallelism: gradients all-reduced, optimizer state replicated.
    Stage0,
    /// Optimizer state (and FP32 master weights) sharded.
    Stage1,
    /// Optimizer state and gradients sharded (reduced per segment during backward).
    Stage2,
    /// Optimizer state, gradients and parameters sharded (each segment's parameters gathered
    /// around its use).
    Stage3,
}

impl ZeroStage {
    /// The stage numbered `n` (0 to 3).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a number above 3.
    pub fn from_number(n: u8) -> Result<Self> {
        match n {
            0 => Ok(Self::Stage0),
            1 => Ok(Self::Stage1),
            2 => Ok(Self::Stage2),
            3 => Ok(Self::Stage3),
            _ => Err(Error::config("zero", format!("{n} is not a ZeRO stage (0 to 3)"))),
        }
    }
}
