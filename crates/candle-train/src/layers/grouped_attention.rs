//! Causal grouped-query self-attention in Hugging Face LLaMA's arrangement (`q_proj`,
//! `k_proj`, `v_proj`, `o_proj`, no biases, rotary positions): `num_heads` query heads share
//! `num_kv_heads` key/value heads in groups. Scores' softmax runs in F32; the matmuls run in the
//! compute dtype.

use candle::{Result, Tensor};

use crate::layers::linear::{Linear, WeightLayout};
use crate::layers::ops::causal_softmax;
use crate::layers::rotary::Rotary;
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
    head_dim: usize,
}

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
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(crate::Error::config(
                "num_key_value_heads",
                format!("{num_kv_heads} key/value heads do not divide {num_heads} query heads"),
            ));
        }
        if head_dim == 0 {
            return Err(crate::Error::config("head_dim", "must be at least 1"));
        }
        let linear = |pb: &mut ParamBuilder, name: &str, inp: usize, out: usize| {
            Linear::no_bias(pb, &format!("{prefix}.{name}"), inp, out, WeightLayout::OutIn, std)
        };
        Ok(Self {
            q_proj: linear(pb, "q_proj", hidden, num_heads * head_dim)?,
            k_proj: linear(pb, "k_proj", hidden, num_kv_heads * head_dim)?,
            v_proj: linear(pb, "v_proj", hidden, num_kv_heads * head_dim)?,
            o_proj: linear(pb, "o_proj", num_heads * head_dim, hidden)?,
            num_heads,
            num_kv_heads,
            head_dim,
        })
    }

    /// Attends over `x` (`[batch, t, hidden]`, positions `0..t`); position `t` sees positions
    /// `<= t`. Query head `h` uses key/value head `h / (num_heads / num_kv_heads)`, as
    /// Hugging Face's `repeat_kv` arranges them; the keys and values are not copied per
    /// group: the queries of a group are stacked along the sequence axis instead.
    ///
    /// # Errors
    /// On a shape mismatch or a sequence longer than the rotary tables.
    pub fn forward(&self, x: &Tensor, rotary: &Rotary) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let group = heads / kv_heads;
        let split = |y: Tensor, n: usize| -> Result<Tensor> {
            y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
        };
        let q = rotary.forward(&split(self.q_proj.forward(x)?, heads)?)?;
        let k = rotary.forward(&split(self.k_proj.forward(x)?, kv_heads)?)?;
        let v = split(self.v_proj.forward(x)?, kv_heads)?;
        // [b, heads, t, d] = [b, kv_heads, group * t, d]: the group's queries share one key.
        let q = q.reshape((b, kv_heads, group * t, d))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, heads, t, t))?;
        let probs = causal_softmax(&scores, 1.0 / (d as f64).sqrt())?;
        let y = probs.reshape((b, kv_heads, group * t, t))?.matmul(&v)?;
        let y = y.reshape((b, heads, t, d))?.transpose(1, 2)?.reshape((b, t, heads * d))?;
        self.o_proj.forward(&y)
    }
}
