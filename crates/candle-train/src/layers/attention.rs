//! Causal multi-head self-attention in the GPT-2 arrangement (fused `c_attn`, then `c_proj`).
//! Scores' softmax runs in F32; the matmuls run in the compute dtype.

use candle::{Result, Tensor};
use candle_ckpt::Rng;

use crate::layers::dropout::Dropout;
use crate::layers::linear::{Linear, WeightLayout};
use crate::layers::ops::causal_softmax;
use crate::params::ParamBuilder;

/// Causal self-attention with `n_head` heads over width `n_embd`.
#[derive(Debug, Clone)]
pub struct CausalSelfAttention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    attn_dropout: Dropout,
    resid_dropout: Dropout,
}

impl CausalSelfAttention {
    /// Creates `{prefix}.c_attn` (`[n_embd, 3 n_embd]`) and `{prefix}.c_proj`; `proj_std` is
    /// the output projection's initial std (GPT-2 scales it by `1/sqrt(2 n_layer)`).
    ///
    /// # Errors
    /// When `n_embd` is not divisible by `n_head`, or on allocation failure.
    pub fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        n_embd: usize,
        n_head: usize,
        dropout: Dropout,
        std: f64,
        proj_std: f64,
    ) -> crate::Result<Self> {
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(crate::Error::config(
                "n_head",
                format!("{n_head} heads do not divide the width {n_embd}"),
            ));
        }
        let c_attn =
            Linear::new(pb, &format!("{prefix}.c_attn"), n_embd, 3 * n_embd, WeightLayout::InOut, std)?;
        let c_proj =
            Linear::new(pb, &format!("{prefix}.c_proj"), n_embd, n_embd, WeightLayout::InOut, proj_std)?;
        Ok(Self { c_attn, c_proj, n_head, attn_dropout: dropout, resid_dropout: dropout })
    }

    /// Attends over `x` of shape `[batch, seq, n_embd]`; position `t` sees positions `<= t`.
    /// Draws the two dropout masks from `rng`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, x: &Tensor, rng: &mut Rng, training: bool) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let head_dim = c / self.n_head;
        let qkv = self.c_attn.forward(x)?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * c, c)?.reshape((b, t, self.n_head, head_dim))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let probs = causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (head_dim as f64).sqrt())?;
        let probs = self.attn_dropout.forward(&probs, rng, training)?;
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        let y = self.c_proj.forward(&y)?;
        self.resid_dropout.forward(&y, rng, training)
    }
}
