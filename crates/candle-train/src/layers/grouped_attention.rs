//! Causal grouped-query self-attention in Hugging Face LLaMA's arrangement (`q_proj`,
//! `k_proj`, `v_proj`, `o_proj`, rotary positions): `num_heads` query heads share
//! `num_kv_heads` key/value heads in groups, through [`scaled_dot_product_attention`]. The
//! family's variants are options ([`AttentionOptions`]): biases on the projections (Qwen2,
//! LLaMA's `attention_bias`) and an RMSNorm over each query and key head before the rotation
//! (Qwen3's `q_norm`, `k_norm`).

use candle::{Result, Tensor};

use crate::layers::attention::{scaled_dot_product_attention, split_heads, AttentionMask};
use crate::layers::linear::{Linear, WeightLayout};
use crate::layers::rms_norm::RmsNorm;
use crate::layers::rotary::Rotary;
use crate::module::ModuleBuilder;
use crate::params::ParamBuilder;

/// The variants of the attention block within the LLaMA family. By default, none: LLaMA's and
/// Mistral's projections without biases or head norms.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttentionOptions {
    /// Biases on `q_proj`, `k_proj` and `v_proj` (Qwen2; LLaMA and Qwen3 with
    /// `attention_bias`). By default, none.
    pub qkv_bias: bool,
    /// A bias on `o_proj` (LLaMA and Qwen3 with `attention_bias`). By default, none.
    pub o_bias: bool,
    /// An RMSNorm of this epsilon over each query and key head (`q_norm.weight`,
    /// `k_norm.weight`, `[head_dim]`) before the rotation, as Qwen3. By default, none.
    pub qk_norm_eps: Option<f64>,
}

/// Causal self-attention with `num_heads` query heads and `num_kv_heads` key/value heads of
/// `head_dim` dimensions each.
#[derive(Debug, Clone)]
pub struct GroupedQueryAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
}

crate::module_fields!(GroupedQueryAttention { q_proj, k_proj, v_proj, o_proj, q_norm, k_norm });

impl GroupedQueryAttention {
    /// Creates `{prefix}.q_proj` (`[num_heads * head_dim, hidden]`), `{prefix}.k_proj` and
    /// `{prefix}.v_proj` (`[num_kv_heads * head_dim, hidden]`) and `{prefix}.o_proj`
    /// (`[hidden, num_heads * head_dim]`), all `torch.nn.Linear` layouts without bias, drawn
    /// from N(0, std²).
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] when a count is zero or `num_kv_heads` does not divide
    /// `num_heads`; allocation failure.
    pub fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        hidden: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        std: f64,
    ) -> crate::Result<Self> {
        ModuleBuilder::scoped(pb, prefix, |b| Self::build(b, hidden, num_heads, num_kv_heads, head_dim, std))
    }

    /// As [`GroupedQueryAttention::new`], under `b`'s path.
    ///
    /// # Errors
    /// As [`GroupedQueryAttention::new`].
    pub fn build(
        b: &ModuleBuilder,
        hidden: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        std: f64,
    ) -> crate::Result<Self> {
        Self::build_with(b, hidden, num_heads, num_kv_heads, head_dim, std, AttentionOptions::default())
    }

    /// As [`GroupedQueryAttention::build`], with the family variant `options`: biases (created
    /// at 0) named `{proj}.bias`, head norms (created at 1) named `q_norm.weight` and
    /// `k_norm.weight`.
    ///
    /// # Errors
    /// As [`GroupedQueryAttention::new`].
    pub fn build_with(
        b: &ModuleBuilder,
        hidden: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        std: f64,
        options: AttentionOptions,
    ) -> crate::Result<Self> {
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(crate::Error::config(
                "num_key_value_heads",
                format!("{num_kv_heads} key/value heads do not divide {num_heads} query heads"),
            ));
        }
        if head_dim == 0 {
            return Err(crate::Error::config("head_dim", "must be at least 1"));
        }
        let linear = |name: &str, inp: usize, out: usize, bias: bool| {
            if bias {
                Linear::build(&b.pp(name), inp, out, WeightLayout::OutIn, std)
            } else {
                Linear::build_no_bias(&b.pp(name), inp, out, WeightLayout::OutIn, std)
            }
        };
        let q_proj = linear("q_proj", hidden, num_heads * head_dim, options.qkv_bias)?;
        let k_proj = linear("k_proj", hidden, num_kv_heads * head_dim, options.qkv_bias)?;
        let v_proj = linear("v_proj", hidden, num_kv_heads * head_dim, options.qkv_bias)?;
        let o_proj = linear("o_proj", num_heads * head_dim, hidden, options.o_bias)?;
        let (q_norm, k_norm) = match options.qk_norm_eps {
            Some(eps) => (
                Some(RmsNorm::build(&b.pp("q_norm"), head_dim, eps)?),
                Some(RmsNorm::build(&b.pp("k_norm"), head_dim, eps)?),
            ),
            None => (None, None),
        };
        Ok(Self { q_proj, k_proj, v_proj, o_proj, q_norm, k_norm, num_heads, num_kv_heads })
    }

    /// The query and key heads (`[batch, heads, t, head_dim]`) of `x`, normalised per head when
    /// the block has head norms, before the rotation.
    fn query_key_heads(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let q = split_heads(&self.q_proj.forward(x)?, self.num_heads)?;
        let k = split_heads(&self.k_proj.forward(x)?, self.num_kv_heads)?;
        match (&self.q_norm, &self.k_norm) {
            (Some(q_norm), Some(k_norm)) => Ok((q_norm.forward(&q)?, k_norm.forward(&k)?)),
            _ => Ok((q, k)),
        }
    }

    /// Attends over `x` (`[batch, t, hidden]`, positions `0..t`); position `t` sees positions
    /// `<= t`. Query head `h` uses key/value head `h / (num_heads / num_kv_heads)`.
    ///
    /// # Errors
    /// On a shape mismatch or a sequence longer than the rotary tables.
    pub fn forward(&self, x: &Tensor, rotary: &Rotary) -> Result<Tensor> {
        let (q, k) = self.query_key_heads(x)?;
        let (q, k) = (rotary.forward(&q)?, rotary.forward(&k)?);
        let v = split_heads(&self.v_proj.forward(x)?, self.num_kv_heads)?;
        let y = scaled_dot_product_attention(&q, &k, &v, AttentionMask::Causal, None)?;
        self.o_proj.forward(&y)
    }

    /// The attention of the new tokens `x` (`[batch, t, hidden]`, positions `offset..offset + t`
    /// where `offset` is the cached length) over the cached keys and values and their own;
    /// appends their keys and values (after rotation) to `cache`. With an empty cache this is
    /// [`GroupedQueryAttention::forward`] (causal); with a non-empty one `t` must be 1 (one
    /// token sees every cached position, so no mask is needed).
    ///
    /// # Errors
    /// Several new tokens over a non-empty cache; as [`GroupedQueryAttention::forward`].
    pub fn forward_cached(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let offset = cache.as_ref().map_or(Ok(0), |(k, _)| k.dim(2))?;
        let (q, k) = self.query_key_heads(x)?;
        let (q, k) = (rotary.forward_at(&q, offset)?, rotary.forward_at(&k, offset)?);
        let v = split_heads(&self.v_proj.forward(x)?, self.num_kv_heads)?;
        let y = crate::layers::attention::cached_attention((q, k, v), cache)?;
        self.o_proj.forward(&y)
    }
}
