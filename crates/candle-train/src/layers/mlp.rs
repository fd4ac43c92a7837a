//! The transformer feed-forward block: `c_fc`, GELU (tanh approximation, GPT-2's
//! `gelu_new`), `c_proj`, dropout.

use candle::{Result, Tensor};
use candle_ckpt::Rng;

use crate::layers::dropout::Dropout;
use crate::layers::linear::{Linear, WeightLayout};
use crate::module::ModuleBuilder;
use crate::params::ParamBuilder;

/// `dropout(c_proj(gelu(c_fc(x))))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    dropout: Dropout,
}

crate::module_fields!(Mlp { c_fc, c_proj });

impl Mlp {
    /// Creates `{prefix}.c_fc` (`[n_embd, hidden]`) and `{prefix}.c_proj` (`[hidden, n_embd]`).
    ///
    /// # Errors
    /// On allocation failure.
    pub fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        n_embd: usize,
        hidden: usize,
        dropout: Dropout,
        std: f64,
        proj_std: f64,
    ) -> crate::Result<Self> {
        ModuleBuilder::scoped(pb, prefix, |b| Self::build(b, n_embd, hidden, dropout, std, proj_std))
    }

    /// As [`Mlp::new`], under `b`'s path.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn build(
        b: &ModuleBuilder,
        n_embd: usize,
        hidden: usize,
        dropout: Dropout,
        std: f64,
        proj_std: f64,
    ) -> crate::Result<Self> {
        let c_fc = Linear::build(&b.pp("c_fc"), n_embd, hidden, WeightLayout::InOut, std)?;
        let c_proj = Linear::build(&b.pp("c_proj"), hidden, n_embd, WeightLayout::InOut, proj_std)?;
        Ok(Self { c_fc, c_proj, dropout })
    }

    /// Applies the block to `x` of shape `[..., n_embd]`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, x: &Tensor, rng: &mut Rng, training: bool) -> Result<Tensor> {
        // `gelu_tanh(c_fc(x))` as one op.
        let h = self.c_fc.forward_gelu(x)?;
        self.dropout.forward(&self.c_proj.forward(&h)?, rng, training)
    }
}
