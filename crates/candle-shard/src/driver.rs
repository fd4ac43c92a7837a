//! Data-parallel training: [`fit_rank`] runs one rank over any communicator;
//! [`fit_in_process`] runs N of them as threads, each with its own model copy, [`ZeroUpdater`]
//! and communicator of one [`LocalGroup`].

use std::num::NonZeroUsize;
use std::time::Duration;

use candle_train::updater::StateBytes;
use candle_train::{Corpus, LanguageModel, OptimizerConfig, TrainReport, Trainer, Updater};

use crate::comm::{CommStats, LocalGroup};
use crate::error::{Error, Result};
use crate::zero::{segment_units, ZeroUpdater};
use crate::ZeroStage;

/// How to run the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InProcessConfig {
    /// Number of ranks (threads).
    pub world_size: NonZeroUsize,
    /// The ZeRO stage (0, 1 or 2).
    pub stage: ZeroStage,
    /// How long a collective waits for a peer before failing.
    pub timeout: Duration,
}

/// What one rank ended with.
#[derive(Debug)]
pub struct RankRun<M> {
    /// The rank.
    pub rank: usize,
    /// Its model, trained.
    pub model: M,
    /// Its training report (losses are of its own samples).
    pub report: TrainReport,
    /// What it communicated, in all.
    pub comm: CommStats,
    /// Its bytes of gradients, master weights and optimizer state.
    pub state: StateBytes,
}

/// Trains `world_size` copies of a model, one per thread, as data-parallel ranks of one global
/// batch of `trainer`'s `micro_batch` x `accumulation_steps` sequences. `make_model(rank)`
/// builds each rank's copy (on the device that rank uses); rank 0's initial parameters are
/// broadcast to the others. Returns the ranks' results in rank order.
///
/// # Errors
/// When any rank fails, the error of a rank that failed by itself (its model, data or
/// updater), before the collective failures it caused on its peers; a panic in a rank becomes
/// [`Error::RankPanicked`]. No rank waits longer than `config.timeout` for a peer.
pub fn fit_in_process<M, F>(
    config: &InProcessConfig,
    trainer: &Trainer,
    corpus: &Corpus,
    optimizer: &OptimizerConfig,
    make_model: F,
) -> Result<Vec<RankRun<M>>>
where
    M: LanguageModel + Send,
    F: Fn(usize) -> candle_train::Result<M> + Sync,
{
    let world_size = config.world_size.get();
    let comms = LocalGroup::ranks(world_size, config.timeout);
    let outcomes: Vec<Result<RankRun<M>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let make_model = &make_model;
                scope.spawn(move || -> Result<RankRun<M>> {
                    let model = make_model(rank)?;
                    fit_rank(config.stage, Box::new(comm), trainer, corpus, optimizer, model)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|payload| {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(Error::RankPanicked { rank, message })
                })
            })
            .collect()
    });
    if outcomes.iter().all(Result::is_ok) {
        return Ok(outcomes.into_iter().flatten().collect());
    }
    let mut errors: Vec<Error> = outcomes.into_iter().filter_map(Result::err).collect();
    let root = errors.iter().position(|e| e.comm().is_none()).unwrap_or(0);
    Err(errors.swap_remove(root))
}

/// Trains `model` as one rank of a data-parallel group, through `comm` (any backend: one
/// thread of [`fit_in_process`], or one process with a
/// [`TcpCommunicator`](crate::comm::TcpCommunicator)): builds the rank's [`ZeroUpdater`] (one
/// flat buffer per segment for stage 2), broadcasts rank 0's parameters, and runs
/// [`Trainer::fit`] on this rank's share of every global batch.
///
/// # Errors
/// A model, data, updater or collective error of this rank.
pub fn fit_rank<M: LanguageModel>(
    stage: ZeroStage,
    comm: Box<dyn crate::comm::Communicator>,
    trainer: &Trainer,
    corpus: &Corpus,
    optimizer: &OptimizerConfig,
    model: M,
) -> Result<RankRun<M>> {
    let (rank, world_size) = (comm.rank(), comm.world_size());
    // Stage 2 reduces per segment: one flat buffer per segment.
    let units = match stage {
        ZeroStage::Stage2 => segment_units(&model, model.parameters()),
        _ => Vec::new(),
    };
    let mut updater = ZeroUpdater::with_units(stage, model.parameters(), &units, optimizer, comm)?;
    updater.broadcast_parameters()?;
    let trainer = trainer.clone().data_parallel(rank, world_size)?;
    let report = trainer.fit(&model, corpus, &mut updater)?;
    Ok(RankRun { rank, model, report, comm: updater.comm_stats(), state: updater.state_bytes() })
}
