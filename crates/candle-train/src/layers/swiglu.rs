//! LLaMA's gated feed-forward block: `down_proj(silu(gate_proj(x)) * up_proj(x))`, without
//! biases. Candle's `silu` has a backward rule.

use candle::{Result, Tensor};

use crate::layers::linear::{Linear, WeightLayout};
use crate::params::ParamBuilder;

/// The SwiGLU feed-forward block of width `intermediate`.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwiGlu {
    /// Creates `{prefix}.gate_proj`, `{prefix}.up_proj` (`[intermediate, hidden]`) and
    /// `{prefix}.down_proj` (`[hidden, intermediate]`), `torch.nn.Linear` layouts without
    /// bias, drawn from N(0, std²).
    ///
    /// # Errors
    /// On allocation failure.
    pub fn new(
        pb: &mut ParamBuilder,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
        std: f64,
    ) -> crate::Result<Self> {
        let linear = |pb: &mut ParamBuilder, name: &str, inp: usize, out: usize| {
            Linear::no_bias(pb, &format!("{prefix}.{name}"), inp, out, WeightLayout::OutIn, std)
        };
        Ok(Self {
            gate_proj: linear(pb, "gate_proj", hidden, intermediate)?,
            up_proj: linear(pb, "up_proj", hidden, intermediate)?,
            down_proj: linear(pb, "down_proj", intermediate, hidden)?,
        })
    }

    /// Applies the block to `x` (`[..., hidden]`), in `x`'s dtype.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = (self.gate_proj.forward(x)?.silu()? * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}
