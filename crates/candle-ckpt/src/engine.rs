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
    /// The parameter's id ([`SegmentParameter::id`]): the key an updater finds its
    /// accumulator by.
    pub id: TensorId,
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

pub(crate) struct Saved {
    /// The detached input the segment ran on.
    input: Tensor,
    /// The output with its graph, for kept segments.
    output: Option<Tensor>,
}

/// A segment's input as a tracked leaf: a variable holding the activation's values.
///
/// Candle records no op whose inputs are all untracked, so a segment run on a detached
/// (constant) input would lose the gradient of every branch whose first op touches only that
/// input (a norm's statistics, a view, a cast): only branches where a parameter joins early
/// would send gradient back, and the engine would return a wrong input gradient without any
/// error. A variable is tracked by every op that consumes it, so it always receives its full
/// gradient.
///
/// Candle offers no way to mark an existing storage as a variable (`Var::from_tensor` of a
/// non-variable copies; `Tensor::from_storage` takes the storage by value), so this costs
/// one copy of the segment's input: for a kept segment its bytes stay in the graph until the
/// segment's backward, for a recomputed one only while it is recomputed. Measured on the
/// default GPT (4 blocks of width 128, 16 x 128 tokens, F32): peak heap 239.6 -> 243.6 MiB
/// (+1.7%) keeping every graph, 143.5 -> 144.5 MiB (+0.7%) recomputing every block; step time
/// unchanged within the noise of a shared machine. Integer inputs (token ids) have no gradient
/// and are passed through.
pub fn tracked_input(x: &Tensor) -> Result<Tensor> {
    if x.dtype().is_int() || x.is_variable() {
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
        for p in model.segment_parameters(index) {
            let id = p.id();
            if !seen.insert(id) {
                continue;
            }
            let Some(grad) = grads.get_id(id) else {
                let info = [crate::diagnose::ParameterInfo { name: &p.name, rank: p.rank(), absent: true }];
                bail!(
                    "parameter `{}` received no gradient: {}",
                    p.name,
                    crate::diagnose::no_gradient_cause(0, &info)
                );
            };
            gradients.push(ParameterGradient { name: p.name, id, grad: grad.clone(), is_final: true });
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
        let input = if index > 0 { tracked_input(&x)? } else { x.clone() };
        drop(x);
        let output = model.forward_segment(index, &input, batch, &ctx.for_segment(index))?;
        drop(input);
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
        let (entry, next) = forward_one(model, index, keep, x, batch, ctx)?;
        saved.push(entry);
        x = next;
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

    let first_use = first_uses(model);

    // Backward, last segment first.
    let mut grad_out: Option<Tensor> = None;
    for index in (0..n).rev() {
        let entry = saved.pop().expect("one saved entry per segment");
        grad_out =
            backward_one(model, index, entry, grad_out, batch, ctx, loss_multiplier, &first_use, &mut hook)?;
    }
    Ok(loss_value)
}

/// One segment's forward as the engine runs it: kept (`keep`: its graph built on a tracked
/// input) or run without keeping its graph (its input saved for the recompute). Returns what
/// is saved for the backward and the next segment's (detached) input; `x` is consumed.
pub(crate) fn forward_one<M: SegmentedModel>(
    model: &M,
    index: usize,
    keep: bool,
    x: Tensor,
    batch: &M::Batch,
    ctx: SegmentContext,
) -> Result<(Saved, Tensor)> {
    let seg_ctx = ctx.for_segment(index);
    if keep {
        // A kept graph is built on a tracked input, so every branch reaches it.
        let input = if index > 0 { tracked_input(&x)? } else { x.clone() };
        let output = model.forward_segment(index, &input, batch, &seg_ctx)?;
        let next = output.detach();
        drop(x);
        Ok((Saved { input, output: Some(output) }, next))
    } else {
        // No graph is kept: the detached input is enough (it is tracked when recomputed).
        let output = model.forward_segment(index, &x, batch, &seg_ctx)?.detach();
        Ok((Saved { input: x, output: None }, output))
    }
}

/// One segment's backward as the engine runs it (recomputing its forward when only its input
/// was saved): the vector-Jacobian product with `grad_out` (or the loss times
/// `loss_multiplier` for the last segment), the gradients handed to `hook`, the graph dropped.
/// Returns the gradient of the segment's input, for the segment before it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_one<M, H>(
    model: &M,
    index: usize,
    entry: Saved,
    grad_out: Option<Tensor>,
    batch: &M::Batch,
    ctx: SegmentContext,
    loss_multiplier: f64,
    first_use: &HashMap<TensorId, usize>,
    hook: &mut H,
) -> Result<Option<Tensor>>
where
    M: SegmentedModel,
    H: FnMut(SegmentGradients) -> Result<()>,
{
    let n = model.num_segments();
    let Saved { input, output } = entry;
    let seg_ctx = ctx.for_segment(index);
    let (input, output) = match output {
        Some(output) => (input, output),
        None => {
            let input = if index > 0 { tracked_input(&input)? } else { input };
            let output = model.forward_segment(index, &input, batch, &seg_ctx)?;
            (input, output)
        }
    };
    let seed = if index + 1 == n {
        None
    } else {
        match grad_out {
            Some(g) => Some(g),
            None => bail!(
                "segment `{}` received no gradient for its output: the next segment does not depend on it",
                model.segment_name(index)
            ),
        }
    };
    model.before_backward(index)?;
    let root = match seed {
        None if loss_multiplier == 1.0 => output,
        None => output.affine(loss_multiplier, 0.0)?,
        Some(g) => output.mul(&g)?.sum_all()?,
    };
    let grads = root.backward()?;
    drop(root);
    let wants_input_grad = index > 0 && !input.dtype().is_int();
    let parameters: Vec<SegmentParameter> = model.segment_parameters(index);
    let mut gradients = Vec::with_capacity(parameters.len());
    for p in &parameters {
        let (name, id) = (&p.name, p.id());
        let Some(grad) = grads.get_id(id) else {
            let all: Vec<crate::diagnose::ParameterInfo> = parameters
                .iter()
                .map(|p| crate::diagnose::ParameterInfo {
                    name: &p.name,
                    rank: p.rank(),
                    absent: grads.get_id(p.id()).is_none(),
                })
                .collect();
            let position = all.iter().position(|p| p.name == name.as_str()).unwrap_or(0);
            bail!(
                "parameter `{name}` received no gradient in segment `{}`: {}",
                model.segment_name(index),
                crate::diagnose::no_gradient_cause(position, &all)
            );
        };
        let is_final = first_use.get(&id) == Some(&index);
        gradients.push(ParameterGradient { name: name.clone(), id, grad: grad.detach(), is_final });
    }
    let grad_in = if wants_input_grad { grads.get(&input).map(Tensor::detach) } else { None };
    drop(grads);
    drop(input);
    hook(SegmentGradients { segment: index, gradients })?;
    Ok(grad_in)
}

/// The first segment (in forward order) that lists each parameter.
pub(crate) fn first_uses<M: SegmentedModel>(model: &M) -> HashMap<TensorId, usize> {
    let mut first_use: HashMap<TensorId, usize> = HashMap::new();
    for index in 0..model.num_segments() {
        for p in model.segment_parameters(index) {
            first_use.entry(p.id()).or_insert(index);
        }
    }
    first_use
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
            let p = |name: &str, var: &Var| SegmentParameter::new(name, var.clone());
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

    /// Segment 1 is a pre-norm residual block, `x + w * (x - mean(x))`: the branch starts with
    /// a reduction and a subtraction that touch only the input, which Candle records only when
    /// the input is tracked; a detached input would get the residual's gradient alone.
    struct PreNorm {
        a: Var,
        w: Var,
    }

    impl SegmentedModel for PreNorm {
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
                1 => {
                    let centered = x.broadcast_sub(&x.mean_keepdim(0)?)?.sqr()?;
                    x + centered.broadcast_mul(self.w.as_tensor())?
                }
                _ => x.sqr()?.sum_all(),
            }
        }
        fn segment_parameters(&self, i: usize) -> Vec<SegmentParameter> {
            let p = |name: &str, var: &Var| SegmentParameter::new(name, var.clone());
            match i {
                0 => vec![p("a", &self.a)],
                1 => vec![p("w", &self.w)],
                _ => vec![],
            }
        }
    }

    #[test]
    fn a_branch_that_starts_with_an_op_on_the_input_alone_sends_its_gradient_back() -> Result<()> {
        let model = PreNorm { a: Var::new(&[2f64], &Device::Cpu)?, w: Var::new(&[0.5f64], &Device::Cpu)? };
        let x = Tensor::new(&[1f64, -2.0, 0.5], &Device::Cpu)?;
        let mut plain = vec![];
        plain_forward_backward(&model, &x, SegmentContext::eval(), 1.0, |g| {
            for p in g.gradients {
                plain.push((p.name, p.grad.to_vec1::<f64>()?[0]));
            }
            Ok(())
        })?;
        // By hand: h = a x = [2, -4, 1], c = h - mean(h) = [7/3, -11/3, 4/3],
        // y = h + w c^2, L = sum y^2. dL/dh_i = 2 y_i + 2 w (2 y_i c_i - mean_j(2 y_j c_j)).
        let h = [2.0f64, -4.0, 1.0];
        let mean = h.iter().sum::<f64>() / 3.0;
        let c: Vec<f64> = h.iter().map(|v| v - mean).collect();
        let y: Vec<f64> = h.iter().zip(&c).map(|(h, c)| h + 0.5 * c * c).collect();
        let yc: Vec<f64> = y.iter().zip(&c).map(|(y, c)| 2.0 * y * c).collect();
        let mean_yc = yc.iter().sum::<f64>() / 3.0;
        let dh: Vec<f64> = (0..3).map(|i| 2.0 * y[i] + 2.0 * 0.5 * (yc[i] - mean_yc)).collect();
        let da: f64 = dh.iter().zip([1.0, -2.0, 0.5]).map(|(d, x)| d * x).sum();
        let dw: f64 = y.iter().zip(&c).map(|(y, c)| 2.0 * y * c * c).sum();
        assert!((plain[0].1 - da).abs() < 1e-12 && (plain[1].1 - dw).abs() < 1e-12, "{plain:?}");
        for decisions in [[Decision::Keep; 3], [Decision::Recompute, Decision::Recompute, Decision::Keep]] {
            let mut out = vec![];
            forward_backward(&model, &x, SegmentContext::eval(), &decisions, 1.0, |g| {
                for p in g.gradients {
                    out.push((p.name, p.grad.to_vec1::<f64>()?[0]));
                }
                Ok(())
            })?;
            assert_eq!(
                out,
                vec![("w".to_string(), plain[1].1), ("a".to_string(), plain[0].1)],
                "{decisions:?}"
            );
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
