//! Causal grouped-query self-attention in Hugging Face LLaMA's arrangement (`q_proj`,
//! `k_proj`, `v_proj`, `o_proj`, no biases, rotary positions): `num_heads` query heads share
//! `num_kv_heads` key/value heads in groups, through
//! [`scaled_dot_product_attention`].

use candle::{Result, Tensor};

use crate::layers::attention::{scaled_dot_product_attention, split_heads, AttentionMask};
use crate::layers::linear::{Linear, WeightLayout};
use crate::layers::rotary::Rotary;
use crate::module::ModuleBuilder;
use crate::params::ParamBuilder;

/// Causal self-attention with `num_heads` query heads and `num_kv_heads` key/value heads of
/// `head_dim` dimensions each.
#[derive(Debug, Clone)]
pub struct GroupedQueryAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
}

crate::module_fields!(GroupedQueryAttention { q_proj, k_proj, v_proj, o_proj });

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
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(crate::Error::config(
                "num_key_value_heads",
                format!("{num_kv_heads} key/value heads do not divide {num_heads} query heads"),
            ));
        }
        if head_dim == 0 {
            return Err(crate::Error::config("head_dim", "must be at least 1"));
        }
        let linear = |name: &str, inp: usize, out: usize| {
            Linear::build_no_bias(&b.pp(name), inp, out, WeightLayout::OutIn, std)
        };
        Ok(Self {
            q_proj: linear("q_proj", hidden, num_heads * head_dim)?,
            k_proj: linear("k_proj", hidden, num_kv_heads * head_dim)?,
            v_proj: linear("v_proj", hidden, num_kv_heads * head_dim)?,
            o_proj: linear("o_proj", num_heads * head_dim, hidden)?,
            num_heads,
            num_kv_heads,
        })
    }

    /// Attends over `x` (`[batch, t, hidden]`, positions `0..t`); position `t` sees positions
    /// `<= t`. Query head `h` uses key/value head `h / (num_heads / num_kv_heads)`.
    ///
    /// # Errors
    /// On a shape mismatch or a sequence longer than the rotary tables.
    pub fn forward(&self, x: &Tensor, rotary: &Rotary) -> Result<Tensor> {
        let q = rotary.forward(&split_heads(&self.q_proj.forward(x)?, self.num_heads)?)?;
        let k = rotary.forward(&split_heads(&self.k_proj.forward(x)?, self.num_kv_heads)?)?;
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
        let t = x.dim(1)?;
        if offset > 0 && t != 1 {
            candle::bail!("attention: {t} new tokens over a cache of {offset}; decode one at a time");
        }
        let q = rotary.forward_at(&split_heads(&self.q_proj.forward(x)?, self.num_heads)?, offset)?;
        let k = rotary.forward_at(&split_heads(&self.k_proj.forward(x)?, self.num_kv_heads)?, offset)?;
        let v = split_heads(&self.v_proj.forward(x)?, self.num_kv_heads)?;
        let (k, v) = match cache.take() {
            None => (k, v),
            Some((past_k, past_v)) => (Tensor::cat(&[&past_k, &k], 2)?, Tensor::cat(&[&past_v, &v], 2)?),
        };
        let y = if offset == 0 {
            scaled_dot_product_attention(&q, &k, &v, AttentionMask::Causal, None)?
        } else {
            let (b, _, keys, _) = k.dims4()?;
            let visible =
                Tensor::zeros((b, 1, 1, keys), crate::device::reduction_dtype(q.dtype()), x.device())?;
            scaled_dot_product_attention(&q, &k, &v, AttentionMask::KeyPadding(&visible), None)?
        };
        *cache = Some((k, v));
        self.o_proj.forward(&y)
    }
}
