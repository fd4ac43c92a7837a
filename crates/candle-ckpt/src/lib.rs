//! Segmented forward/backward and activation recomputation for Candle.
//!
//! Candle's autograd keeps every activation alive until the whole backward ends. This crate
//! runs a [`SegmentedModel`] segment by segment: forward keeps, per segment, either its graph
//! ([`Decision::Keep`]) or only its input ([`Decision::Recompute`]); backward runs in reverse,
//! one vector-Jacobian product per segment, dropping each segment's graph as soon as its
//! gradients are out and handing them to a hook. Memory falls during backward, recomputation
//! trades compute for activation memory, and the hook is where gradients are accumulated or
//! reduced.
//!
//! It knows nothing of optimizers, precision or ranks.
//!
//! ```
//! use candle::{Device, Result, Tensor, Var};
//! use candle_ckpt::{forward_backward, Decision, SegmentContext, SegmentParameter, SegmentedModel};
//!
//! /// y = sum((x * w1) * w2): two one-weight segments and a loss.
//! struct Chain { w1: Var, w2: Var }
//!
//! impl SegmentedModel for Chain {
//!     type Batch = Tensor;
//!     fn num_segments(&self) -> usize { 3 }
//!     fn segment_name(&self, index: usize) -> String { format!("s{index}") }
//!     fn first_input(&self, batch: &Tensor) -> Result<Tensor> { Ok(batch.clone()) }
//!     fn forward_segment(&self, i: usize, x: &Tensor, _: &Tensor, _: &SegmentContext) -> Result<Tensor> {
//!         match i {
//!             0 => x.broadcast_mul(self.w1.as_tensor()),
//!             1 => x.broadcast_mul(self.w2.as_tensor()),
//!             _ => x.sum_all(),
//!         }
//!     }
//!     fn segment_parameters(&self, i: usize) -> Vec<SegmentParameter> {
//!         let p = |name: &str, var: &Var| SegmentParameter::new(name, var.clone());
//!         match i { 0 => vec![p("w1", &self.w1)], 1 => vec![p("w2", &self.w2)], _ => vec![] }
//!     }
//! }
//!
//! # fn main() -> Result<()> {
//! let dev = Device::Cpu;
//! let model = Chain { w1: Var::new(&[2f64], &dev)?, w2: Var::new(&[3f64], &dev)? };
//! let x = Tensor::new(&[1f64, 2.0], &dev)?;
//! let mut grads = vec![];
//! let decisions = [Decision::Recompute, Decision::Keep, Decision::Keep];
//! let loss = forward_backward(&model, &x, SegmentContext::eval(), &decisions, 1.0, |g| {
//!     for p in g.gradients { grads.push((p.name, p.grad.to_vec1::<f64>()?[0])); }
//!     Ok(())
//! })?;
//! assert_eq!(loss.to_scalar::<f64>()?, 18.0);
//! assert_eq!(grads, vec![("w2".to_string(), 6.0), ("w1".to_string(), 9.0)]);
//! # Ok(()) }
//! ```

pub mod closure;
pub mod diagnose;
pub mod engine;
pub mod policy;
pub mod probe;
pub mod rng;
pub mod segment;
pub mod verify;

pub use closure::ClosureModel;
pub use diagnose::{LikelyCause, NoBackwardOp, NO_BACKWARD_OPS};
pub use engine::{
    forward, forward_backward, measure_segments, plain_forward_backward, segment_infos, tracked_input,
    Decision, ParameterGradient, SegmentGradients,
};
pub use policy::{parse_bytes, ParseRecomputeError, Recompute, RecomputePolicy, SegmentInfo};
pub use probe::{
    probe_segments, simulate, MemoryMeter, SegmentProbe, SimulatedSegment, SimulatedStep, StepProbe,
};
pub use rng::{Rng, RngKey, SampleWindow};
pub use segment::{Residency, SegmentContext, SegmentParameter, SegmentedModel};
pub use verify::{
    check_backward_rules, compare_gradients, verify_gradients, GradientDifference, GradientReport,
    MissingGradient,
};
