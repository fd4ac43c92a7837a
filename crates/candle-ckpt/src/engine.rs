//! The engine: forward segment by segment, backward segment by segment in reverse, dropping
//! each segment's graph as soon as its gradients are out.

use std::collections::HashMap;

use candle::{bail, Result, Tensor, TensorId, Var};

use crate::policy::SegmentInfo;
use crate::segment::{SegmentContext, SegmentParameter, SegmentedModel};

/// What the engine keeps of one segment between its forward and its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep the segment's autograd graph (all its activations).
    Keep,
    /// Keep only the segment's detached input and run its forward again during backward.
    Recompute,
}

/// The gradient of one parameter, produced by one segment's backward.
#[derive(Debug, Clone)]
pub struct ParameterGradient {
    /// The parameter's name.
    pub name: String,
    /// The parameter.
    pub var: Var,
    /// Its gradient from this segment, detached from every graph, in the parameter's dtype.
    pub grad: Tensor,
    /// True when no earlier segment uses this parameter: after this hook call its gradient
    /// for the micro-batch is complete.
    pub is_final: bool,
}

/// The gradients one segment's backward produced, handed to the per-segment hook.
#[derive(Debug)]
pub struct SegmentGradients {
    /// The segment's index.
    pub segment: usize,
    /// One entry per parameter the segment lists, in the order it lists them.
    pub gradients: Vec<ParameterGradient>,
}

struct Saved {
    /// The detached input the segment ran on.
    input: Tensor,
    /// The output with its graph, for kept segments.
    output: Option<Tensor>,
}

/// Turns a detached activation into a leaf that always receives a gradient.
///
/// A segment runs on its detached input, with no copy: Candle hands a gradient to such a
/// constant leaf whenever the ops consuming it track gradients (they do when a parameter takes
/// part, as in every layer here). A segment whose first op on its input tracks nothing (a bare
/// cast or reduction) leaves the input without a gradient; the engine then runs that segment
/// again on this variable copy, which always receives one.
fn as_leaf(x: &Tensor) -> Result<Tensor> {
    if x.dtype().is_int() {
        return Ok(x.clone());
    }
    Ok(Var::from_tensor(&x.detach())?.as_tensor().clone())
}

/// Runs the forward of every segment without keeping any graph, returning the last output
/// (the loss for a [`SegmentedModel`]).
///
/// # Errors
/// Any error of the model's segments.
pub fn forward<M: SegmentedModel>(model: &M, batch: &M::Batch, ctx: SegmentContext) -> Result<Tensor> {
    let mut x = model.first_input(batch)?;
    for index in 0..model.num_segments() {
        x = model.forward_segment(index, &x, batch, &ctx.for_segment(index))?.detach();
    }
    Ok(x)
}

/// One forward over every segment without cutting the graph and one `backward()` over it, as
/// a Candle user writes a training step today: every activation stays alive until the whole
/// backward ends, and the gradients (not detached) are handed to `hook` while the graph is
/// still alive. This is the reference the segmented engine is measured against; it gives the
/// same gradients.
///
/// # Errors
/// When a listed parameter receives no gradient, or on any error of the model or the hook.
pub fn plain_forward_backward<M, H>(
    model: &M,
    batch: &M::Batch,
    ctx: SegmentContext,
    loss_multiplier: f64,
    mut hook: H,
) -> Result<Tensor>
where
    M: SegmentedModel,
    H: FnMut(SegmentGradients) -> Result<()>,
{
    let n = model.num_segments();
    let mut x = model.first_input(batch)?;
    for index in 0..n {
        x = model.forward_segment(index, &x, batch, &ctx.for_segment(index))?;
    }
    let loss = x;
    let grads = if loss_multiplier == 1.0 {
        loss.backward()?
    } else {
        loss.affine(loss_multiplier, 0.0)?.backward()?
    };
    let mut gradients = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for index in 0..n {
        for SegmentParameter { name, var } in model.segment_parameters(index) {
            if !seen.insert(var.as_tensor().id()) {
                continue;
            }
            let Some(grad) = grads.get(var.as_tensor()) else {
                bail!("parameter `{name}` received no gradient: an op without a backward rule is upstream of it");
            };
            gradients.push(ParameterGradient { name, var, grad: grad.clone(), is_final: true });
        }
    }
    hook(SegmentGradients { segment: 0, gradients })?;
    Ok(loss.detach())
}

/// Measures, for one batch, the bytes each segment's kept graph retains and the bytes of its
/// input, by reading `current_bytes` (a counting allocator's live bytes, a device pool's
/// used bytes) around each segment's forward. The result feeds byte-budget policies.
///
/// # Errors
/// Any error of the model.
pub fn measure_segments<M: SegmentedModel>(
    model: &M,
    batch: &M::Batch,
    ctx: SegmentContext,
    current_bytes: &dyn Fn() -> usize,
) -> Result<Vec<SegmentInfo>> {
    let n = model.num_segments();
    let mut kept = Vec::with_capacity(n);
    let mut infos = Vec::with_capacity(n);
    let mut x = model.first_input(batch)?;
    for index in 0..n {
        let input_bytes = x.elem_count() * x.dtype().size_in_bytes();
        let before = current_bytes();
        let output = model.forward_segment(index, &x, batch, &ctx.for_segment(index))?;
        x = output.detach();
        let after = current_bytes();
        kept.push(output);
        infos.push(SegmentInfo {
            name: model.segment_name(index),
            is_block: model.is_block(index),
            activation_bytes: Some(after.saturating_sub(before)),
            input_bytes: Some(input_bytes),
        });
    }
    Ok(infos)
}

/// What policies know of `model` without measuring: names and which segments are blocks.
pub fn segment_infos<M: SegmentedModel>(model: &M) -> Vec<SegmentInfo> {
    (0..model.num_segments())
        .map(|index| SegmentInfo {
            name: model.segment_name(index),
            is_block: model.is_block(index),
            activation_bytes: None,
            input_bytes: None,
        })
        .collect()
}

/// Runs one micro-batch's forward and backward, segment by segment.
///
/// `decisions[i]` says whether segment `i` keeps its graph or is recomputed during backward;
/// the last segment (the loss) is always kept. The backward starts from
/// `loss * loss_multiplier` (use it for accumulation's 1/k and for loss scaling). After each
/// segment's backward, `hook` receives the gradients of the parameters that segment lists,
/// detached, and the segment's graph is dropped before the next one is processed. Returns the
/// loss, detached and not multiplied.
///
/// # Errors
/// When `decisions` does not have one entry per segment, when a recomputed segment holds a
/// stateful layer, when a listed parameter received no gradient (a layer without a backward
/// rule upstream of it, say), when the loss is not a scalar, or on any error of the model or
/// the hook.
pub fn forward_backward<M, H>(
    model: &M,
    batch: &M::Batch,
    ctx: SegmentContext,
    decisions: &[Decision],
    loss_multiplier: f64,
    mut hook: H,
) -> Result<Tensor>
where
    M: SegmentedModel,
    H: FnMut(SegmentGradients) -> Result<()>,
{
    let n = model.num_segments();
    if n == 0 {
        bail!("the model has no segments");
    }
    if decisions.len() != n {
        bail!("{} recompute decisions given for a model of {n} segments", decisions.len());
    }
    for (index, decision) in decisions.iter().enumerate().take(n - 1) {
        if *decision == Decision::Recompute {
            if let Some(layer) = model.stateful_layer(index) {
                bail!(
                    "segment `{}` cannot be recomputed: its layer `{layer}` keeps state across calls",
                    model.segment_name(index)
                );
            }
        }
    }

    // Forward.
    let mut saved = Vec::with_capacity(n);
    let mut x = model.first_input(batch)?;
    for (index, decision) in decisions.iter().enumerate() {
        let keep = *decision == Decision::Keep || index + 1 == n;
        let seg_ctx = ctx.for_segment(index);
        if keep {
            let output = model.forward_segment(index, &x, batch, &seg_ctx)?;
            let input = std::mem::replace(&mut x, output.detach());
            saved.push(Saved { input, output: Some(output) });
        } else {
            let output = model.forward_segment(index, &x, batch, &seg_ctx)?.detach();
            saved.push(Saved { input: x, output: None });
            x = output;
        }
    }
    drop(x);
    let loss = match saved.last().and_then(|s| s.output.as_ref()) {
        Some(loss) => loss.clone(),
        None => bail!("internal: the loss segment was not kept"),
    };
    if loss.elem_count() != 1 {
        bail!("the last segment must return a scalar loss, got shape {:?}", loss.shape());
    }
    let loss_value = loss.detach();
    // The head's graph is reached through `saved` alone, so it is freed after its backward.
    drop(loss);

    // The first segment (in forward order) that lists each parameter.
    let mut first_use: HashMap<TensorId, usize> = HashMap::new();
    for index in 0..n {
        for p in model.segment_parameters(index) {
            first_use.entry(p.var.as_tensor().id()).or_insert(index);
        }
    }

    // Backward, last segment first.
    let mut grad_out: Option<Tensor> = None;
    for index in (0..n).rev() {
        let Saved { input, output } = saved.pop().expect("one saved entry per segment");
        let seg_ctx = ctx.for_segment(index);
        let output = match output {
            Some(output) => output,
            None => model.forward_segment(index, &input, batch, &seg_ctx)?,
        };
        let seed = if index + 1 == n {
            None
        } else {
            match grad_out.take() {
                Some(g) => Some(g),
                None => bail!(
                    "segment `{}` received no gradient for its output: the next segment does not depend on it",
                    model.segment_name(index)
                ),
            }
        };
        let backward = |output: Tensor| -> Result<candle::backprop::GradStore> {
            let root = match &seed {
                None if loss_multiplier == 1.0 => output,
                None => output.affine(loss_multiplier, 0.0)?,
                Some(g) => output.mul(g)?.sum_all()?,
            };
            root.backward()
        };
        let mut grads = backward(output)?;
        let wants_input_grad = index > 0 && !input.dtype().is_int();
        let mut input = input;
        if wants_input_grad && grads.get(&input).is_none() {
            drop(grads);
            input = as_leaf(&input)?;
            grads = backward(model.forward_segment(index, &input, batch, &seg_ctx)?)?;
        }
        let parameters: Vec<SegmentParameter> = model.segment_parameters(index);
        let mut gradients = Vec::with_capacity(parameters.len());
        for SegmentParameter { name, var } in parameters {
            let Some(grad) = grads.get(var.as_tensor()) else {
                bail!(
                    "parameter `{name}` received no gradient in segment `{}`: an op without a backward rule is upstream of it",
                    model.segment_name(index)
                );
            };
            let is_final = first_use.get(&var.as_tensor().id()) == Some(&index);
            gradients.push(ParameterGradient { name, var, grad: grad.detach(), is_final });
        }
        if wants_input_grad {
            grad_out = grads.get(&input).map(Tensor::detach);
        }
        drop(grads);
        drop(input);
        hook(SegmentGradients { segment: index, gradients })?;
    }
    Ok(loss_value)
}

#[cfg(test)]
mod tests {
    use candle::{Device, Result, Tensor, Var};

    use super::*;

    /// `loss = sum(relu-free chain)`: segment 0 scales by `a`, segment 1 by `b` (which an op
    /// "without backward", modelled by `detach`, cuts off when `cut` is set), segment 2 sums.
    struct Chain {
        a: Var,
        b: Var,
        cut: bool,
        stateful: bool,
    }

    impl SegmentedModel for Chain {
        type Batch = Tensor;
        fn num_segments(&self) -> usize {
            3
        }
        fn segment_name(&self, index: usize) -> String {
            ["scale_a", "scale_b", "loss"][index].into()
        }
        fn first_input(&self, batch: &Tensor) -> Result<Tensor> {
            Ok(batch.clone())
        }
        fn forward_segment(&self, i: usize, x: &Tensor, _: &Tensor, _: &SegmentContext) -> Result<Tensor> {
            match i {
                0 => x.broadcast_mul(self.a.as_tensor()),
                1 if self.cut => x.broadcast_mul(&self.b.as_tensor().detach()),
                1 => x.broadcast_mul(self.b.as_tensor()),
                _ => x.sqr()?.sum_all(),
            }
        }
        fn segment_parameters(&self, i: usize) -> Vec<SegmentParameter> {
            let p = |name: &str, var: &Var| SegmentParameter { name: name.into(), var: var.clone() };
            match i {
                0 => vec![p("a", &self.a)],
                1 => vec![p("b", &self.b)],
                _ => vec![],
            }
        }
        fn stateful_layer(&self, index: usize) -> Option<String> {
            (self.stateful && index == 1).then(|| "kv_cache".to_string())
        }
    }

    fn chain(cut: bool, stateful: bool) -> Result<Chain> {
        Ok(Chain { a: Var::new(&[2f64], &Device::Cpu)?, b: Var::new(&[3f64], &Device::Cpu)?, cut, stateful })
    }

    fn run(model: &Chain, decisions: &[Decision]) -> Result<Vec<(String, f64, bool)>> {
        let x = Tensor::new(&[1f64, -2.0], &Device::Cpu)?;
        let mut out = vec![];
        forward_backward(model, &x, SegmentContext::eval(), decisions, 0.5, |g| {
            for p in g.gradients {
                out.push((p.name, p.grad.to_vec1::<f64>()?[0], p.is_final));
            }
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn gradients_are_exact_under_every_decision_and_scaled_by_the_multiplier() -> Result<()> {
        // loss = sum((a b x)^2) = a^2 b^2 |x|^2 = 36 * 5; dL/da = 2 a b^2 |x|^2 = 180, dL/db = 120.
        let model = chain(false, false)?;
        use Decision::{Keep, Recompute};
        for decisions in [[Keep, Keep, Keep], [Recompute, Recompute, Keep], [Recompute, Keep, Recompute]] {
            let grads = run(&model, &decisions)?;
            assert_eq!(grads, vec![("b".into(), 60.0, true), ("a".into(), 90.0, true)], "{decisions:?}");
        }
        Ok(())
    }

    /// Segment 1 first squares its input (an op that tracks nothing on a detached input), so
    /// the engine must fall back to a variable copy to pass a gradient on to segment 0.
    struct UntrackedFirstOp {
        a: Var,
        b: Var,
    }

    impl SegmentedModel for UntrackedFirstOp {
        type Batch = Tensor;
        fn num_segments(&self) -> usize {
            3
        }
        fn segment_name(&self, index: usize) -> String {
            format!("s{index}")
        }
        fn first_input(&self, batch: &Tensor) -> Result<Tensor> {
            Ok(batch.clone())
        }
        fn forward_segment(&self, i: usize, x: &Tensor, _: &Tensor, _: &SegmentContext) -> Result<Tensor> {
            match i {
                0 => x.broadcast_mul(self.a.as_tensor()),
                1 => x.sqr()?.broadcast_mul(self.b.as_tensor()),
                _ => x.sum_all(),
            }
        }
        fn segment_parameters(&self, i: usize) -> Vec<SegmentParameter> {
            let p = |name: &str, var: &Var| SegmentParameter { name: name.into(), var: var.clone() };
            match i {
                0 => vec![p("a", &self.a)],
                1 => vec![p("b", &self.b)],
                _ => vec![],
            }
        }
    }

    #[test]
    fn a_segment_whose_first_op_tracks_nothing_still_passes_its_input_gradient_on() -> Result<()> {
        // loss = b * a^2 * |x|^2 with a = 2, b = 3, |x|^2 = 5: dL/da = 2 a b |x|^2 = 60, dL/db = 20.
        let model =
            UntrackedFirstOp { a: Var::new(&[2f64], &Device::Cpu)?, b: Var::new(&[3f64], &Device::Cpu)? };
        let x = Tensor::new(&[1f64, -2.0], &Device::Cpu)?;
        for decisions in [[Decision::Keep; 3], [Decision::Recompute, Decision::Recompute, Decision::Keep]] {
            let mut out = vec![];
            forward_backward(&model, &x, SegmentContext::eval(), &decisions, 1.0, |g| {
                for p in g.gradients {
                    out.push((p.name, p.grad.to_vec1::<f64>()?[0]));
                }
                Ok(())
            })?;
            assert_eq!(out, vec![("b".to_string(), 20.0), ("a".to_string(), 60.0)], "{decisions:?}");
        }
        Ok(())
    }

    #[test]
    fn a_parameter_cut_off_from_the_loss_is_named_in_the_error() -> Result<()> {
        let err = run(&chain(true, false)?, &[Decision::Keep; 3]).err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("parameter `b` received no gradient in segment `scale_b`"), "{err}");
        Ok(())
    }

    #[test]
    fn recomputing_a_stateful_segment_is_refused_and_wrong_decision_counts_too() -> Result<()> {
        let model = chain(false, true)?;
        let err =
            run(&model, &[Decision::Keep, Decision::Recompute, Decision::Keep]).err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("`scale_b` cannot be recomputed: its layer `kv_cache`"));
        assert!(run(&model, &[Decision::Keep; 3]).is_ok());
        let err = run(&model, &[Decision::Keep; 2]).err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("2 recompute decisions given for a model of 3 segments"));
        Ok(())
    }
}
