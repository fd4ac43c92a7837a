//! Correct gradients for a model we did not write: a pre-norm transformer written with
//! candle-nn's idioms only (`VarMap`/`VarBuilder`, `linear`, `embedding`, `layer_norm_slow`,
//! a fused q/k/v projection, `ops::softmax`), cut into segments, trained through candle-ckpt's
//! engine under every recompute policy, against one plain backward (F64, 1e-12). The same model
//! with candle-nn's fused ops is refused with the op named; with `candle_train::nn`'s drop-ins
//! it trains through `LocalUpdater` on the `VarMap`'s own variables. A property test runs random
//! segment graphs (branches that start with untracked ops, views, casts, reductions, residuals)
//! against the plain backward.

use candle::{DType, Device, Module, Result, Tensor, Var, D};
use candle_fit::ckpt::{
    check_backward_rules, compare_gradients, forward_backward, segment_infos, verify_gradients, Decision,
    Recompute, RecomputePolicy, Rng, SegmentContext, SegmentParameter, SegmentedModel,
};
use candle_fit::train::optim::SgdConfig;
use candle_fit::train::{LocalUpdater, OptimizerConfig, Parameters, Updater};
use candle_nn::{VarBuilder, VarMap};
use proptest::prelude::*;

/// Which ops the model is written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kit {
    /// candle-nn's differentiable ops: `layer_norm_slow`, `ops::softmax`.
    CandleDifferentiable,
    /// candle-nn's fused `softmax_last_dim` (no backward rule), differentiable norms.
    CandleFusedSoftmax,
    /// candle-nn's fused `LayerNorm` layer (no backward rule on contiguous input).
    CandleFusedNorm,
    /// `candle_train::nn`'s drop-ins, same constructor signatures.
    Ours,
}

const EPS: f64 = 1e-5;

/// A norm as each kit writes it.
struct Norm {
    kit: Kit,
    weight: Tensor,
    bias: Tensor,
    fused: candle_nn::LayerNorm,
    ours: candle_fit::train::nn::LayerNorm,
}

impl Norm {
    fn new(kit: Kit, size: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.))?;
        let fused = candle_nn::layer_norm(size, EPS, vb.clone())?;
        let ours = candle_fit::train::nn::layer_norm(size, EPS, vb)?;
        Ok(Self { kit, weight, bias, fused, ours })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kit {
            Kit::CandleDifferentiable | Kit::CandleFusedSoftmax => {
                candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, EPS as f32)
            }
            Kit::CandleFusedNorm => self.fused.forward(x),
            Kit::Ours => self.ours.forward(x),
        }
    }
}

fn linear(kit: Kit, in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Box<dyn Module>> {
    Ok(match kit {
        Kit::Ours => Box::new(candle_fit::train::nn::linear(in_dim, out_dim, vb)?),
        _ => Box::new(candle_nn::linear(in_dim, out_dim, vb)?),
    })
}

fn softmax(kit: Kit, x: &Tensor) -> Result<Tensor> {
    match kit {
        Kit::CandleFusedSoftmax => candle_nn::ops::softmax_last_dim(x),
        Kit::Ours => candle_fit::train::nn::ops::softmax_last_dim(x),
        _ => candle_nn::ops::softmax(x, D::Minus1),
    }
}

struct Block {
    kit: Kit,
    ln_1: Norm,
    qkv: Box<dyn Module>,
    proj: Box<dyn Module>,
    ln_2: Norm,
    fc: Box<dyn Module>,
    fc_out: Box<dyn Module>,
}

/// A GPT-like pre-norm transformer, as a candle-nn user writes it.
struct TinyGpt {
    map: VarMap,
    params: Parameters,
    wte: Box<dyn Module>,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: Box<dyn Module>,
    n_head: usize,
}

struct Batch {
    ids: Tensor,
    targets: Tensor,
}

/// Values from N(mean, std²) drawn from `rng`, F64 on the CPU.
fn seeded(rng: &mut Rng, shape: &[usize], mean: f64, std: f64) -> Result<Tensor> {
    let n = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| mean + std * rng.normal_f64()).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

const VOCAB: usize = 11;
const DIM: usize = 8;
const HEADS: usize = 2;
const LAYERS: usize = 3;
const SEQ: usize = 5;

impl TinyGpt {
    fn new(kit: Kit, seed: u64) -> Result<Self> {
        Self::with_dtype(kit, seed, DType::F64)
    }

    fn with_dtype(kit: Kit, seed: u64, dtype: DType) -> Result<Self> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, dtype, &dev);
        let wte: Box<dyn Module> = match kit {
            Kit::Ours => Box::new(candle_fit::train::nn::embedding(VOCAB, DIM, vb.pp("wte"))?),
            _ => Box::new(candle_nn::embedding(VOCAB, DIM, vb.pp("wte"))?),
        };
        let wpe = vb.pp("wpe").get_with_hints(
            (SEQ, DIM),
            "weight",
            candle_nn::Init::Randn { mean: 0., stdev: 0.5 },
        )?;
        let mut blocks = Vec::new();
        for i in 0..LAYERS {
            let vb = vb.pp("h").pp(i);
            blocks.push(Block {
                kit,
                ln_1: Norm::new(kit, DIM, vb.pp("ln_1"))?,
                qkv: linear(kit, DIM, 3 * DIM, vb.pp("attn").pp("qkv"))?,
                proj: linear(kit, DIM, DIM, vb.pp("attn").pp("proj"))?,
                ln_2: Norm::new(kit, DIM, vb.pp("ln_2"))?,
                fc: linear(kit, DIM, 4 * DIM, vb.pp("mlp").pp("fc"))?,
                fc_out: linear(kit, 4 * DIM, DIM, vb.pp("mlp").pp("fc_out"))?,
            });
        }
        let ln_f = Norm::new(kit, DIM, vb.pp("ln_f"))?;
        let lm_head = linear(kit, DIM, VOCAB, vb.pp("lm_head"))?;
        let params = Parameters::from_var_map(&map).map_err(|e| candle::Error::Msg(e.to_string()))?;
        // Candle's CPU generator cannot be seeded: draw every value again from our seeded one,
        // in name order (norm weights around one, everything else around zero).
        let mut rng = Rng::seeded(seed);
        for p in params.iter() {
            let mean = if p.name.contains("ln_") && p.name.ends_with("weight") { 1.0 } else { 0.0 };
            p.var()
                .map_err(candle::Error::wrap)?
                .set(&seeded(&mut rng, p.dims(), mean, 0.3)?.to_dtype(dtype)?)?;
        }
        Ok(Self { map, params, wte, wpe, blocks, ln_f, lm_head, n_head: HEADS })
    }

    fn batch(&self, seed: u64) -> Result<Batch> {
        let ids: Vec<u32> = (0..2 * SEQ as u64).map(|i| ((i * 7 + seed * 3) % VOCAB as u64) as u32).collect();
        let targets: Vec<u32> =
            (0..2 * SEQ as u64).map(|i| ((i * 5 + seed + 1) % VOCAB as u64) as u32).collect();
        Ok(Batch {
            ids: Tensor::from_vec(ids, (2, SEQ), &Device::Cpu)?,
            targets: Tensor::from_vec(targets, 2 * SEQ, &Device::Cpu)?,
        })
    }

    fn attention(&self, block: &Block, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let hd = c / self.n_head;
        let qkv = block.qkv.forward(x)?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * c, c)?.reshape((b, t, self.n_head, hd))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let mask: Vec<f64> =
            (0..t * t).map(|i| if i % t <= i / t { 0.0 } else { f64::NEG_INFINITY }).collect();
        let mask = Tensor::from_vec(mask, (t, t), x.device())?.to_dtype(x.dtype())?;
        let probs = softmax(block.kit, &scores.broadcast_add(&mask)?)?;
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        block.proj.forward(&y)
    }
}

impl SegmentedModel for TinyGpt {
    type Batch = Batch;
    fn num_segments(&self) -> usize {
        LAYERS + 2
    }
    fn segment_name(&self, index: usize) -> String {
        match index {
            0 => "embedding".into(),
            i if i <= LAYERS => format!("h.{}", i - 1),
            _ => "head".into(),
        }
    }
    fn first_input(&self, batch: &Batch) -> Result<Tensor> {
        Ok(batch.ids.clone())
    }
    fn forward_segment(&self, index: usize, x: &Tensor, batch: &Batch, _: &SegmentContext) -> Result<Tensor> {
        match index {
            0 => self.wte.forward(x)?.broadcast_add(&self.wpe),
            i if i <= LAYERS => {
                let block = &self.blocks[i - 1];
                // Pre-norm: each branch starts with a norm of the block's input alone.
                let x = (x + self.attention(block, &block.ln_1.forward(x)?)?)?;
                let h = block.fc.forward(&block.ln_2.forward(&x)?)?.gelu()?;
                x + block.fc_out.forward(&h)?
            }
            _ => {
                let logits = self.lm_head.forward(&self.ln_f.forward(x)?)?;
                candle_nn::loss::cross_entropy(&logits.reshape(((), VOCAB))?, &batch.targets)
            }
        }
    }
    fn segment_parameters(&self, index: usize) -> Vec<SegmentParameter> {
        let under = |prefix: &str| self.params.segment_parameters_under(prefix);
        match index {
            0 => [under("wte"), under("wpe")].concat(),
            i if i <= LAYERS => under(&format!("h.{}", i - 1)),
            _ => [under("ln_f"), under("lm_head")].concat(),
        }
    }
}

fn policies() -> Vec<Recompute> {
    vec![Recompute::Never, Recompute::All, Recompute::EveryK(2), Recompute::Sqrt]
}

fn decisions(model: &TinyGpt, policy: &Recompute) -> Result<Vec<Decision>> {
    policy.decide(&segment_infos(model))
}

fn err_text<T>(r: Result<T>) -> String {
    r.err().map(|e| e.to_string()).unwrap_or_default()
}

#[test]
fn a_candle_nn_model_gets_the_plain_backward_gradients_under_every_policy() -> Result<()> {
    let model = TinyGpt::new(Kit::CandleDifferentiable, 1)?;
    let batch = model.batch(0)?;
    assert_eq!(model.params.len(), 2 + 12 * LAYERS + 4);
    for policy in policies() {
        let decisions = decisions(&model, &policy)?;
        let report = verify_gradients(&model, &batch, SegmentContext::eval(), &decisions, 1e-12)?;
        assert_eq!(report.parameters.len(), model.params.len());
        // Every parameter got a non-zero gradient, so equality is not vacuous.
        assert!(report.parameters.iter().all(|p| p.reference_max_abs > 0.0), "{report:?}");
        assert!(report.max_relative_difference() <= 1e-12, "{policy:?}: {report:?}");
    }
    Ok(())
}

/// The hazard the engine's tracked inputs remove, shown on this model: block 0 run on a
/// detached input passes back only the residual's gradient, which differs from the true one.
#[test]
fn a_detached_block_input_would_lose_the_pre_norm_branches() -> Result<()> {
    let model = TinyGpt::new(Kit::CandleDifferentiable, 2)?;
    let batch = model.batch(1)?;
    let ctx = SegmentContext::eval();
    let h = model.forward_segment(0, &batch.ids, &batch, &ctx)?.detach();
    let g = seeded(&mut Rng::seeded(9), h.dims(), 0.0, 1.0)?;
    let input_grad = |input: &Tensor| -> Result<Tensor> {
        let out = model.forward_segment(1, input, &batch, &ctx)?;
        let grads = out.mul(&g)?.sum_all()?.backward()?;
        grads.get(input).cloned().ok_or_else(|| candle::Error::Msg("no input gradient".into()))
    };
    let detached = input_grad(&h)?;
    let tracked = input_grad(Var::from_tensor(&h)?.as_tensor())?;
    // Detached, the attention branch (it starts with `ln_1` of the input alone) is lost; the
    // residual and the MLP branch (its norm reads `x + attention`, tracked) still arrive.
    let scale = tracked.abs()?.max_all()?.to_scalar::<f64>()?;
    let difference = (&tracked - &detached)?.abs()?.max_all()?.to_scalar::<f64>()? / scale;
    assert!(difference > 1e-2, "the attention branch's share of the gradient is {difference}");
    Ok(())
}

#[test]
fn candle_nns_fused_layer_norm_is_refused_naming_the_op_and_the_parameter() -> Result<()> {
    // candle-nn's fused norms have no F64 kernel.
    let model = TinyGpt::with_dtype(Kit::CandleFusedNorm, 3, DType::F32)?;
    let batch = model.batch(0)?;
    let decisions = decisions(&model, &Recompute::Never)?;
    let engine =
        err_text(forward_backward(&model, &batch, SegmentContext::eval(), &decisions, 1.0, |_| Ok(())));
    assert!(engine.contains("parameter `ln_f.bias` received no gradient in segment `head`"), "{engine}");
    assert!(engine.contains("`layer_norm`") && engine.contains("layer_norm_slow"), "{engine}");
    let verify = err_text(verify_gradients(&model, &batch, SegmentContext::eval(), &decisions, 1e-5));
    for name in ["h.0.ln_1.weight", "h.2.ln_2.bias", "ln_f.weight"] {
        assert!(verify.contains(&format!("`{name}` (segment")), "{name}: {verify}");
    }
    // The norms' own parameters are the fused op's inputs; the rest is cut off upstream of it.
    assert!(verify.contains("`ln_f.weight` (segment `head`, no gradient"), "{verify}");
    assert!(verify.contains("): input of `layer_norm`"), "{verify}");
    assert!(verify.contains("`wte.weight` (segment `embedding`, no gradient"), "{verify}");
    assert!(verify.contains("): upstream of `layer_norm`"), "{verify}");
    assert!(!verify.contains("softmax_last_dim"), "{verify}");
    Ok(())
}

#[test]
fn candle_nns_fused_softmax_is_found_naming_the_op_and_the_q_k_weights() -> Result<()> {
    let model = TinyGpt::new(Kit::CandleFusedSoftmax, 4)?;
    let batch = model.batch(0)?;
    let missing = check_backward_rules(&model, &batch, SegmentContext::eval())?;
    let names: Vec<&str> = missing.iter().map(|m| m.name.as_str()).collect();
    // The q and k rows of the fused projection (and bias) get exactly zero; v's rows are fine.
    for i in 0..LAYERS {
        assert!(names.contains(&format!("h.{i}.attn.qkv.weight").as_str()), "{names:?}");
        assert!(names.contains(&format!("h.{i}.attn.qkv.bias").as_str()), "{names:?}");
    }
    let weight = missing.iter().find(|m| m.name == "h.0.attn.qkv.weight").expect("listed above");
    assert_eq!((weight.zero_elements, weight.elements, weight.absent), (2 * DIM * DIM, 3 * DIM * DIM, false));
    assert!(weight.likely_ops.iter().any(|op| op.kind == "softmax_last_dim"));
    let decisions = decisions(&model, &Recompute::All)?;
    let verify = err_text(verify_gradients(&model, &batch, SegmentContext::eval(), &decisions, 1e-12));
    assert!(
        verify.contains("`softmax_last_dim`") && verify.contains("ops::softmax(x, D::Minus1)"),
        "{verify}"
    );
    // The differentiable model passes the same check: the finding is the op, not noise.
    let good = TinyGpt::new(Kit::CandleDifferentiable, 4)?;
    assert!(check_backward_rules(&good, &good.batch(0)?, SegmentContext::eval())?.is_empty());
    Ok(())
}

#[test]
fn the_drop_in_layers_give_candle_nns_differentiable_gradients() -> Result<()> {
    let (theirs, ours) = (TinyGpt::new(Kit::CandleDifferentiable, 5)?, TinyGpt::new(Kit::Ours, 5)?);
    // Same seed, same VarBuilder paths and initialisations: the same values.
    for p in theirs.params.iter() {
        let q = ours.params.get(&p.name).ok_or_else(|| candle::Error::Msg(p.name.clone()))?;
        let d = (&p.tensor()? - &q.tensor()?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert_eq!(d, 0.0, "{}", p.name);
    }
    let batch = theirs.batch(2)?;
    let decisions = decisions(&ours, &Recompute::All)?;
    verify_gradients(&ours, &batch, SegmentContext::eval(), &decisions, 1e-12)?;
    let grads = |model: &TinyGpt| -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![];
        forward_backward(model, &batch, SegmentContext::eval(), &decisions, 1.0, |g| {
            out.extend(g.gradients.into_iter().map(|p| (p.name, p.grad)));
            Ok(())
        })?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    };
    for ((name, a), (_, b)) in grads(&theirs)?.iter().zip(grads(&ours)?.iter()) {
        let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(d <= 1e-10 * scale, "{name}: {d:e} at {scale:e}");
    }
    Ok(())
}

#[test]
fn a_var_map_model_trains_through_the_engine_and_the_updater_without_a_copy() -> Result<()> {
    let model = TinyGpt::new(Kit::Ours, 6)?;
    // The parameters are the map's variables (same ids), not copies.
    {
        let data = model.map.data().lock().map_err(|_| candle::Error::Msg("lock".into()))?;
        for p in model.params.iter() {
            assert_eq!(data.get(&p.name).map(|v| v.as_tensor().id()), Some(p.id()), "{}", p.name);
        }
    }
    let sgd =
        OptimizerConfig::Sgd(SgdConfig { momentum: 0.0, dampening: 0.0, weight_decay: 0.0, nesterov: false });
    let mut updater =
        LocalUpdater::from_config(&model.params, &sgd).map_err(|e| candle::Error::Msg(e.to_string()))?;
    let decisions = decisions(&model, &Recompute::Sqrt)?;
    let lr = 0.1;
    let mut losses = vec![];
    for step in 0..6 {
        let batch = model.batch(step % 2)?;
        let before: Vec<Tensor> = model.params.iter().map(|p| p.tensor()?.copy()).collect::<Result<_>>()?;
        let mut expected = vec![];
        let loss = forward_backward(&model, &batch, SegmentContext::eval(), &decisions, 1.0, |g| {
            for p in &g.gradients {
                expected.push((p.name.clone(), p.grad.clone()));
            }
            updater.accumulate(&g).map_err(|e| candle::Error::Msg(e.to_string()))
        })?;
        losses.push(loss.to_scalar::<f64>()?);
        updater.step(lr, None).map_err(|e| candle::Error::Msg(e.to_string()))?;
        // SGD wrote w - lr g into the map's own variables (FP32 arithmetic on F64 values).
        let data = model.map.data().lock().map_err(|_| candle::Error::Msg("lock".into()))?;
        for (p, before) in model.params.iter().zip(&before) {
            let grad = expected
                .iter()
                .filter(|(n, _)| *n == p.name)
                .map(|(_, g)| g.clone())
                .try_fold(before.zeros_like()?, |sum, g| sum + g)?;
            let want = (before - (grad * lr)?)?;
            let held = data.get(&p.name).ok_or_else(|| candle::Error::Msg(p.name.clone()))?;
            let d = (held.as_tensor() - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(d <= 1e-6, "{}: {d:e}", p.name);
        }
    }
    assert!(losses[4] < losses[0] && losses[5] < losses[1], "{losses:?}");
    Ok(())
}

// ---- Random segment graphs against the plain backward. ----

/// A shape-preserving op on `[2, 4]` activations, applied to a segment's input alone (so it
/// is untracked unless the input is).
#[derive(Debug, Clone, Copy)]
enum Op {
    Center,
    TransposeCopy,
    CastF32,
    NarrowCat,
    Tanh,
    Reshape,
    ColumnSum,
    Scale,
}

fn apply(op: Op, x: &Tensor) -> Result<Tensor> {
    match op {
        Op::Center => x.broadcast_sub(&x.mean_keepdim(1)?),
        Op::TransposeCopy => x.t()?.contiguous()?.t(),
        Op::CastF32 => x.to_dtype(DType::F32)?.to_dtype(DType::F64),
        Op::NarrowCat => Tensor::cat(&[x.narrow(1, 2, 2)?, x.narrow(1, 0, 2)?], 1),
        Op::Tanh => x.tanh(),
        Op::Reshape => x.reshape(8)?.reshape((2, 4)),
        Op::ColumnSum => x.sum_keepdim(0)?.broadcast_as(x.shape())?.affine(0.5, 0.0),
        Op::Scale => x.affine(0.7, 0.1),
    }
}

#[derive(Debug, Clone)]
struct SegmentSpec {
    /// The untracked ops that start the branch.
    ops: Vec<Op>,
    /// Whether the parameter (a `[4, 4]` matrix) joins by matmul (else elementwise `[4]`).
    matmul: bool,
    /// `x + branch` (else the branch alone).
    residual: bool,
}

struct RandomModel {
    specs: Vec<SegmentSpec>,
    params: Vec<Var>,
}

impl SegmentedModel for RandomModel {
    type Batch = Tensor;
    fn num_segments(&self) -> usize {
        self.specs.len() + 1
    }
    fn segment_name(&self, index: usize) -> String {
        format!("s{index}")
    }
    fn first_input(&self, batch: &Tensor) -> Result<Tensor> {
        Ok(batch.clone())
    }
    fn forward_segment(&self, index: usize, x: &Tensor, _: &Tensor, _: &SegmentContext) -> Result<Tensor> {
        let Some(spec) = self.specs.get(index) else { return x.tanh()?.sqr()?.sum_all() };
        let mut branch = x.clone();
        for op in &spec.ops {
            branch = apply(*op, &branch)?;
        }
        let w = self.params[index].as_tensor();
        let branch = if spec.matmul { branch.matmul(w)? } else { branch.broadcast_mul(w)? };
        if spec.residual {
            x + branch
        } else {
            Ok(branch)
        }
    }
    fn segment_parameters(&self, index: usize) -> Vec<SegmentParameter> {
        match self.params.get(index) {
            Some(var) if index < self.specs.len() => {
                vec![SegmentParameter::new(format!("w{index}"), var.clone())]
            }
            _ => vec![],
        }
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Center),
        Just(Op::TransposeCopy),
        Just(Op::CastF32),
        Just(Op::NarrowCat),
        Just(Op::Tanh),
        Just(Op::Reshape),
        Just(Op::ColumnSum),
        Just(Op::Scale),
    ]
}

fn spec_strategy() -> impl Strategy<Value = SegmentSpec> {
    (prop::collection::vec(op_strategy(), 0..4), any::<bool>(), any::<bool>())
        .prop_map(|(ops, matmul, residual)| SegmentSpec { ops, matmul, residual })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_segment_graphs_get_the_plain_backward_gradients(
        specs in prop::collection::vec(spec_strategy(), 1..5),
        recompute in prop::collection::vec(any::<bool>(), 5),
        seed in 0u64..1000,
    ) {
        let run = || -> Result<f64> {
            let mut rng = Rng::seeded(seed);
            let params = specs
                .iter()
                .map(|s| {
                    let (shape, mean): (&[usize], f64) = if s.matmul { (&[4, 4], 0.0) } else { (&[4], 1.0) };
                    Var::from_tensor(&seeded(&mut rng, shape, mean, 0.5)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let model = RandomModel { specs: specs.clone(), params };
            let x = seeded(&mut rng, &[2, 4], 0.0, 1.0)?;
            let n = model.num_segments();
            let decisions: Vec<Decision> = (0..n)
                .map(|i| if i + 1 < n && recompute[i] { Decision::Recompute } else { Decision::Keep })
                .collect();
            let report = compare_gradients(&model, &x, SegmentContext::eval(), &decisions)?;
            Ok(report.max_relative_difference())
        };
        let worst = run().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(worst <= 1e-12, "relative difference {worst:e} for {specs:?}");
    }
}
