//! Trainable layers. Every one has a real backward: none uses a Candle op without a backward
//! rule, and each is checked against central finite differences in F64.

pub mod attention;
pub mod custom_grad;
pub mod dropout;
pub mod embedding;
pub mod fused;
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
