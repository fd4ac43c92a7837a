//! The segmented engine gives the same gradients as one plain backward over the whole graph,
//! under every keep/recompute decision, with tied embeddings and dropout on.

use std::collections::HashMap;

use candle::{DType, Device, Tensor};
use candle_fit::ckpt::{
    forward_backward, segment_infos, Decision, Recompute, RecomputePolicy, SegmentContext, SegmentInfo,
    SegmentedModel,
};
use candle_fit::train::{Corpus, Gpt, GptConfig, TokenBatch};

fn model(dtype: DType) -> anyhow::Result<Gpt> {
    let config =
        GptConfig { n_ctx: 16, n_embd: 16, n_layer: 3, n_head: 2, dropout: 0.1, ..GptConfig::default() };
    Ok(Gpt::new(config, dtype, &Device::Cpu, 5)?)
}

fn batch() -> anyhow::Result<TokenBatch> {
    let text = "It is a truth universally acknowledged, that a single man in possession of a good fortune";
    let corpus = Corpus::from_bytes("t.txt".as_ref(), text.repeat(4).into_bytes(), 0.2)?;
    Ok(corpus.train_batch(1, 0, 0, 3, 16, &Device::Cpu)?)
}

/// One forward over all segments without cutting the graph, then one backward.
fn plain_gradients(
    model: &Gpt,
    batch: &TokenBatch,
    ctx: SegmentContext,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut x = model.first_input(batch)?;
    for i in 0..model.num_segments() {
        x = model.forward_segment(i, &x, batch, &ctx.for_segment(i))?;
    }
    let grads = x.backward()?;
    let mut out = HashMap::new();
    for p in model.parameters().iter() {
        let g = grads.get_id(p.id()).ok_or_else(|| anyhow::anyhow!("no plain gradient for {}", p.name))?;
        out.insert(p.name.clone(), g.clone());
    }
    Ok(out)
}

fn engine_gradients(
    model: &Gpt,
    batch: &TokenBatch,
    ctx: SegmentContext,
    decisions: &[Decision],
) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = HashMap::new();
    forward_backward(model, batch, ctx, decisions, 1.0, |g| {
        for p in g.gradients {
            let sum = match out.remove(&p.name) {
                Some(prev) => (prev + &p.grad)?,
                None => p.grad,
            };
            out.insert(p.name, sum);
        }
        Ok(())
    })?;
    Ok(out)
}

/// The decisions of every built-in policy (the budget one from measured sizes, half of the
/// total), plus hand-made sets that also recompute the embedding.
fn decision_sets(model: &Gpt) -> anyhow::Result<Vec<Vec<Decision>>> {
    let infos = segment_infos(model);
    let mut sets = Vec::new();
    for policy in
        [Recompute::Never, Recompute::All, Recompute::EveryK(2), Recompute::EveryK(3), Recompute::Sqrt]
    {
        sets.push(policy.decide(&infos)?);
    }
    // Real sizes need the counting allocator (tests/recompute_memory.rs uses it); here any
    // sizes exercise the budget policy's decisions.
    let sized: Vec<SegmentInfo> = infos
        .iter()
        .enumerate()
        .map(|(i, s)| SegmentInfo {
            activation_bytes: Some(100 * (i + 1)),
            input_bytes: Some(10),
            ..s.clone()
        })
        .collect();
    let total: usize = sized.iter().filter_map(|s| s.activation_bytes).sum();
    sets.push(Recompute::Budget(total / 2).decide(&sized)?);
    let n = model.num_segments();
    use Decision::{Keep, Recompute as R};
    sets.push(vec![R; n]);
    sets.push((0..n).map(|i| if i % 2 == 0 { R } else { Keep }).collect());
    Ok(sets)
}

fn compare(dtype: DType, tolerance: f64) -> anyhow::Result<()> {
    let model = model(dtype)?;
    let batch = batch()?;
    let ctx = SegmentContext::train(9, 2, 1);
    let plain = plain_gradients(&model, &batch, ctx)?;
    for decisions in decision_sets(&model)? {
        let ours = engine_gradients(&model, &batch, ctx, &decisions)?;
        assert_eq!(ours.len(), plain.len());
        for (name, reference) in &plain {
            let got = &ours[name];
            let scale = reference.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let diff = (got - reference)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            assert!(
                diff <= tolerance * scale.max(f64::MIN_POSITIVE),
                "{name} under {decisions:?}: max difference {diff:e} against max magnitude {scale:e}"
            );
        }
    }
    Ok(())
}

#[test]
fn every_decision_reproduces_plain_backward_in_f64_within_1e_12() -> anyhow::Result<()> {
    compare(DType::F64, 1e-12)
}

#[test]
fn every_decision_reproduces_plain_backward_in_f32_within_1e_6_relative() -> anyhow::Result<()> {
    compare(DType::F32, 1e-6)
}

#[test]
fn tied_embedding_gets_the_sum_of_both_segments_and_is_final_only_in_the_first() -> anyhow::Result<()> {
    let model = model(DType::F64)?;
    let mut wte_calls = vec![];
    forward_backward(
        &model,
        &batch()?,
        SegmentContext::eval(),
        &vec![Decision::Keep; model.num_segments()],
        1.0,
        |g| {
            for p in g.gradients.iter().filter(|p| p.name == "wte.weight") {
                wte_calls.push((g.segment, p.is_final));
            }
            Ok(())
        },
    )?;
    assert_eq!(wte_calls, vec![(model.num_segments() - 1, false), (0, true)]);
    Ok(())
}
