//! ZeRO-style sharding of optimizer state, gradients and parameters across ranks.
//!
//! **Not implemented yet.** This crate holds only the module layout its issue will fill in;
//! nothing here trains or communicates today, and no type pretends to. The plan (see the
//! workspace's DESIGN notes and ARCHITECTURE.md):
//!
//! - `comm`: a `Communicator` trait (rank, world size, all-reduce, reduce-scatter,
//!   all-gather, broadcast, barrier, each with a timeout) with an in-process backend of N
//!   threads and an NCCL backend under the `nccl` feature;
//! - `partition`: flat per-dtype parameter buffers padded so each rank owns an equal
//!   contiguous slice;
//! - `zero`: stages 0-3, implementing candle-train's `Updater` trait for N ranks;
//! - `launch`: rank discovery from torchrun/Slurm variables and a local launcher.
//!
//! Under the `nccl` feature, module `nccl` holds the NCCL backend, self-contained until the
//! `Communicator` trait lands (its methods already have the trait's signatures).

#[cfg(feature = "nccl")]
pub mod nccl;

/// The ZeRO stages this crate will provide. Only a name for now: no stage is implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroStage {
    /// Plain data parallelism: gradients all-reduced, optimizer state replicated.
    Stage0,
    /// Optimizer state sharded.
    Stage1,
    /// Optimizer state and gradients sharded.
    Stage2,
    /// Optimizer state, gradients and parameters sharded.
    Stage3,
}
