//! Data-parallel training: [`fit_rank`] runs one rank over any communicator;
//! [`fit_in_process`] runs N of them as threads, each with its own model copy, [`ZeroUpdater`]
//! and communicator of one [`LocalGroup`].

use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use candle_train::updater::StateBytes;
use candle_train::{
    BackwardMode, DataSource, OptimizerConfig, TrainReport, TrainableModel, Trainer, Updater,
};

use crate::comm::{CommStats, LocalGroup};
use crate::error::{Error, Result};
use crate::stage3::ShardedModel;
use crate::zero::{segment_units, ZeroUpdater};
use crate::ZeroStage;

/// How to run the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InProcessConfig {
    /// Number of ranks (threads).
    pub world_size: NonZeroUsize,
    /// The ZeRO stage.
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
    /// Stage 3: the most parameter bytes it held gathered at once (0 for the other stages).
    pub peak_gathered_bytes: usize,
}

/// Trains `world_size` copies of a model, one per thread, as data-parallel ranks of one global
/// batch of `trainer`'s `micro_batch` x `accumulation_steps` samples of `data` (any
/// [`DataSource`] of the model's batch type; every rank reads its own samples of each). `make_model(rank)`
/// builds each rank's copy (on the device that rank uses); rank 0's initial parameters are
/// broadcast to the others. Returns the ranks' results in rank order.
///
/// # Errors
/// When any rank fails, the error of a rank that failed by itself (its model, data or
/// updater), before the collective failures it caused on its peers; a panic in a rank becomes
/// [`Error::RankPanicked`]. No rank waits longer than `config.timeout` for a peer.
pub fn fit_in_process<M, D, F>(
    config: &InProcessConfig,
    trainer: &Trainer,
    data: &D,
    optimizer: &OptimizerConfig,
    make_model: F,
) -> Result<Vec<RankRun<M>>>
where
    M: TrainableModel<Batch = D::Batch> + Send,
    D: DataSource + Sync + ?Sized,
    F: Fn(usize) -> candle_train::Result<M> + Sync,
{
    in_process(config, trainer, data, optimizer, None, make_model)
}

/// As [`fit_in_process`], continuing the sharded checkpoint `checkpoint` (a checkpoint
/// directory, or a run directory whose newest checkpoint is taken), which may have been
/// written on another number of ranks or at another stage (see [`crate::checkpoint`]).
///
/// # Errors
/// As [`fit_in_process`]; a checkpoint error (missing, torn, corrupted, another run's or
/// another model's) before any training.
pub fn resume_in_process<M, D, F>(
    config: &InProcessConfig,
    trainer: &Trainer,
    data: &D,
    optimizer: &OptimizerConfig,
    checkpoint: &Path,
    make_model: F,
) -> Result<Vec<RankRun<M>>>
where
    M: TrainableModel<Batch = D::Batch> + Send,
    D: DataSource + Sync + ?Sized,
    F: Fn(usize) -> candle_train::Result<M> + Sync,
{
    in_process(config, trainer, data, optimizer, Some(checkpoint), make_model)
}

fn in_process<M, D, F>(
    config: &InProcessConfig,
    trainer: &Trainer,
    data: &D,
    optimizer: &OptimizerConfig,
    checkpoint: Option<&Path>,
    make_model: F,
) -> Result<Vec<RankRun<M>>>
where
    M: TrainableModel<Batch = D::Batch> + Send,
    D: DataSource + Sync + ?Sized,
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
                    run_rank(config.stage, Box::new(comm), trainer, data, optimizer, model, checkpoint)
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
/// flat buffer per segment for stages 2 and 3), broadcasts rank 0's parameters, and runs
/// [`Trainer::fit`] on this rank's share of every global batch. Stage 3 trains the model
/// wrapped in a [`ShardedModel`] and gathers its parameters back at the end: the returned
/// model is whole.
///
/// # Errors
/// A model, data, updater or collective error of this rank; [`Error::InvalidConfig`] for stage
/// 3 with the plain whole-graph backward (stage 3 gathers each segment's parameters around
/// that segment's own backward).
pub fn fit_rank<M, D>(
    stage: ZeroStage,
    comm: Box<dyn crate::comm::Communicator>,
    trainer: &Trainer,
    data: &D,
    optimizer: &OptimizerConfig,
    model: M,
) -> Result<RankRun<M>>
where
    M: TrainableModel<Batch = D::Batch>,
    D: DataSource + ?Sized,
{
    run_rank(stage, comm, trainer, data, optimizer, model, None)
}

/// As [`fit_rank`], continuing the sharded checkpoint `checkpoint` (see
/// [`resume_in_process`]).
///
/// # Errors
/// As [`fit_rank`], and checkpoint errors.
pub fn resume_rank<M, D>(
    stage: ZeroStage,
    comm: Box<dyn crate::comm::Communicator>,
    trainer: &Trainer,
    data: &D,
    optimizer: &OptimizerConfig,
    model: M,
    checkpoint: &Path,
) -> Result<RankRun<M>>
where
    M: TrainableModel<Batch = D::Batch>,
    D: DataSource + ?Sized,
{
    run_rank(stage, comm, trainer, data, optimizer, model, Some(checkpoint))
}

fn run_rank<M, D>(
    stage: ZeroStage,
    comm: Box<dyn crate::comm::Communicator>,
    trainer: &Trainer,
    data: &D,
    optimizer: &OptimizerConfig,
    model: M,
    checkpoint: Option<&Path>,
) -> Result<RankRun<M>>
where
    M: TrainableModel<Batch = D::Batch>,
    D: DataSource + ?Sized,
{
    let (rank, world_size) = (comm.rank(), comm.world_size());
    let trainer = trainer.clone().data_parallel(rank, world_size)?;
    if stage == ZeroStage::Stage3 {
        if trainer.config().backward == BackwardMode::Plain {
            return Err(Error::config(
                "backward",
                "ZeRO stage 3 needs the segmented backward: the plain backward reads every segment's parameters at once",
            ));
        }
        let (sharded, mut updater) = ShardedModel::new(model, optimizer, comm)?;
        let trained = match checkpoint {
            Some(path) => trainer.resume(&sharded, data, &mut updater, path),
            None => trainer.fit(&sharded, data, &mut updater),
        };
        let report = match trained {
            Ok(report) => report,
            // A collective that failed inside a forward, typed.
            Err(e) => return Err(sharded.take_error().unwrap_or(Error::Train(e))),
        };
        let peak_gathered_bytes = sharded.peak_gathered_bytes();
        let model = sharded.into_inner()?;
        return Ok(RankRun {
            rank,
            model,
            report,
            comm: updater.comm_stats(),
            state: updater.state_bytes(),
            peak_gathered_bytes,
        });
    }
    // Stage 2 reduces per segment: one flat buffer per segment.
    let units = match stage {
        ZeroStage::Stage2 => segment_units(&model, model.parameters()),
        _ => Vec::new(),
    };
    let mut updater = ZeroUpdater::with_units(stage, model.parameters(), &units, optimizer, comm)?;
    updater.broadcast_parameters()?;
    let report = match checkpoint {
        Some(path) => trainer.resume(&model, data, &mut updater, path)?,
        None => trainer.fit(&model, data, &mut updater)?,
    };
    Ok(RankRun {
        rank,
        model,
        report,
        comm: updater.comm_stats(),
        state: updater.state_bytes(),
        peak_gathered_bytes: 0,
    })
}
