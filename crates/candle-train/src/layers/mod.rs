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
