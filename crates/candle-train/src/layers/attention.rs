//! Attention: one scaled-dot-product attention with a mask type (causal, key padding) and
//! grouped-query key/value heads, and GPT-2's causal self-attention built on it (fused
//! `c_attn`, then `c_proj`). Scores' softmax runs in F32; the matmuls run in the compute dtype.

use candle::{Result, Tensor};
use candle_ckpt::Rng;

use crate::layers::dropout::Dropout;
use crate::layers::linear::{Linear, WeightLayout};
use crate::layers::ops::{causal_softmax, masked_softmax};
use crate::module::ModuleBuilder;
use crate::params::ParamBuilder;

/// Which keys a query attends to.
#[derive(Debug, Clone, Copy)]
pub enum AttentionMask<'a> {
    /// Query position `t` sees key positions `<= t` (decoders).
    Causal,
    /// Every key except padding: `bias` (`[batch, 1, 1, keys]`, from
    /// [`padding_bias`](crate::layers::ops::padding_bias)) is added to the scaled scores.
    KeyPadding(&'a Tensor),
}

/// Dropout on the attention probabilities: the layer, the generator its mask is drawn from, and
/// whether the model is training.
pub type ProbsDropout<'a, 'r> = (&'a Dropout, &'r mut Rng, bool);

/// `softmax(q kᵀ / √d + mask) v` for queries `q` `[batch, heads, t, d]` and keys and values
/// `[batch, kv_heads, keys, d]`, `kv_heads` dividing `heads`: query head `h` uses key/value
/// head `h / (heads / kv_heads)`, as Hugging Face's `repeat_kv` arranges them, without copying
/// keys or values per group (a group's queries are stacked along the sequence axis). The
/// softmax runs in F32 (F64 for F64 scores); `dropout`, when given, applies to the
/// probabilities. Returns `[batch, t, heads * d]`, heads concatenated.
///
/// # Errors
/// On a shape mismatch (`kv_heads` not dividing `heads`, a causal mask over `keys != t`).
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttentionMask<'_>,
    dropout: Option<ProbsDropout<'_, '_>>,
) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let (_, kv_heads, keys, _) = k.dims4()?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        candle::bail!("attention: {kv_heads} key/value heads do not divide {heads} query heads");
    }
    let group = heads / kv_heads;
    let grouped = |x: &Tensor, rows: usize, cols: usize| -> Result<Tensor> {
        if group == 1 {
            Ok(x.clone())
        } else {
            x.reshape((b, kv_heads, group * rows, cols))
        }
    };
    let scores = grouped(q, t, d)?.matmul(&k.t()?)?;
    let scores = if group == 1 { scores } else { scores.reshape((b, heads, t, keys))? };
    let scale = 1.0 / (d as f64).sqrt();
    let probs = match mask {
        AttentionMask::Causal => causal_softmax(&scores, scale)?,
        AttentionMask::KeyPadding(bias) => masked_softmax(&scores, scale, bias)?,
    };
    let probs = match dropout {
        Some((layer, rng, training)) => layer.forward(&probs, rng, training)?,
        None => probs,
    };
    let y = grouped(&probs, t, keys)?.matmul(v)?;
    let y = if group == 1 { y } else { y.reshape((b, heads, t, d))? };
    y.transpose(1, 2)?.reshape((b, t, heads * d))
}

/// Splits `[batch, t, heads * d]` into contiguous heads `[batch, heads, t, d]`.
///
/// # Errors
/// On a shape mismatch.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    x.reshape((b, t, heads, width / heads.max(1)))?.transpose(1, 2)?.contiguous()
}

/// Causal self-attention with `n_head` heads over width `n_embd`.
#[derive(Debug, Clone)]
pub struct CausalSelfAttention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    attn_dropout: Dropout,
    resid_dropout: Dropout,
}

crate::module_fields!(CausalSelfAttention { c_attn, c_proj });

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
        ModuleBuilder::scoped(pb, prefix, |b| Self::build(b, n_embd, n_head, dropout, std, proj_std))
    }

    /// As [`CausalSelfAttention::new`], under `b`'s path.
    ///
    /// # Errors
    /// When `n_embd` is not divisible by `n_head`, or on allocation failure.
    pub fn build(
        b: &ModuleBuilder,
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
        let c_attn = Linear::build(&b.pp("c_attn"), n_embd, 3 * n_embd, WeightLayout::InOut, std)?;
        let c_proj = Linear::build(&b.pp("c_proj"), n_embd, n_embd, WeightLayout::InOut, proj_std)?;
        Ok(Self { c_attn, c_proj, n_head, attn_dropout: dropout, resid_dropout: dropout })
    }

    /// Attends over `x` of shape `[batch, seq, n_embd]`; position `t` sees positions `<= t`.
    /// Draws the two dropout masks from `rng`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, x: &Tensor, rng: &mut Rng, training: bool) -> Result<Tensor> {
        let c = x.dim(2)?;
        let qkv = self.c_attn.forward(x)?;
        let split = |i: usize| split_heads(&qkv.narrow(2, i * c, c)?, self.n_head);
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let dropout = (&self.attn_dropout, &mut *rng, training);
        let y = scaled_dot_product_attention(&q, &k, &v, AttentionMask::Causal, Some(dropout))?;
        self.resid_dropout.forward(&self.c_proj.forward(&y)?, rng, training)
    }
}
