//! Per-rank model-state bytes of each ZeRO stage from the parameters' shapes alone, mirroring
//! what [`ZeroUpdater`](crate::zero::ZeroUpdater) and
//! [`ShardedModel`](crate::stage3::ShardedModel) allocate (`candle-fit estimate --zero K
//! --world-size N` prints it; tests/zero.rs compares it with the updaters' counts).
//!
//! REFERENCE.md's per-rank formulas for mixed-precision Adam are `16 P`, `4 P + 12 P / N`,
//! `2 P + 14 P / N` and `16 P / N`; this design accumulates gradients in FP32 and keeps stage 3's
//! parameter slice in FP32 (it is the master copy), so its exact counts differ where the paper
//! counts a 2-byte gradient or a 2-byte parameter shard; padding adds at most N x 16 bytes
//! per flat buffer.

use candle::DType;
use candle_ckpt::SegmentedModel;
use candle_train::optim::AdamW8bit;
use candle_train::{GptConfig, OptimizerConfig, Parameters};

use crate::error::Result;
use crate::partition::Partition;
use crate::zero::segment_units;
use crate::ZeroStage;

/// What the sharding needs to know of a model: its parameters' dtypes and sizes (model
/// order), each parameter's unit (the segment completing its gradient, [`segment_units`]) and
/// the parameters each segment lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// `(dtype, elements)` per parameter.
    pub shapes: Vec<(DType, usize)>,
    /// The unit of each parameter.
    pub units: Vec<usize>,
    /// Per segment, the indices of the parameters it lists.
    pub segments: Vec<Vec<usize>>,
}

impl ShardLayout {
    /// The layout of a built model.
    pub fn of_model<M: SegmentedModel + ?Sized>(model: &M, params: &Parameters) -> Self {
        let ids: Vec<_> = params.iter().map(|p| p.id()).collect();
        let segments = (0..model.num_segments())
            .map(|s| {
                model
                    .segment_parameters(s)
                    .iter()
                    .filter_map(|p| ids.iter().position(|&id| id == p.id()))
                    .collect()
            })
            .collect();
        Self {
            shapes: params.iter().map(|p| (p.dtype(), p.elem_count())).collect(),
            units: segment_units(model, params),
            segments,
        }
    }

    /// The layout of a [`candle_train::Gpt`] of this shape in `dtype`, without building it:
    /// the embedding segment lists `wte` and `wpe`, block `i` its 12 tensors, the head
    /// `ln_f`'s two and the tied `wte`.
    pub fn gpt(config: &GptConfig, dtype: DType) -> Self {
        let sizes = config.parameter_sizes();
        let n = config.n_layer;
        let mut units = vec![0, 0];
        let mut segments = vec![vec![0, 1]];
        for layer in 0..n {
            units.extend([layer + 1; 12]);
            segments.push((2 + 12 * layer..2 + 12 * (layer + 1)).collect());
        }
        units.extend([n + 1; 2]);
        segments.push(vec![sizes.len() - 2, sizes.len() - 1, 0]);
        Self { shapes: sizes.into_iter().map(|s| (dtype, s)).collect(), units, segments }
    }
}

/// One rank's model-state bytes under a ZeRO stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RankState {
    /// Parameters resident in their dtype (stage 3: none between uses).
    pub parameters: usize,
    /// Stage 3: the most parameter bytes gathered at once (a segment's flat buffers, with the
    /// buffers it shares with its neighbour), besides the transient FP32 flat buffer a gather
    /// goes through. 0 for the other stages.
    pub gathered_peak: usize,
    /// FP32 gradient accumulators.
    pub gradients: usize,
    /// FP32 master weights (stage 3: the FP32 parameter slice, for every dtype).
    pub master_weights: usize,
    /// Optimizer state.
    pub optimizer_state: usize,
}

impl RankState {
    /// Resident model state: parameters, gradients, master weights and optimizer state.
    pub fn total(&self) -> usize {
        self.parameters + self.gradients + self.master_weights + self.optimizer_state
    }
}

/// Rank `rank`'s model state under `stage` on `world_size` ranks with `optimizer`.
///
/// # Errors
/// [`crate::Error::InvalidConfig`] for a world size of 0, a rank outside it, or bad optimizer
/// hyper-parameters.
pub fn rank_state(
    layout: &ShardLayout,
    stage: ZeroStage,
    world_size: usize,
    rank: usize,
    optimizer: &OptimizerConfig,
) -> Result<RankState> {
    if world_size == 0 || rank >= world_size {
        return Err(crate::Error::config("world_size", format!("rank {rank} of {world_size} ranks")));
    }
    let by_unit = matches!(stage, ZeroStage::Stage2 | ZeroStage::Stage3);
    let partition = if by_unit {
        Partition::by_unit(&layout.shapes, &layout.units, world_size)
    } else {
        Partition::new(&layout.shapes, world_size)
    };
    let mut state = RankState::default();
    let mut piece_sizes = Vec::new();
    for group in partition.groups() {
        let owned = match stage {
            ZeroStage::Stage0 => group.padded_len(),
            _ => group.shard_len(),
        };
        match stage {
            ZeroStage::Stage0 => piece_sizes.extend(group.entries().iter().map(|e| (e.len, e.len))),
            _ => piece_sizes
                .extend(group.pieces(rank).iter().map(|p| (p.param_range.len(), layout.shapes[p.param].1))),
        }
        state.gradients += if by_unit { owned } else { group.padded_len() } * 4;
        if stage == ZeroStage::Stage3 || group.dtype() != DType::F32 {
            state.master_weights += owned * 4;
        }
        if stage != ZeroStage::Stage3 {
            state.parameters += group.len() * group.dtype().size_in_bytes();
        }
    }
    let elements: usize = piece_sizes.iter().map(|&(len, _)| len).sum();
    state.optimizer_state = match optimizer {
        OptimizerConfig::AdamW(c) => {
            c.validate()?;
            elements * 8
        }
        OptimizerConfig::AdamW8bit(c) => {
            c.validate()?;
            AdamW8bit::state_bytes_for_pieces(&piece_sizes)
        }
        OptimizerConfig::Sgd(c) if c.momentum > 0.0 => elements * 4,
        OptimizerConfig::Sgd(_) => 0,
    };
    if stage == ZeroStage::Stage3 {
        let group_bytes = |param: usize| {
            partition.locate(param).map(|(g, _)| {
                let layout = &partition.groups()[g];
                (g, layout.len() * layout.dtype().size_in_bytes())
            })
        };
        let groups_of = |segment: &Vec<usize>| {
            let mut groups: Vec<(usize, usize)> = segment.iter().filter_map(|&p| group_bytes(p)).collect();
            groups.sort_unstable();
            groups.dedup();
            groups
        };
        let per_segment: Vec<Vec<(usize, usize)>> = layout.segments.iter().map(groups_of).collect();
        // A forward holds one segment's buffers; a backward hook releases segment i (keeping
        // what segment i - 1 shares) before gathering segment i - 1.
        state.gathered_peak = per_segment.iter().map(|g| g.iter().map(|(_, b)| b).sum()).max().unwrap_or(0);
    }
    Ok(state)
}
