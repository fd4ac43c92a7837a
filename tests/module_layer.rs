//! A model written outside candle-train on its module layer (tests/common/stack_model.rs),
//! through the public API only: parameters named by `ModuleBuilder` paths, blocks walked by
//! `module_fields!`, one `scaled_dot_product_attention`, a `Stacked` model whose
//! `SegmentedModel` comes from `segmented_stack!`. Trained through the engine with dropout
//! active, its gradients equal one plain backward (F64, 1e-12) under every recompute policy: the
//! context replays the masks.

mod common;

use candle::{DType, Device, Tensor};
use candle_fit::ckpt::{
    segment_infos, verify_gradients, Recompute, RecomputePolicy, SegmentContext, SegmentedModel,
};
use candle_fit::train::TokenBatch;
use common::stack_model::{Mini, MiniConfig};

const VOCAB: usize = 11;
const LAYERS: usize = 3;

/// The shared model (tests/common/stack_model.rs) at width 8 in F64, dropout 0.2.
fn tiny(seed: u64) -> candle_fit::train::Result<Mini> {
    Mini::new(MiniConfig {
        dtype: DType::F64,
        width: 8,
        heads: 2,
        vocab: VOCAB,
        layers: LAYERS,
        embedding_std: 0.5,
        linear_std: 0.5,
        dropout: 0.2,
        seed,
    })
}

#[test]
fn a_model_built_on_the_module_layer_gets_the_plain_backward_gradients() -> anyhow::Result<()> {
    let model = tiny(3)?;
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
