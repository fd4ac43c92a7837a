//! Trainable layers. Every one has a real backward: none uses a Candle op without a backward
//! rule, and each is checked against central finite differences in F64.

pub mod attention;
pub mod custom_grad;
pub mod dropout;
pub mod embedding;
pub mod fused;
mod gemm_bf16;
pub mod grouped_attention;
pub mod layer_norm;
pub mod linear;
pub mod loss;
pub mod mlp;
pub mod ops;
pub mod rms_norm;
pub mod rotary;
pub mod swiglu;

pub use attention::{scaled_dot_product_attention, AttentionMask, CausalSelfAttention};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use grouped_attention::{AttentionOptions, GroupedQueryAttention};
pub use layer_norm::LayerNorm;
pub use linear::{Linear, WeightLayout};
pub use loss::{
    cross_entropy, cross_entropy_masked_sum, cross_entropy_sum, token_cross_entropy, IGNORE_INDEX,
};
pub use mlp::Mlp;
pub use rms_norm::RmsNorm;
pub use rotary::Rotary;
pub use swiglu::SwiGlu;

/// Test support: the gradients of the scalar `loss` with respect to `vars`, in order (an error
/// naming the first argument without one).
#[cfg(test)]
pub(crate) fn gradients(loss: &candle::Tensor, vars: &[candle::Var]) -> candle::Result<Vec<candle::Tensor>> {
    let grads = loss.backward()?;
    vars.iter()
        .enumerate()
        .map(|(i, v)| {
            grads
                .get(v.as_tensor())
                .cloned()
                .ok_or_else(|| candle::Error::Msg(format!("no gradient for argument {i}")))
        })
        .collect()
}

/// Test support: asserts that a fused op's result `fused` and the unfused ops' `reference`,
/// both computed from `vars`, have the same dtype, shape and values bit for bit, and so have the
/// gradients of `loss` of each with respect to every var; no gradient may be all zero (a broken
/// path could give zeros on both sides).
#[cfg(test)]
pub(crate) fn assert_same_values_and_gradients(
    fused: &candle::Tensor,
    reference: &candle::Tensor,
    vars: &[candle::Var],
    loss: impl Fn(&candle::Tensor) -> candle::Result<candle::Tensor>,
    what: &str,
) -> candle::Result<()> {
    let largest = |t: &candle::Tensor| -> candle::Result<f64> {
        t.to_dtype(candle::DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
    };
    let difference = |a: &candle::Tensor, b: &candle::Tensor| -> candle::Result<f64> {
        largest(&(a.to_dtype(candle::DType::F64)? - b.to_dtype(candle::DType::F64)?)?)
    };
    assert_eq!((fused.dtype(), fused.dims()), (reference.dtype(), reference.dims()), "{what}");
    assert_eq!(difference(fused, reference)?, 0.0, "{what}: values");
    let (ours, theirs) = (gradients(&loss(fused)?, vars)?, gradients(&loss(reference)?, vars)?);
    for (i, (a, r)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a.dtype(), vars[i].dtype(), "{what}: gradient {i}'s dtype");
        assert!(largest(a)? > 1e-4, "{what}: gradient {i} is all zero");
        assert_eq!(difference(a, r)?, 0.0, "{what}: gradient {i}");
    }
    Ok(())
}

/// Test support: asserts that `analytic[k]`, an op's F64 gradient with respect to `args[k]`,
/// equals central differences of `loss` (evaluated through the op) at every coordinate of
/// every argument: h = 1e-5 (error about 1e-10), within 1e-7 relative (absolute below 1).
#[cfg(test)]
pub(crate) fn assert_finite_differences(
    args: &[candle::Tensor],
    analytic: &[candle::Tensor],
    loss: impl Fn(&[candle::Tensor]) -> candle::Result<f64>,
) -> candle::Result<()> {
    assert_eq!(args.len(), analytic.len(), "one gradient per argument");
    let h = 1e-5;
    for (which, (base, grad)) in args.iter().zip(analytic).enumerate() {
        let flat = base.flatten_all()?.to_vec1::<f64>()?;
        let analytic = grad.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(flat.len(), analytic.len(), "argument {which}: gradient of another shape");
        for i in 0..flat.len() {
            let shifted = |delta: f64| -> candle::Result<f64> {
                let mut values = flat.clone();
                values[i] += delta;
                let mut moved = args.to_vec();
                moved[which] = candle::Tensor::from_vec(values, base.shape(), base.device())?;
                loss(&moved)
            };
            let numeric = (shifted(h)? - shifted(-h)?) / (2.0 * h);
            let error = (numeric - analytic[i]).abs();
            assert!(
                error <= 1e-7 * analytic[i].abs().max(1.0),
                "argument {which}[{i}]: {numeric} vs {}",
                analytic[i]
            );
        }
    }
    Ok(())
}
