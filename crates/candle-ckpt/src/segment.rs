//! The segmented-model interface: what a model exposes so the engine can drive it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle::{Result, Shape, Tensor, TensorId, Var};

use crate::rng::{Rng, RngKey, SampleWindow};

/// What one segment's forward may know about the step it runs in.
///
/// The same context is given to a segment's first forward and to its recompute, so anything
/// drawn from [`SegmentContext::rng`] replays exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentContext {
    /// Whether the model is training (dropout active) or evaluating.
    pub training: bool,
    /// The key of this segment's randomness; its `segment` field is the segment's index.
    pub key: RngKey,
    /// When the batch is part of a larger one (a data-parallel rank's share of a micro-batch):
    /// which rows. Handed to every generator, so per-element randomness (dropout masks)
    /// equals those rows of the whole batch's.
    pub window: Option<SampleWindow>,
}

impl SegmentContext {
    /// A context for evaluation: no dropout, fixed key.
    pub fn eval() -> Self {
        Self { training: false, key: RngKey::new(0), window: None }
    }

    /// A context for training at the given step and micro-batch.
    pub fn train(seed: u64, step: u64, micro_batch: u64) -> Self {
        Self { training: true, key: RngKey { seed, step, micro_batch, segment: 0, stream: 0 }, window: None }
    }

    /// The same context for rows `start .. start + len` of a batch of `total` rows.
    pub fn with_window(self, start: usize, len: usize, total: usize) -> Self {
        let window = SampleWindow { start: start as u64, len: len as u64, total: total as u64 };
        Self { window: Some(window), ..self }
    }

    /// The same context for another segment.
    pub fn for_segment(self, segment: usize) -> Self {
        Self { key: RngKey { segment: segment as u64, ..self.key }, ..self }
    }

    /// The generator for random stream `stream` of this segment (one stream per random layer).
    pub fn rng(&self, stream: u64) -> Rng {
        self.key.with_stream(stream).rng().with_window(self.window)
    }
}

/// Whether a parameter's storage is released, shared by every handle of one parameter (its
/// clones, its [`SegmentParameter`]s): ZeRO stage 3 frees a parameter's storage outside its
/// segment's use and marks it released first, and every checked read
/// ([`SegmentParameter::var`], candle-train's `Parameter::var` and `Parameter::tensor`) is
/// then an error naming the parameter instead of a read of freed memory.
#[derive(Debug, Clone, Default)]
pub struct Residency(Arc<AtomicBool>);

impl Residency {
    /// A flag for a resident parameter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the storage is released now.
    pub fn is_released(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Marks the storage released (before it is freed) or resident (after its values are
    /// back). Only the code that swaps the storage calls it.
    pub fn set_released(&self, released: bool) {
        self.0.store(released, Ordering::Release);
    }
}

/// The error of a read of a released parameter, with the text of candle-train's
/// `Error::ParameterReleased`.
pub(crate) fn released_error(name: &str) -> candle::Error {
    candle::Error::Msg(format!(
        "parameter `{name}` is released: ZeRO stage 3 holds it only while its segment runs (read it through the model's forward, or after `ShardedModel::into_inner`)"
    ))
}

/// A trainable parameter as the engine sees it: its name (for errors), its variable and the
/// variable's residency.
///
/// The variable is private: its metadata (id, shape, dtype, device) is always readable, its
/// values only through [`SegmentParameter::var`], which refuses a released parameter. The
/// engine itself reads metadata only (it finds gradients by id).
#[derive(Debug, Clone)]
pub struct SegmentParameter {
    /// The parameter's full name, e.g. `h.0.attn.c_attn.weight`.
    pub name: String,
    var: Var,
    residency: Residency,
}

impl SegmentParameter {
    /// A parameter over `var` (shared, not copied) that is never released.
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        Self::with_residency(name, var, Residency::new())
    }

    /// A parameter over `var` whose residency is `residency` (shared with the handle that
    /// owns it).
    pub fn with_residency(name: impl Into<String>, var: Var, residency: Residency) -> Self {
        Self { name: name.into(), var, residency }
    }

    /// The variable's id, the key of its gradient (stable through release and gather).
    pub fn id(&self) -> TensorId {
        self.var.as_tensor().id()
    }

    /// The variable's shape.
    pub fn shape(&self) -> &Shape {
        self.var.shape()
    }

    /// The variable's number of dimensions.
    pub fn rank(&self) -> usize {
        self.var.rank()
    }

    /// Whether the parameter's storage is released now.
    pub fn is_released(&self) -> bool {
        self.residency.is_released()
    }

    /// The variable, to read or set its values.
    ///
    /// # Errors
    /// When the parameter is released: an error naming it, worded as candle-train's
    /// `Error::ParameterReleased`.
    pub fn var(&self) -> Result<&Var> {
        if self.is_released() {
            return Err(released_error(&self.name));
        }
        Ok(&self.var)
    }
}

/// A model cut into segments that run one after another: segment 0 takes the batch's first
/// input, each later segment takes the previous segment's output, and the last segment returns
/// the scalar loss.
///
/// A transformer is typically cut as: embedding, each block, head + loss.
pub trait SegmentedModel {
    /// What a training step consumes (token ids and targets, say).
    type Batch: ?Sized;

    /// The number of segments, at least one.
    fn num_segments(&self) -> usize;

    /// A human-readable name for segment `index` (used in errors and reports).
    fn segment_name(&self, index: usize) -> String;

    /// The input of segment 0 for this batch.
    ///
    /// # Errors
    /// When the batch cannot be turned into a tensor.
    fn first_input(&self, batch: &Self::Batch) -> Result<Tensor>;

    /// Runs segment `index` on `input`. The last segment must return a scalar loss.
    ///
    /// # Errors
    /// Any tensor error of the segment's layers.
    fn forward_segment(
        &self,
        index: usize,
        input: &Tensor,
        batch: &Self::Batch,
        ctx: &SegmentContext,
    ) -> Result<Tensor>;

    /// The trainable parameters segment `index` uses. A parameter used by several segments
    /// (tied embeddings) is listed by each of them.
    fn segment_parameters(&self, index: usize) -> Vec<SegmentParameter>;

    /// Whether segment `index` is a repeated block that recompute policies may recompute. By
    /// default, every segment but the first (embedding) and the last (loss).
    fn is_block(&self, index: usize) -> bool {
        index > 0 && index + 1 < self.num_segments()
    }

    /// Called by the engine just before segment `index`'s backward (after its recompute, if
    /// any), whatever the hook does: a model whose parameters are not always resident (ZeRO
    /// stage 3 releases them between uses) makes segment `index`'s readable again here, so a
    /// kept graph's backward never reads released storage. By default, nothing.
    ///
    /// # Errors
    /// When the parameters cannot be made resident (a collective failure).
    fn before_backward(&self, _index: usize) -> Result<()> {
        Ok(())
    }

    /// The name of a layer in segment `index` whose state changes from call to call (a KV
    /// cache, running statistics), if any. Such a segment cannot be recomputed. By default,
    /// none.
    fn stateful_layer(&self, _index: usize) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use candle::{DType, Device, Result, Var};

    use super::{Residency, SegmentParameter};

    #[test]
    fn a_released_parameter_refuses_its_variable_and_keeps_its_metadata() -> Result<()> {
        let var = Var::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let residency = Residency::new();
        let p = SegmentParameter::with_residency("w", var.clone(), residency.clone());
        assert_eq!(p.var()?.as_tensor().id(), var.as_tensor().id());
        residency.set_released(true);
        assert!(p.is_released());
        let err = p.var().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("parameter `w` is released"), "{err}");
        assert_eq!((p.id(), p.shape().dims(), p.rank()), (var.as_tensor().id(), &[2, 3][..], 2));
        residency.set_released(false);
        assert_eq!(p.var()?.as_tensor().id(), var.as_tensor().id());
        Ok(())
    }
}
