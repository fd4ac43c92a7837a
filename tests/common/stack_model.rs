//! A model written outside candle-train on its module layer, through the public API only:
//! pre-norm attention blocks with a fused q/k/v projection and dropout, parameters named by
//! `ModuleBuilder` paths, blocks walked by `module_fields!`, a `Stacked` model whose
//! `SegmentedModel` comes from `segmented_stack!` (tests/module_layer.rs checks its gradients,
//! tests/estimator.rs estimates it).

use candle::{DType, Device, Result, Tensor};
use candle_fit::ckpt::SegmentContext;
use candle_fit::train::layers::attention::split_heads;
use candle_fit::train::layers::ops::residual_add;
use candle_fit::train::layers::{
    cross_entropy, scaled_dot_product_attention, AttentionMask, Dropout, Embedding, LayerNorm, Linear,
    WeightLayout,
};
use candle_fit::train::module::{Forward, ForwardContext, Module, ModuleBuilder, Stacked};
use candle_fit::train::{ParamBuilder, Parameter, Parameters, TokenBatch, TrainableModel};

/// The model's shape and initialisation.
#[derive(Debug, Clone, Copy)]
pub struct MiniConfig {
    pub dtype: DType,
    pub width: usize,
    pub heads: usize,
    pub vocab: usize,
    pub layers: usize,
    /// Standard deviation of the embedding's values.
    pub embedding_std: f64,
    /// Standard deviation of the affine layers' weights.
    pub linear_std: f64,
    pub dropout: f32,
    pub seed: u64,
}

/// A pre-norm attention block with a fused q/k/v projection.
pub struct Block {
    norm: LayerNorm,
    qkv: Linear,
    out: Linear,
    dropout: Dropout,
    width: usize,
    heads: usize,
}

candle_fit::train::module_fields!(Block { norm, qkv, out });

impl Forward for Block {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardContext) -> Result<Tensor> {
        let qkv = self.qkv.forward(&self.norm.forward(x)?)?;
        let part = |i: usize| split_heads(&qkv.narrow(2, i * self.width, self.width)?, self.heads);
        let dropout = (&self.dropout, &mut ctx.rng, ctx.training);
        let y = scaled_dot_product_attention(
            &part(0)?,
            &part(1)?,
            &part(2)?,
            AttentionMask::Causal,
            Some(dropout),
        )?;
        residual_add(x, &self.out.forward(&y)?)
    }
}

/// Embedding, `layers` blocks, a final norm and a linear head with the cross-entropy loss.
pub struct Mini {
    embed: Embedding,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
    pub params: Parameters,
}

impl Mini {
    pub fn new(c: MiniConfig) -> candle_fit::train::Result<Self> {
        let b = ModuleBuilder::new(ParamBuilder::new(c.dtype, Device::Cpu, c.seed));
        let embed = Embedding::build(&b.pp("embed"), c.vocab, c.width, c.embedding_std)?;
        let blocks = (0..c.layers)
            .map(|i| {
                let b = b.pp("blocks").pp(i);
                Ok(Block {
                    norm: LayerNorm::build(&b.pp("norm"), c.width, 1e-5)?,
                    qkv: Linear::build(
                        &b.pp("qkv"),
                        c.width,
                        3 * c.width,
                        WeightLayout::OutIn,
                        c.linear_std,
                    )?,
                    out: Linear::build(&b.pp("out"), c.width, c.width, WeightLayout::OutIn, c.linear_std)?,
                    dropout: Dropout::new(c.dropout)?,
                    width: c.width,
                    heads: c.heads,
                })
            })
            .collect::<candle_fit::train::Result<_>>()?;
        let norm = LayerNorm::build(&b.pp("norm"), c.width, 1e-5)?;
        let head = Linear::build(&b.pp("head"), c.width, c.vocab, WeightLayout::OutIn, c.linear_std)?;
        Ok(Self { embed, blocks, norm, head, params: b.finish() })
    }
}

impl Stacked for Mini {
    type Batch = TokenBatch;
    type Block = Block;

    fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    fn block_path(&self) -> String {
        "blocks".into()
    }

    fn first_input(&self, batch: &TokenBatch) -> Result<Tensor> {
        Ok(batch.inputs.clone())
    }

    fn embed(&self, input: &Tensor, _: &TokenBatch, _: &SegmentContext) -> Result<Tensor> {
        self.embed.forward(input)
    }

    fn head(&self, x: &Tensor, batch: &TokenBatch, _: &SegmentContext) -> Result<Tensor> {
        let logits = self.head.forward(&self.norm.forward(x)?)?;
        let (b, t, v) = logits.dims3()?;
        cross_entropy(&logits.reshape((b * t, v))?, &batch.targets.flatten_all()?)
    }

    fn embedding_parameters(&self) -> Vec<Parameter> {
        self.embed.parameters()
    }

    fn head_parameters(&self) -> Vec<Parameter> {
        [self.norm.parameters(), self.head.parameters()].concat()
    }
}

candle_fit::train::segmented_stack!(Mini);

impl TrainableModel for Mini {
    fn parameters(&self) -> &Parameters {
        &self.params
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn settings(&self) -> String {
        format!("mini layers={}", self.blocks.len())
    }
}
