//! Checking a model's gradients: the segmented engine against one plain backward, and Candle's
//! autograd against finite differences where it reports no gradient.
//!
//! [`verify_gradients`] is what a user runs once on a new model (in F64 ideally): it fails
//! naming every parameter whose gradient is lost to an op without a backward rule (with the
//! op's likely kind and its replacement), and every parameter whose engine gradient differs
//! from the plain backward's.

use std::collections::HashSet;

use candle::{bail, DType, Result, Tensor, TensorId, Var};

use crate::diagnose::{describe, kinds, likely_cause, NoBackwardOp, ParameterInfo};
use crate::engine::{forward, forward_backward, Decision};
use crate::rng::Rng;
use crate::segment::{SegmentContext, SegmentParameter, SegmentedModel};

/// One parameter's gradient from the segmented engine compared with one plain backward's.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientDifference {
    /// The parameter's name.
    pub name: String,
    /// The largest absolute elementwise difference.
    pub max_abs_difference: f64,
    /// The largest absolute element of the plain backward's gradient (the scale).
    pub reference_max_abs: f64,
}

impl GradientDifference {
    /// `max_abs_difference` over the reference's largest element (0 when both are zero).
    pub fn relative(&self) -> f64 {
        if self.max_abs_difference == 0.0 {
            0.0
        } else {
            self.max_abs_difference / self.reference_max_abs
        }
    }
}

/// The engine's gradients against one plain backward's, parameter by parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientReport {
    /// One entry per parameter, in the order the segments list them (first listing).
    pub parameters: Vec<GradientDifference>,
}

impl GradientReport {
    /// The parameters whose relative difference exceeds `tolerance`.
    pub fn differing(&self, tolerance: f64) -> Vec<&GradientDifference> {
        self.parameters.iter().filter(|p| p.relative().is_nan() || p.relative() > tolerance).collect()
    }

    /// The largest relative difference over all parameters.
    pub fn max_relative_difference(&self) -> f64 {
        self.parameters.iter().map(GradientDifference::relative).fold(0.0, f64::max)
    }

    /// # Errors
    /// Naming every parameter whose relative difference exceeds `tolerance`.
    pub fn ensure_within(&self, tolerance: f64) -> Result<()> {
        let differing = self.differing(tolerance);
        if differing.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = differing
            .iter()
            .map(|p| format!("`{}` (relative difference {:.2e})", p.name, p.relative()))
            .collect();
        bail!(
            "the segmented engine's gradients differ from one plain backward's beyond {tolerance:e} for {} parameter(s): {}",
            differing.len(),
            names.join(", ")
        )
    }
}

/// A parameter whose gradient Candle's autograd reports as zero or absent where the loss does
/// change with it: an op without a backward rule lies between it and the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct MissingGradient {
    /// The parameter's name.
    pub name: String,
    /// The first segment (in forward order) that lists it.
    pub segment: String,
    /// How many of its elements got no or a zero gradient.
    pub zero_elements: usize,
    /// Its number of elements.
    pub elements: usize,
    /// The loss's central finite difference along a random direction over those elements
    /// (autograd says it is 0).
    pub finite_difference: f64,
    /// Autograd gave no gradient at all (rather than zeros).
    pub absent: bool,
    /// The parameter is itself an input of the op (a fused norm's weight or bias); otherwise
    /// the op lies between it and the loss.
    pub input_of_op: bool,
    /// The ops without a backward rule it most likely meets, most likely first.
    pub likely_ops: Vec<NoBackwardOp>,
}

impl std::fmt::Display for MissingGradient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.absent {
            "no gradient".to_string()
        } else {
            format!("zero on {} of {} elements", self.zero_elements, self.elements)
        };
        let place = if self.input_of_op { "input of" } else { "upstream of" };
        write!(
            f,
            "`{}` (segment `{}`, {what}, finite difference {:.2e}): {place} {}",
            self.name,
            self.segment,
            self.finite_difference,
            kinds(&self.likely_ops)
        )
    }
}

/// The error message for parameters that lose their gradient: one clause per parameter, then
/// each op named once with its replacement.
pub fn missing_gradients_message(missing: &[MissingGradient]) -> String {
    let lines: Vec<String> = missing.iter().map(ToString::to_string).collect();
    let mut named: Vec<NoBackwardOp> = Vec::new();
    for op in missing.iter().flat_map(|m| m.likely_ops.iter()) {
        if !named.contains(op) {
            named.push(*op);
        }
    }
    let replacements: Vec<String> = named.iter().map(|op| describe(std::slice::from_ref(op))).collect();
    format!(
        "{} parameter(s) lose their gradient to an op without a backward rule (Candle records none and drops \
         the gradient silently): {}. The ops: {}",
        missing.len(),
        lines.join("; "),
        replacements.join("; ")
    )
}

/// Every parameter once, with the first segment that lists it.
fn unique_parameters<M: SegmentedModel>(model: &M) -> Vec<(SegmentParameter, usize)> {
    let mut seen: HashSet<TensorId> = HashSet::new();
    let mut out = Vec::new();
    for index in 0..model.num_segments() {
        for p in model.segment_parameters(index) {
            if seen.insert(p.id()) {
                out.push((p, index));
            }
        }
    }
    out
}

/// One plain forward and backward: the loss and every parameter's gradient (`None` when
/// autograd gave none), detached.
fn plain_gradients<M: SegmentedModel>(
    model: &M,
    batch: &M::Batch,
    ctx: SegmentContext,
    parameters: &[(SegmentParameter, usize)],
) -> Result<(f64, Vec<Option<Tensor>>)> {
    let mut x = model.first_input(batch)?;
    for index in 0..model.num_segments() {
        x = model.forward_segment(index, &x, batch, &ctx.for_segment(index))?;
    }
    let loss = scalar(&x)?;
    let grads = x.backward()?;
    let out = parameters.iter().map(|(p, _)| grads.get_id(p.id()).map(Tensor::detach)).collect();
    Ok((loss, out))
}

fn scalar(x: &Tensor) -> Result<f64> {
    if x.elem_count() != 1 {
        bail!("the last segment must return a scalar loss, got shape {:?}", x.shape());
    }
    x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>().map(|v| v[0])
}

/// The loss with `var` moved to `value` (restored before returning, also on error).
fn loss_at<M: SegmentedModel>(
    model: &M,
    batch: &M::Batch,
    ctx: SegmentContext,
    var: &Var,
    original: &Tensor,
    value: &Tensor,
) -> Result<f64> {
    var.set(value)?;
    let loss = forward(model, batch, ctx).and_then(|l| scalar(&l));
    var.set(original)?;
    loss
}

/// Finds the parameters whose gradient an op without a backward rule loses: for each
/// parameter with elements of zero or absent gradient, the loss's central finite difference
/// along a random ±1 direction over those elements (autograd says 0) must be 0 too; when it
/// is not, the parameter is reported with the ops it most likely sits before.
///
/// Costs one plain backward plus two forwards per parameter that has zero-gradient elements;
/// every parameter is restored exactly. Run it in F64 (finite differences in F32 only catch
/// gross losses: step 1e-2, tolerance 1e-3 of the loss).
///
/// # Errors
/// On any error of the model, or when the loss is not a scalar.
pub fn check_backward_rules<M: SegmentedModel>(
    model: &M,
    batch: &M::Batch,
    ctx: SegmentContext,
) -> Result<Vec<MissingGradient>> {
    let parameters = unique_parameters(model);
    let (loss, grads) = plain_gradients(model, batch, ctx, &parameters)?;
    let mut suspects = Vec::new();
    for ((p, segment), grad) in parameters.iter().zip(&grads) {
        let value = p.var()?.as_tensor();
        if value.dtype().is_int() {
            continue;
        }
        // 1 where the gradient is absent or exactly zero.
        let mask = match grad {
            None => value.ones_like()?.to_dtype(DType::F64)?,
            Some(g) => g.to_dtype(DType::F64)?.eq(0.0)?.to_dtype(DType::F64)?,
        };
        let zero_elements = mask.sum_all()?.to_scalar::<f64>()? as usize;
        if zero_elements > 0 {
            suspects.push((p, *segment, mask, zero_elements, grad.is_none()));
        }
    }
    let infos: Vec<ParameterInfo> = parameters
        .iter()
        .zip(&grads)
        .map(|((p, _), g)| ParameterInfo { name: &p.name, rank: p.rank(), absent: g.is_none() })
        .collect();
    let mut found = Vec::new();
    for (k, (p, segment, mask, zero_elements, absent)) in suspects.iter().enumerate() {
        let var = p.var()?;
        let value = var.as_tensor();
        let (step, tolerance) = match value.dtype() {
            DType::F64 => (1e-4, 1e-7 * (1.0 + loss.abs())),
            _ => (1e-2, 1e-3 * (1.0 + loss.abs())),
        };
        // A ±1 direction over the suspect elements, seeded by the parameter's position.
        let mut rng = Rng::seeded(0x9e37_79b9 + k as u64);
        let signs: Vec<f64> =
            (0..value.elem_count()).map(|_| if rng.next_u64() & 1 == 0 { -1.0 } else { 1.0 }).collect();
        let direction = Tensor::from_vec(signs, value.shape(), value.device())?.mul(mask)?;
        let original = value.copy()?;
        let shifted = |sign: f64| -> Result<Tensor> {
            original.to_dtype(DType::F64)?.add(&direction.affine(sign * step, 0.0)?)?.to_dtype(value.dtype())
        };
        let plus = loss_at(model, batch, ctx, var, &original, &shifted(1.0)?)?;
        let minus = loss_at(model, batch, ctx, var, &original, &shifted(-1.0)?)?;
        let finite_difference = (plus - minus) / (2.0 * step);
        if finite_difference.abs() > tolerance {
            let position = infos.iter().position(|i| i.name == p.name).unwrap_or(0);
            let cause = likely_cause(position, &infos);
            found.push(MissingGradient {
                name: p.name.clone(),
                segment: model.segment_name(*segment),
                zero_elements: *zero_elements,
                elements: value.elem_count(),
                finite_difference,
                absent: *absent,
                input_of_op: cause.input_of_op,
                likely_ops: cause.ops,
            });
        }
    }
    Ok(found)
}

/// Compares the segmented engine's gradients under `decisions` with one plain backward's,
/// parameter by parameter (a parameter several segments use is summed over them).
///
/// # Errors
/// When the engine refuses the model (naming the segment and the cause), or on any error of
/// the model.
pub fn compare_gradients<M: SegmentedModel>(
    model: &M,
    batch: &M::Batch,
    ctx: SegmentContext,
    decisions: &[Decision],
) -> Result<GradientReport> {
    let parameters = unique_parameters(model);
    let (_, plain) = plain_gradients(model, batch, ctx, &parameters)?;
    let mut engine: Vec<Option<Tensor>> = vec![None; parameters.len()];
    let position: std::collections::HashMap<TensorId, usize> =
        parameters.iter().enumerate().map(|(i, (p, _))| (p.id(), i)).collect();
    forward_backward(model, batch, ctx, decisions, 1.0, |segment| {
        for g in segment.gradients {
            let Some(&i) = position.get(&g.id) else { continue };
            let grad = g.grad.to_dtype(DType::F64)?;
            engine[i] = Some(match engine[i].take() {
                Some(sum) => (sum + grad)?,
                None => grad,
            });
        }
        Ok(())
    })?;
    let mut report = Vec::with_capacity(parameters.len());
    for (((p, _), plain), engine) in parameters.iter().zip(plain).zip(engine) {
        let (max_abs_difference, reference_max_abs) = match (plain, engine) {
            (Some(plain), Some(engine)) => {
                let plain = plain.to_dtype(DType::F64)?;
                let difference = (&engine - &plain)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
                (difference, plain.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
            }
            (None, None) => (0.0, 0.0),
            (plain, _) => {
                let side = if plain.is_none() { "the plain backward" } else { "the segmented engine" };
                bail!("parameter `{}` got no gradient from {side} but one from the other", p.name)
            }
        };
        report.push(GradientDifference { name: p.name.clone(), max_abs_difference, reference_max_abs });
    }
    Ok(GradientReport { parameters: report })
}

/// Checks a model's gradients once, as a user should before training a new model (ideally in
/// F64): first that no parameter loses its gradient to an op without a backward rule
/// ([`check_backward_rules`]), then that the segmented engine under `decisions` gives every
/// parameter the gradient of one plain backward within `tolerance` (relative to each
/// parameter's largest gradient element). Returns the comparison.
///
/// # Errors
/// Naming every parameter whose gradient an op without a backward rule loses (with the op's
/// likely kind and replacement), or every parameter whose engine gradient differs; when the
/// engine refuses the model; on any error of the model.
pub fn verify_gradients<M: SegmentedModel>(
    model: &M,
    batch: &M::Batch,
    ctx: SegmentContext,
    decisions: &[Decision],
    tolerance: f64,
) -> Result<GradientReport> {
    let missing = check_backward_rules(model, batch, ctx)?;
    if !missing.is_empty() {
        bail!("{}", missing_gradients_message(&missing))
    }
    let report = compare_gradients(model, batch, ctx, decisions)?;
    report.ensure_within(tolerance)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use candle::{Device, Result, Tensor, Var};

    use super::*;

    /// Segment 1 behaves differently when its input is a variable (as under the engine): a
    /// stand-in for any engine bug, so the comparison has something to find.
    struct Sneaky {
        a: Var,
        b: Var,
        sneaky: bool,
    }

    impl SegmentedModel for Sneaky {
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
                1 if self.sneaky && x.is_variable() => x.broadcast_mul(self.b.as_tensor())?.affine(1.5, 0.0),
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
    }

    fn sneaky(sneaky: bool) -> Result<Sneaky> {
        Ok(Sneaky { a: Var::new(&[2f64], &Device::Cpu)?, b: Var::new(&[3f64], &Device::Cpu)?, sneaky })
    }

    #[test]
    fn differing_parameters_are_named_and_equal_ones_pass() -> Result<()> {
        let x = Tensor::new(&[1f64, -2.0], &Device::Cpu)?;
        let decisions = [Decision::Recompute, Decision::Keep, Decision::Keep];
        let report = verify_gradients(&sneaky(false)?, &x, SegmentContext::eval(), &decisions, 0.0)?;
        assert_eq!(report.max_relative_difference(), 0.0);
        assert_eq!(report.parameters.len(), 2);
        let report = compare_gradients(&sneaky(true)?, &x, SegmentContext::eval(), &decisions)?;
        // The engine's gradients are 1.5² times the plain ones.
        for p in &report.parameters {
            assert!((p.relative() - 1.25).abs() < 1e-12, "{p:?}");
        }
        let err = verify_gradients(&sneaky(true)?, &x, SegmentContext::eval(), &decisions, 1e-12)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("for 2 parameter(s): `a` (relative difference 1.25e0), `b`"), "{err}");
        Ok(())
    }

    /// `b` is used only through a detached copy (an op without a backward rule, modelled):
    /// autograd gives it no gradient while the loss depends on it.
    #[test]
    fn a_parameter_the_loss_depends_on_without_a_gradient_is_found_and_an_unused_one_is_not() -> Result<()> {
        struct Cut {
            a: Var,
            b: Var,
            unused: Var,
        }
        impl SegmentedModel for Cut {
            type Batch = Tensor;
            fn num_segments(&self) -> usize {
                2
            }
            fn segment_name(&self, index: usize) -> String {
                format!("s{index}")
            }
            fn first_input(&self, batch: &Tensor) -> Result<Tensor> {
                Ok(batch.clone())
            }
            fn forward_segment(
                &self,
                i: usize,
                x: &Tensor,
                _: &Tensor,
                _: &SegmentContext,
            ) -> Result<Tensor> {
                match i {
                    0 => x.broadcast_mul(self.a.as_tensor())?.broadcast_mul(&self.b.as_tensor().detach()),
                    _ => x.sqr()?.sum_all(),
                }
            }
            fn segment_parameters(&self, i: usize) -> Vec<SegmentParameter> {
                let p = |name: &str, var: &Var| SegmentParameter::new(name, var.clone());
                match i {
                    0 => vec![p("a", &self.a), p("layer.weight", &self.b), p("other.weight", &self.unused)],
                    _ => vec![],
                }
            }
        }
        let dev = Device::Cpu;
        let model = Cut {
            a: Var::new(&[[2f64]], &dev)?,
            b: Var::new(&[[3f64]], &dev)?,
            unused: Var::new(&[[1f64]], &dev)?,
        };
        let x = Tensor::new(&[[1f64], [-2.0]], &dev)?;
        let before = model.b.as_tensor().to_vec2::<f64>()?;
        let missing = check_backward_rules(&model, &x, SegmentContext::eval())?;
        assert_eq!(missing.len(), 1, "{missing:?}");
        let m = &missing[0];
        assert_eq!(
            (m.name.as_str(), m.segment.as_str(), m.absent, m.elements),
            ("layer.weight", "s0", true, 1)
        );
        // dL/db = 2 a² b |x|² = 120 (central differences are exact for this quadratic).
        assert!((m.finite_difference.abs() - 120.0).abs() < 1e-6, "{m:?}");
        // Every parameter is restored exactly.
        assert_eq!(model.b.as_tensor().to_vec2::<f64>()?, before);
        Ok(())
    }
}
