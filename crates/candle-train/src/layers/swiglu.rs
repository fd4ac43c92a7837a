//! LLaMA's gated feed-forward block: `down_proj(silu(gate_proj(x)) * up_proj(x))`, without
//! biases. Candle's `silu` has a backward rule.

use candle::{Result, Tensor};

use crate::layers::linear::{Linear, WeightLayout};
use crate::module::ModuleBuilder;
use crate::params::ParamBuilder;

/// The SwiGLU feed-forward block of width `intermediate`.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

crate::module_fields!(SwiGlu { gate_proj, up_proj, down_proj });

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
        ModuleBuilder::scoped(pb, prefix, |b| Self::build(b, hidden, intermediate, std))
    }

    /// As [`SwiGlu::new`], under `b`'s path.
    ///
    /// # Errors
    /// On allocation failure.
    pub fn build(b: &ModuleBuilder, hidden: usize, intermediate: usize, std: f64) -> crate::Result<Self> {
        let linear = |name: &str, inp: usize, out: usize| {
            Linear::build_no_bias(&b.pp(name), inp, out, WeightLayout::OutIn, std)
        };
        Ok(Self {
            gate_proj: linear("gate_proj", hidden, intermediate)?,
            up_proj: linear("up_proj", hidden, intermediate)?,
            down_proj: linear("down_proj", intermediate, hidden)?,
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
