//! Every trainable layer's backward against central finite differences in F64.
//!
//! The objective is `sum(layer(x) * r)` for a fixed random `r`, so every output element
//! matters (a plain sum would hide errors that cancel, as layer norm's do). For each parameter
//! and the input, up to 16 elements are perturbed by ±1e-6; analytic and numeric derivatives
//! must agree within 1e-6 · (1 + |numeric|) (central differences in F64 are accurate to about
//! 1e-9 here).

use candle::{DType, Device, Tensor, Var};
use candle_fit::ckpt::Rng;
use candle_fit::train::layers::{
    cross_entropy, CausalSelfAttention, Dropout, Embedding, GroupedQueryAttention, LayerNorm, Linear, Mlp,
    RmsNorm, Rotary, SwiGlu, WeightLayout,
};
use candle_fit::train::ParamBuilder;

type Objective<'a> = dyn Fn() -> candle::Result<Tensor> + 'a;

fn random(shape: &[usize], seed: u64) -> candle::Result<Tensor> {
    let mut rng = Rng::seeded(seed);
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.normal_f64()).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

fn set_element(var: &Var, index: usize, value: f64) -> candle::Result<()> {
    let mut values = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    values[index] = value;
    var.set(&Tensor::from_vec(values, var.shape(), var.device())?)
}

/// Checks d objective / d var against central differences for every var in `vars`.
fn gradcheck(layer: &str, vars: &[(&str, &Var)], objective: &Objective) -> anyhow::Result<()> {
    let grads = objective()?.backward()?;
    for (name, var) in vars {
        let Some(analytic) = grads.get(var.as_tensor()) else {
            anyhow::bail!("{layer}: `{name}` received no gradient");
        };
        let analytic = analytic.flatten_all()?.to_vec1::<f64>()?;
        let values = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let step = (values.len() / 16).max(1);
        let h = 1e-6;
        for i in (0..values.len()).step_by(step) {
            set_element(var, i, values[i] + h)?;
            let plus = objective()?.to_scalar::<f64>()?;
            set_element(var, i, values[i] - h)?;
            let minus = objective()?.to_scalar::<f64>()?;
            set_element(var, i, values[i])?;
            let numeric = (plus - minus) / (2.0 * h);
            let error = (analytic[i] - numeric).abs();
            anyhow::ensure!(
                error <= 1e-6 * (1.0 + numeric.abs()),
                "{layer}: d/d{name}[{i}] analytic {} vs numeric {numeric} (error {error:e})",
                analytic[i]
            );
        }
    }
    Ok(())
}

fn weighted_sum(y: &Tensor, seed: u64) -> candle::Result<Tensor> {
    y.mul(&random(y.dims(), seed)?)?.sum_all()
}

fn builder() -> ParamBuilder {
    ParamBuilder::new(DType::F64, Device::Cpu, 11)
}

fn param_vars(pb: ParamBuilder) -> candle_fit::train::Result<Vec<(String, Var)>> {
    pb.finish().iter().map(|p| Ok((p.name.clone(), p.var()?.clone()))).collect()
}

fn check_all(layer: &str, params: &[(String, Var)], x: &Var, objective: &Objective) -> anyhow::Result<()> {
    let mut vars: Vec<(&str, &Var)> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    vars.push(("input", x));
    gradcheck(layer, &vars, objective)
}

#[test]
fn linear_in_both_layouts_matches_finite_differences() -> anyhow::Result<()> {
    for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
        let mut pb = builder();
        let layer = Linear::new(&mut pb, "fc", 5, 3, layout, 0.5)?;
        let x = Var::from_tensor(&random(&[2, 4, 5], 1)?)?;
        let objective = || weighted_sum(&layer.forward(x.as_tensor())?, 2);
        check_all(&format!("linear {layout:?}"), &param_vars(pb)?, &x, &objective)?;
    }
    let mut pb = builder();
    let layer = Linear::no_bias(&mut pb, "fc", 4, 6, WeightLayout::OutIn, 0.5)?;
    let x = Var::from_tensor(&random(&[3, 4], 3)?)?;
    check_all("linear without bias", &param_vars(pb)?, &x, &|| {
        weighted_sum(&layer.forward(x.as_tensor())?, 4)
    })
}

#[test]
fn embedding_matches_finite_differences() -> anyhow::Result<()> {
    let mut pb = builder();
    let layer = Embedding::new(&mut pb, "wte", 7, 4, 1.0)?;
    // Repeated ids: their gradients must add up.
    let ids = Tensor::new(&[[1u32, 3, 3], [0, 6, 1]], &Device::Cpu)?;
    let params = param_vars(pb)?;
    let vars: Vec<(&str, &Var)> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    gradcheck("embedding", &vars, &|| weighted_sum(&layer.forward(&ids)?, 5))
}

#[test]
fn layer_norm_and_rms_norm_match_finite_differences() -> anyhow::Result<()> {
    let mut pb = builder();
    let ln = LayerNorm::new(&mut pb, "ln", 6, 1e-5)?;
    let x = Var::from_tensor(&random(&[2, 3, 6], 6)?)?;
    // Move weight and bias off their initial 1 and 0 so their gradients are generic.
    let params = param_vars(pb)?;
    for (i, (_, v)) in params.iter().enumerate() {
        v.set(&(v.as_tensor() + random(v.dims(), 20 + i as u64)?)?)?;
    }
    check_all("layer norm", &params, &x, &|| weighted_sum(&ln.forward(x.as_tensor())?, 7))?;

    let mut pb = builder();
    let rms = RmsNorm::new(&mut pb, "rms", 6, 1e-6)?;
    let params = param_vars(pb)?;
    params[0].1.set(&(params[0].1.as_tensor() + random(&[6], 30)?)?)?;
    check_all("rms norm", &params, &x, &|| weighted_sum(&rms.forward(x.as_tensor())?, 8))
}

#[test]
fn causal_self_attention_matches_finite_differences() -> anyhow::Result<()> {
    let mut pb = builder();
    let attn = CausalSelfAttention::new(&mut pb, "attn", 8, 2, Dropout::new(0.0)?, 0.3, 0.3)?;
    let x = Var::from_tensor(&random(&[2, 5, 8], 9)?)?;
    let objective = || weighted_sum(&attn.forward(x.as_tensor(), &mut Rng::seeded(0), true)?, 10);
    check_all("attention", &param_vars(pb)?, &x, &objective)
}

#[test]
fn attention_is_causal() -> anyhow::Result<()> {
    let mut pb = builder();
    let attn = CausalSelfAttention::new(&mut pb, "attn", 8, 2, Dropout::new(0.0)?, 0.3, 0.3)?;
    let x = random(&[1, 5, 8], 12)?;
    let y = attn.forward(&x, &mut Rng::seeded(0), false)?;
    // Changing the last position must not change any earlier output.
    let mut changed = x.to_vec3::<f64>()?;
    changed[0][4].iter_mut().for_each(|v| *v += 1.0);
    let y2 = attn.forward(&Tensor::new(changed, &Device::Cpu)?, &mut Rng::seeded(0), false)?;
    let diff = (y.narrow(1, 0, 4)? - y2.narrow(1, 0, 4)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert_eq!(diff, 0.0);
    let last = (y.narrow(1, 4, 1)? - y2.narrow(1, 4, 1)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(last > 0.0);
    Ok(())
}

#[test]
fn mlp_matches_finite_differences() -> anyhow::Result<()> {
    let mut pb = builder();
    let mlp = Mlp::new(&mut pb, "mlp", 4, 16, Dropout::new(0.0)?, 0.5, 0.5)?;
    let x = Var::from_tensor(&random(&[3, 2, 4], 13)?)?;
    let objective = || weighted_sum(&mlp.forward(x.as_tensor(), &mut Rng::seeded(0), true)?, 14);
    check_all("mlp", &param_vars(pb)?, &x, &objective)
}

#[test]
fn dropout_with_a_replayed_mask_matches_finite_differences() -> anyhow::Result<()> {
    let dropout = Dropout::new(0.3)?;
    let x = Var::from_tensor(&random(&[4, 8], 15)?)?;
    let objective = || weighted_sum(&dropout.forward(x.as_tensor(), &mut Rng::seeded(42), true)?, 16);
    gradcheck("dropout", &[("input", &x)], &objective)?;
    // The mask zeroes about p of the elements and scales the rest by 1/(1-p).
    let y =
        dropout.forward(&Tensor::ones((100, 100), DType::F64, &Device::Cpu)?, &mut Rng::seeded(1), true)?;
    let values = y.flatten_all()?.to_vec1::<f64>()?;
    let zeros = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
    assert!((zeros - 0.3).abs() < 0.02, "dropped fraction {zeros}");
    let scale = 1.0 / (1.0 - 0.3f32 as f64);
    assert!(values.iter().all(|&v| v == 0.0 || v == scale));
    assert!(Dropout::new(1.0).is_err());
    Ok(())
}

#[test]
fn cross_entropy_matches_finite_differences_and_is_computed_in_f32() -> anyhow::Result<()> {
    let logits = Var::from_tensor(&random(&[6, 5], 17)?)?;
    let targets = Tensor::new(&[0u32, 4, 2, 2, 1, 3], &Device::Cpu)?;
    gradcheck("cross entropy", &[("logits", &logits)], &|| cross_entropy(logits.as_tensor(), &targets))?;
    // Value: mean of -log softmax at the targets.
    let rows = logits.as_tensor().to_vec2::<f64>()?;
    let expected: f64 = rows
        .iter()
        .zip([0usize, 4, 2, 2, 1, 3])
        .map(|(row, t)| row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[t])
        .sum::<f64>()
        / 6.0;
    let got = cross_entropy(logits.as_tensor(), &targets)?.to_scalar::<f64>()?;
    assert!((got - expected).abs() < 1e-12);
    // Half-precision logits give an F32 loss.
    let half = cross_entropy(&logits.as_tensor().to_dtype(DType::BF16)?, &targets)?;
    assert_eq!(half.dtype(), DType::F32);
    Ok(())
}

#[test]
fn masked_softmax_matches_finite_differences_and_ignores_padding() -> anyhow::Result<()> {
    use candle_fit::train::layers::ops::{masked_softmax, padding_bias};
    let scores = Var::from_tensor(&random(&[2, 2, 3, 4], 40)?)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 0], [1, 1, 0, 0]], &Device::Cpu)?;
    let bias = padding_bias(&mask, DType::F64)?;
    let objective = || weighted_sum(&masked_softmax(scores.as_tensor(), 0.7, &bias)?, 41);
    gradcheck("masked softmax", &[("scores", &scores)], &objective)?;
    // Padded keys get exactly zero probability and rows sum to one.
    let probs = masked_softmax(scores.as_tensor(), 0.7, &bias)?;
    let padded = probs.narrow(0, 1, 1)?.narrow(3, 2, 2)?.abs()?.sum_all()?.to_scalar::<f64>()?;
    assert_eq!(padded, 0.0);
    let sums = probs.sum(3)?.flatten_all()?.to_vec1::<f64>()?;
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-12));
    Ok(())
}

#[test]
fn exact_gelu_matches_finite_differences() -> anyhow::Result<()> {
    let x = Var::from_tensor(&(random(&[3, 7], 50)? * 2.0)?)?;
    gradcheck("gelu (erf)", &[("input", &x)], &|| weighted_sum(&x.as_tensor().gelu_erf()?, 51))
}

#[test]
fn bert_encoder_matches_finite_differences() -> anyhow::Result<()> {
    use candle_fit::train::models::{mean_pool, Bert, BertConfig};
    let model = Bert::new(&BertConfig::tiny(), "", DType::F64, &Device::Cpu, 3)?;
    // Larger weights than BERT's 0.02 so every path (attention included) matters.
    for (i, p) in model.parameters().iter().enumerate() {
        p.var()?.set(&((&p.tensor()? * 20.0)? + (random(p.dims(), 60 + i as u64)? * 0.1)?)?)?;
    }
    let ids = Tensor::new(&[[2u32, 5, 7, 1], [3, 3, 9, 0]], &Device::Cpu)?;
    let types = Tensor::new(&[[0u32, 0, 1, 1], [0, 1, 1, 0]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], &Device::Cpu)?;
    let params: Vec<(String, Var)> = model
        .parameters()
        .iter()
        .map(|p| Ok((p.name.clone(), p.var()?.clone())))
        .collect::<anyhow::Result<_>>()?;
    let vars: Vec<(&str, &Var)> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let objective = || {
        let h = model.forward(&ids, Some(&types), &mask, &mut Rng::seeded(0), true)?;
        weighted_sum(&mean_pool(&h, &mask)?, 61)
    };
    gradcheck("bert", &vars, &objective)
}

#[test]
fn rotary_grouped_attention_and_swiglu_match_finite_differences() -> anyhow::Result<()> {
    let rotary = Rotary::new(4, 8, 10_000.0, &Device::Cpu)?;
    let x = Var::from_tensor(&random(&[2, 3, 5, 4], 40)?)?;
    check_all("rotary", &[], &x, &|| weighted_sum(&rotary.forward(x.as_tensor())?, 41))?;

    // 4 query heads in 2 groups of one key/value head each.
    let mut pb = builder();
    let attn = GroupedQueryAttention::new(&mut pb, "self_attn", 8, 4, 2, 4, 0.4)?;
    let x = Var::from_tensor(&random(&[2, 5, 8], 42)?)?;
    let objective = || weighted_sum(&attn.forward(x.as_tensor(), &rotary)?, 43);
    check_all("grouped-query attention", &param_vars(pb)?, &x, &objective)?;

    let mut pb = builder();
    let mlp = SwiGlu::new(&mut pb, "mlp", 4, 6, 0.5)?;
    let x = Var::from_tensor(&random(&[3, 2, 4], 44)?)?;
    check_all("swiglu", &param_vars(pb)?, &x, &|| weighted_sum(&mlp.forward(x.as_tensor())?, 45))
}

#[test]
fn grouped_attention_is_causal_and_shares_keys_within_a_group() -> anyhow::Result<()> {
    let rotary = Rotary::new(4, 8, 10_000.0, &Device::Cpu)?;
    let mut pb = builder();
    let attn = GroupedQueryAttention::new(&mut pb, "self_attn", 8, 4, 2, 4, 0.4)?;
    let x = random(&[1, 5, 8], 46)?;
    let y = attn.forward(&x, &rotary)?;
    let mut changed = x.to_vec3::<f64>()?;
    changed[0][4].iter_mut().for_each(|v| *v += 1.0);
    let y2 = attn.forward(&Tensor::new(changed, &Device::Cpu)?, &rotary)?;
    let diff = (y.narrow(1, 0, 4)? - y2.narrow(1, 0, 4)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert_eq!(diff, 0.0);
    // Against repeat_kv written out: each key/value head copied to its group's query heads.
    let params = pb.finish();
    let w = |name: &str| -> anyhow::Result<Tensor> {
        Ok(params.get(name).ok_or_else(|| anyhow::anyhow!("{name}"))?.tensor()?)
    };
    let x2 = x.squeeze(0)?;
    let heads = |name: &str, n: usize| -> anyhow::Result<Tensor> {
        Ok(x2.matmul(&w(name)?.t()?)?.reshape((5, n, 4))?.transpose(0, 1)?.unsqueeze(0)?.contiguous()?)
    };
    let q = rotary.forward(&heads("self_attn.q_proj.weight", 4)?)?.squeeze(0)?;
    let k = rotary.forward(&heads("self_attn.k_proj.weight", 2)?)?.squeeze(0)?;
    let v = heads("self_attn.v_proj.weight", 2)?.squeeze(0)?;
    let mut outs = Vec::new();
    for h in 0..4 {
        let (qh, kh, vh) = (q.get(h)?, k.get(h / 2)?, v.get(h / 2)?);
        let mut scores = (qh.matmul(&kh.t()?)? * 0.5)?.to_vec2::<f64>()?;
        for (i, row) in scores.iter_mut().enumerate() {
            row.iter_mut().skip(i + 1).for_each(|s| *s = f64::NEG_INFINITY);
        }
        let probs = candle_fit::train::layers::ops::softmax_last_dim(&Tensor::new(scores, &Device::Cpu)?)?;
        outs.push(probs.matmul(&vh)?);
    }
    let y_ref = Tensor::stack(&outs, 1)?.reshape((5, 16))?.matmul(&w("self_attn.o_proj.weight")?.t()?)?;
    let error = (y.squeeze(0)? - &y_ref)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(error < 1e-12, "{error}");
    Ok(())
}
