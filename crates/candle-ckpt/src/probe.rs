//! Memory of a step without a model-specific mirror: [`probe_segments`] runs each segment of a
//! model once through the engine's own per-segment code under a memory meter and records what
//! the engine's order needs to know about it; [`simulate`] composes those records, in the
//! engine's order, into the peak of a step under any keep/recompute decisions.
//!
//! Blocks of a stack are identical, so a model of one block probed at the real shape gives the
//! records of every block of a deep one: repeat the block's record (what the memory estimator
//! of `candle-train` does).
//!
//! # What the simulation follows
//!
//! Forward, segment by segment: a kept segment adds its kept bytes (its tracked input copy, its
//! graph and its output) and frees the previous segment's output when nothing else holds it (a
//! recomputed predecessor's output); a recomputed segment adds its output, and its saved input
//! is the previous output (extra bytes only when the previous segment was recomputed too).
//! Backward, in reverse: each segment's measured peak and net change (graph freed, input
//! gradient held, output gradient freed, its parameter gradients handed to the hook and
//! released there), and a recomputed segment's saved input released after it.
//!
//! The records are relative (bytes above the level before each phase), so they do not depend on
//! what else is live; what they leave out is whatever the hook keeps across segments (the
//! caller's accumulators are counted as model state).

use candle::{bail, Result, Tensor};
use serde::Serialize;

use crate::engine::{backward_one, first_uses, forward_one, Decision, SegmentGradients};
use crate::policy::SegmentInfo;
use crate::segment::{SegmentContext, SegmentedModel};

/// A memory counter the probe reads: a counting allocator's heap bytes, a device pool's.
pub trait MemoryMeter {
    /// Bytes live now.
    fn current_bytes(&self) -> usize;
    /// The most bytes live at once since the last [`MemoryMeter::reset_peak`].
    fn peak_bytes(&self) -> usize;
    /// Starts a new peak measurement from the current level; returns that level.
    fn reset_peak(&self) -> usize;
}

/// What the engine's order needs to know about one segment at one batch shape, measured by
/// [`probe_segments`]. Peaks are bytes above the level just before the phase; changes are the
/// live bytes after the phase minus before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentProbe {
    /// The segment's name.
    pub name: String,
    /// Whether recompute policies treat it as a block.
    pub is_block: bool,
    /// Bytes of its input tensor.
    pub input_bytes: usize,
    /// Bytes its kept graph holds after its forward (tracked input copy, graph, output): what
    /// [`crate::measure_segments`] reports as `activation_bytes`.
    pub kept_bytes: usize,
    /// Peak of its forward when its graph is kept.
    pub keep_forward_peak: usize,
    /// Peak of its forward when its graph is not kept (a segment to recompute).
    pub dropped_forward_peak: usize,
    /// Bytes of its output (what stays live after a forward without its graph).
    pub output_bytes: usize,
    /// Peak of its backward from a kept graph (through the hook).
    pub keep_backward_peak: usize,
    /// Live change over its backward from a kept graph: the graph and the output gradient
    /// freed, the input gradient held.
    pub keep_backward_change: i64,
    /// Peak of its backward when recomputed (the recompute forward included).
    pub recompute_backward_peak: usize,
    /// Live change over its recomputed backward, its saved input not counted as released.
    pub recompute_backward_change: i64,
}

impl SegmentProbe {
    /// The segment as recompute policies see it, with its sizes (what a byte budget needs).
    pub fn info(&self) -> SegmentInfo {
        SegmentInfo {
            name: self.name.clone(),
            is_block: self.is_block,
            activation_bytes: Some(self.kept_bytes),
            input_bytes: Some(self.input_bytes),
        }
    }
}

/// The records of every segment of one model for one batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepProbe {
    /// Bytes [`SegmentedModel::first_input`] allocates.
    pub first_input_bytes: usize,
    /// One record per segment, in order.
    pub segments: Vec<SegmentProbe>,
}

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

fn change(after: usize, before: usize) -> i64 {
    after as i64 - before as i64
}

/// Runs every segment of `model` on `batch` through the engine's own forward and backward code
/// (both kept and recomputed, each once), reading `meter` around each phase, and hands every
/// backward's gradients to `hook` (twice per segment but the last: use a scratch updater; the
/// hook's transient memory is part of the measured backward peaks). Run a forward first so
/// that allocations made once per process (matmul scratch buffers) are not counted.
///
/// It holds more than a step does (both variants of every segment), so probe a short model: one
/// block gives every block's record.
///
/// # Errors
/// Any error of the model or the hook, or a model whose segments do not chain.
pub fn probe_segments<M, H>(
    model: &M,
    batch: &M::Batch,
    ctx: SegmentContext,
    loss_multiplier: f64,
    meter: &dyn MemoryMeter,
    mut hook: H,
) -> Result<StepProbe>
where
    M: SegmentedModel,
    H: FnMut(SegmentGradients) -> Result<()>,
{
    let n = model.num_segments();
    if n == 0 {
        bail!("the model has no segments");
    }
    let first_use = first_uses(model);
    let before = meter.current_bytes();
    let mut x = model.first_input(batch)?;
    let first_input_bytes = meter.current_bytes().saturating_sub(before);
    let mut records = Vec::with_capacity(n);
    let mut kept = Vec::with_capacity(n);
    let mut dropped = Vec::with_capacity(n);
    for index in 0..n {
        let input_bytes = bytes(&x);
        // Without its graph (never for the last segment, which the engine always keeps).
        let (entry, dropped_forward_peak, output_bytes) = if index + 1 < n {
            let start = meter.reset_peak();
            let (entry, out) = forward_one(model, index, false, x.clone(), batch, ctx)?;
            let peak = meter.peak_bytes().saturating_sub(start);
            let out_bytes = meter.current_bytes().saturating_sub(start);
            drop(out);
            (Some(entry), peak, out_bytes)
        } else {
            (None, 0, 0)
        };
        dropped.push(entry);
        // With its graph; `x` stays held here as a kept predecessor's graph holds it.
        let start = meter.reset_peak();
        let (entry, next) = forward_one(model, index, true, x.clone(), batch, ctx)?;
        let keep_forward_peak = meter.peak_bytes().saturating_sub(start);
        let kept_bytes = meter.current_bytes().saturating_sub(start);
        kept.push(entry);
        let output_bytes = if index + 1 < n { output_bytes } else { bytes(&next) };
        x = next;
        records.push(SegmentProbe {
            name: model.segment_name(index),
            is_block: model.is_block(index),
            input_bytes,
            kept_bytes,
            keep_forward_peak,
            dropped_forward_peak,
            output_bytes,
            keep_backward_peak: 0,
            keep_backward_change: 0,
            recompute_backward_peak: 0,
            recompute_backward_change: 0,
        });
    }
    drop(x);

    let mut grad_out: Option<Tensor> = None;
    for index in (0..n).rev() {
        let (Some(keep_entry), Some(drop_entry)) = (kept.pop(), dropped.pop()) else {
            bail!("internal: one probe entry per segment");
        };
        let record = &mut records[index];
        if let Some(entry) = drop_entry {
            // On a copy of the output gradient, which the engine frees during the backward.
            let g = grad_out.as_ref().map(Tensor::copy).transpose()?;
            let start = meter.reset_peak();
            let grad_in =
                backward_one(model, index, entry, g, batch, ctx, loss_multiplier, &first_use, &mut hook)?;
            record.recompute_backward_peak = meter.peak_bytes().saturating_sub(start);
            record.recompute_backward_change = change(meter.current_bytes(), start);
            drop(grad_in);
        }
        let start = meter.reset_peak();
        grad_out = backward_one(
            model,
            index,
            keep_entry,
            grad_out.take(),
            batch,
            ctx,
            loss_multiplier,
            &first_use,
            &mut hook,
        )?;
        record.keep_backward_peak = meter.peak_bytes().saturating_sub(start);
        record.keep_backward_change = change(meter.current_bytes(), start);
        if index + 1 == n {
            record.recompute_backward_peak = record.keep_backward_peak;
            record.recompute_backward_change = record.keep_backward_change;
        }
    }
    Ok(StepProbe { first_input_bytes, segments: records })
}

/// One segment's part in a simulated step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SimulatedSegment {
    /// Whether it was recomputed.
    pub recomputed: bool,
    /// The step's live bytes (above its start) at the peak of this segment's forward.
    pub forward_peak: usize,
    /// The step's live bytes (above its start) at the peak of this segment's backward.
    pub backward_peak: usize,
}

/// A step composed by [`simulate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SimulatedStep {
    /// The most bytes live above the step's start.
    pub peak: usize,
    /// Per segment, in order.
    pub segments: Vec<SimulatedSegment>,
}

/// The peak of one micro-batch's forward and backward through the engine (above the level at
/// its start) for segments with these records under these decisions, following the engine's
/// order (see the module docs). The last segment is kept whatever its decision says, as the
/// engine does.
///
/// # Errors
/// When `decisions` does not have one entry per segment.
pub fn simulate(probe: &StepProbe, decisions: &[Decision]) -> Result<SimulatedStep> {
    let segments = &probe.segments;
    let n = segments.len();
    if decisions.len() != n {
        bail!("{} recompute decisions given for {n} segments", decisions.len());
    }
    let keep: Vec<bool> = (0..n).map(|i| decisions[i] == Decision::Keep || i + 1 == n).collect();
    // Bytes a recomputed segment's saved input holds on its own: the previous output, when the
    // previous segment was recomputed too (a kept one holds it in its graph).
    let held =
        |i: usize| if i > 0 && !keep[i] && !keep[i - 1] { segments[i - 1].output_bytes as i64 } else { 0 };
    let mut live = probe.first_input_bytes as i64;
    let mut peak = live;
    let mut out: Vec<SimulatedSegment> = Vec::with_capacity(n);
    for (i, s) in segments.iter().enumerate() {
        let forward_peak = if keep[i] {
            let at = live + s.keep_forward_peak as i64;
            live += s.kept_bytes as i64;
            if i > 0 && !keep[i - 1] {
                // The previous output was held only as this segment's input.
                live -= segments[i - 1].output_bytes as i64;
            }
            at
        } else {
            let at = live + s.dropped_forward_peak as i64;
            live += s.output_bytes as i64;
            at
        };
        peak = peak.max(forward_peak);
        out.push(SimulatedSegment {
            recomputed: !keep[i],
            forward_peak: forward_peak.max(0) as usize,
            backward_peak: 0,
        });
    }
    for i in (0..n).rev() {
        let s = &segments[i];
        let at = if keep[i] {
            let at = live + s.keep_backward_peak as i64;
            live += s.keep_backward_change;
            at
        } else {
            let at = live + s.recompute_backward_peak as i64;
            live += s.recompute_backward_change - held(i);
            at
        };
        peak = peak.max(at);
        out[i].backward_peak = at.max(0) as usize;
    }
    Ok(SimulatedStep { peak: peak.max(0) as usize, segments: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kept: usize, output: usize, peak: usize) -> SegmentProbe {
        SegmentProbe {
            name: String::new(),
            is_block: true,
            input_bytes: output,
            kept_bytes: kept,
            keep_forward_peak: kept + 5,
            dropped_forward_peak: output + 7,
            output_bytes: output,
            keep_backward_peak: peak,
            // The graph and the output gradient freed, the input gradient held.
            keep_backward_change: -(kept as i64) - output as i64 + output as i64,
            recompute_backward_peak: peak + kept,
            // The output gradient freed, the input gradient held.
            recompute_backward_change: -(output as i64) + output as i64,
        }
    }

    #[test]
    fn the_simulation_follows_the_engine_order() -> Result<()> {
        use Decision::{Keep, Recompute};
        // An embedding, three blocks of 100 kept bytes and 10 output bytes, a head.
        let mut segments = vec![record(20, 10, 30)];
        segments.extend((0..3).map(|_| record(100, 10, 50)));
        segments.push(record(5, 4, 40));
        let probe = StepProbe { first_input_bytes: 2, segments };
        // Everything kept: forward ends at 2 + 20 + 300 + 5; the head's backward frees 5 and the
        // last block's backward peaks 50 above that.
        let kept = simulate(&probe, &[Keep; 5])?;
        assert_eq!(kept.segments[4].backward_peak, 2 + 20 + 300 + 5 + 40);
        assert_eq!(kept.peak, 2 + 20 + 300 + 50);
        assert_eq!(kept.segments[3].backward_peak, kept.peak);
        // Every block recomputed: the embedding's graph and two block outputs held (the last
        // block's output is freed once the kept head has copied it), the head's graph; then
        // each block's recompute on top of what is left.
        let all = simulate(&probe, &[Keep, Recompute, Recompute, Recompute, Keep])?;
        let forward_end = 2 + 20 + 10 + 10 + 5;
        assert_eq!(all.segments[4].backward_peak, forward_end + 40);
        let after_head = forward_end - 5;
        assert_eq!(all.segments[3].backward_peak, after_head + 150);
        // Its saved input (block 2's output, held by nothing else) is released after it.
        assert_eq!(all.segments[2].backward_peak, after_head - 10 + 150);
        assert!(all.peak < kept.peak, "{all:?}");
        assert!(all.segments.iter().skip(1).take(3).all(|s| s.recomputed));
        assert!(simulate(&probe, &[Keep; 4]).is_err());
        // The last segment is kept whatever its decision says.
        assert_eq!(simulate(&probe, &[Keep, Keep, Keep, Keep, Recompute])?, kept);
        Ok(())
    }
}
