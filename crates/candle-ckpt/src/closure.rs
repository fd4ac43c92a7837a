//! A segmented model assembled from closures, for a user's ad-hoc blocks.

use candle::{Result, Tensor};

use crate::segment::{SegmentContext, SegmentParameter, SegmentedModel};

type SegmentFn<'a, B> = Box<dyn Fn(&Tensor, &B, &SegmentContext) -> Result<Tensor> + 'a>;
type InputFn<'a, B> = Box<dyn Fn(&B) -> Result<Tensor> + 'a>;

struct ClosureSegment<'a, B: ?Sized> {
    name: String,
    parameters: Vec<SegmentParameter>,
    is_block: bool,
    forward: SegmentFn<'a, B>,
}

/// A [`SegmentedModel`] whose segments are closures: `first_input` turns the batch into the
/// first segment's input, each segment maps its input to its output, and the last returns the
/// scalar loss.
///
/// ```
/// use candle::{Device, Tensor, Var};
/// use candle_ckpt::{forward_backward, ClosureModel, Decision, SegmentContext, SegmentParameter};
/// # fn main() -> candle::Result<()> {
/// let w = Var::new(&[[0.5f64, -1.0], [2.0, 0.25]], &Device::Cpu)?;
/// let p = SegmentParameter::new("w", w.clone());
/// let model = ClosureModel::new(|x: &Tensor| Ok(x.clone()))
///     .block("tanh_layer", vec![p], |x, _, _| x.matmul(w.as_tensor())?.tanh())
///     .segment("loss", vec![], false, |x, _, _| x.sqr()?.sum_all());
/// let x = Tensor::new(&[[1f64, 2.0]], &Device::Cpu)?;
/// let decisions = [Decision::Recompute, Decision::Keep];
/// let mut n = 0;
/// forward_backward(&model, &x, SegmentContext::eval(), &decisions, 1.0, |g| {
///     n += g.gradients.len();
///     Ok(())
/// })?;
/// assert_eq!(n, 1);
/// # Ok(()) }
/// ```
pub struct ClosureModel<'a, B: ?Sized> {
    first_input: InputFn<'a, B>,
    segments: Vec<ClosureSegment<'a, B>>,
}

impl<B: ?Sized> std::fmt::Debug for ClosureModel<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.segments.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("ClosureModel").field("segments", &names).finish()
    }
}

impl<'a, B: ?Sized> ClosureModel<'a, B> {
    /// A model with no segments yet, whose first input is `first_input(batch)`.
    pub fn new(first_input: impl Fn(&B) -> Result<Tensor> + 'a) -> Self {
        Self { first_input: Box::new(first_input), segments: Vec::new() }
    }

    /// Appends a segment; `is_block` says whether recompute policies may recompute it.
    pub fn segment(
        mut self,
        name: impl Into<String>,
        parameters: Vec<SegmentParameter>,
        is_block: bool,
        forward: impl Fn(&Tensor, &B, &SegmentContext) -> Result<Tensor> + 'a,
    ) -> Self {
        self.segments.push(ClosureSegment {
            name: name.into(),
            parameters,
            is_block,
            forward: Box::new(forward),
        });
        self
    }

    /// Appends a block: a segment recompute policies may recompute.
    pub fn block(
        self,
        name: impl Into<String>,
        parameters: Vec<SegmentParameter>,
        forward: impl Fn(&Tensor, &B, &SegmentContext) -> Result<Tensor> + 'a,
    ) -> Self {
        self.segment(name, parameters, true, forward)
    }
}

impl<B: ?Sized> SegmentedModel for ClosureModel<'_, B> {
    type Batch = B;

    fn num_segments(&self) -> usize {
        self.segments.len()
    }

    fn segment_name(&self, index: usize) -> String {
        self.segments.get(index).map(|s| s.name.clone()).unwrap_or_default()
    }

    fn first_input(&self, batch: &B) -> Result<Tensor> {
        (self.first_input)(batch)
    }

    fn forward_segment(
        &self,
        index: usize,
        input: &Tensor,
        batch: &B,
        ctx: &SegmentContext,
    ) -> Result<Tensor> {
        match self.segments.get(index) {
            Some(s) => (s.forward)(input, batch, ctx),
            None => candle::bail!("segment {index} of a {}-segment model", self.segments.len()),
        }
    }

    fn segment_parameters(&self, index: usize) -> Vec<SegmentParameter> {
        self.segments.get(index).map(|s| s.parameters.clone()).unwrap_or_default()
    }

    fn is_block(&self, index: usize) -> bool {
        self.segments.get(index).is_some_and(|s| s.is_block)
    }
}
