//! A model written outside candle-train on its module layer, through the public API only:
//! parameters named by `ModuleBuilder` paths, blocks walked by `module_fields!`, one
//! `scaled_dot_product_attention`, a `Stacked` model whose `SegmentedModel` comes from
//! `segmented_stack!`. Trained through the engine with dropout active, its gradients equal one
//! plain backward (F64, 1e-12) under every recompute policy: the context replays the masks.

use candle::{DType, Device, Result, Tensor};
use candle_fit::ckpt::{
    segment_infos, verify_gradients, Recompute, RecomputePolicy, SegmentContext, SegmentedModel,
};
use candle_fit::train::layers::attention::split_heads;
use candle_fit::train::layers::ops::residual_add;
use candle_fit::train::layers::{
    cross_entropy, scaled_dot_product_attention, AttentionMask, Dropout, Embedding, LayerNorm, Linear,
    WeightLayout,
};
use candle_fit::train::module::{Forward, ForwardContext, Module, ModuleBuilder, Stacked};
use candle_fit::train::{ParamBuilder, Parameter, Parameters, TokenBatch};

const WIDTH: usize = 8;
const HEADS: usize = 2;
const VOCAB: usize = 11;
const LAYERS: usize = 3;

/// A pre-norm attention block with a fused q/k/v projection.
struct Block {
    norm: LayerNorm,
    qkv: Linear,
    out: Linear,
    dropout: Dropout,
}

candle_fit::train::module_fields!(Block { norm, qkv, out });

impl Forward for Block {
    fn forward(&self, x: &Tensor, ctx: &mut ForwardContext) -> Result<Tensor> {
        let qkv = self.qkv.forward(&self.norm.forward(x)?)?;
        let part = |i: usize| split_heads(&qkv.narrow(2, i * WIDTH, WIDTH)?, HEADS);
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

struct Tiny {
    embed: Embedding,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
    params: Parameters,
}

impl Tiny {
    fn new(seed: u64) -> candle_fit::train::Result<Self> {
        let b = ModuleBuilder::new(ParamBuilder::new(DType::F64, Device::Cpu, seed));
        let embed = Embedding::build(&b.pp("embed"), VOCAB, WIDTH, 0.5)?;
        let blocks = (0..LAYERS)
            .map(|i| {
                let b = b.pp("blocks").pp(i);
                Ok(Block {
                    norm: LayerNorm::build(&b.pp("norm"), WIDTH, 1e-5)?,
                    qkv: Linear::build(&b.pp("qkv"), WIDTH, 3 * WIDTH, WeightLayout::OutIn, 0.5)?,
                    out: Linear::build(&b.pp("out"), WIDTH, WIDTH, WeightLayout::OutIn, 0.5)?,
                    dropout: Dropout::new(0.2)?,
                })
            })
            .collect::<candle_fit::train::Result<_>>()?;
        let norm = LayerNorm::build(&b.pp("norm"), WIDTH, 1e-5)?;
        let head = Linear::build(&b.pp("head"), WIDTH, VOCAB, WeightLayout::OutIn, 0.5)?;
        Ok(Self { embed, blocks, norm, head, params: b.finish() })
    }
}

impl Stacked for Tiny {
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

candle_fit::train::segmented_stack!(Tiny);

#[test]
fn a_model_built_on_the_module_layer_gets_the_plain_backward_gradients() -> anyhow::Result<()> {
    let model = Tiny::new(3)?;
    let names: Vec<&str> = model.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), 1 + 6 * LAYERS + 4);
    assert_eq!(&names[..3], ["embed.weight", "blocks.0.norm.weight", "blocks.0.norm.bias"]);
    assert!(names.contains(&"blocks.2.qkv.weight") && names.ends_with(&["head.weight", "head.bias"]));
    assert_eq!(model.num_segments(), LAYERS + 2);
    assert_eq!(model.segment_name(2), "blocks.1");
    assert_eq!(model.segment_parameters(2).len(), 6);

    let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    let inputs = Tensor::from_vec(ids.clone(), (2, 6), &Device::Cpu)?;
    let targets = Tensor::from_vec(
        ids.iter().map(|i| (i + 1) % VOCAB as u32).collect::<Vec<_>>(),
        (2, 6),
        &Device::Cpu,
    )?;
    let batch = TokenBatch { inputs, targets };
    // Training: dropout draws masks, which a recomputed block must replay.
    let ctx = SegmentContext::train(11, 0, 0);
    for policy in [Recompute::Never, Recompute::All, Recompute::EveryK(2), Recompute::Sqrt] {
        let decisions = policy.decide(&segment_infos(&model))?;
        let report = verify_gradients(&model, &batch, ctx, &decisions, 1e-12)?;
        assert_eq!(report.parameters.len(), model.params.len());
        assert!(report.parameters.iter().all(|p| p.reference_max_abs > 0.0), "{report:?}");
        assert!(report.max_relative_difference() <= 1e-12, "{policy:?}: {report:?}");
    }
    Ok(())
}
