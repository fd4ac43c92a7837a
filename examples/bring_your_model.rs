//! Bring a candle-nn model: a small pre-norm transformer written the usual candle-nn way
//! (`VarMap`, `VarBuilder`, `linear`, `layer_norm`, `embedding`, a fused q/k/v projection,
//! `softmax_last_dim`), with its imports switched to `candle_train::nn`'s drop-ins, checked
//! once with `verify_gradients`, then trained on the bundled novel's bytes through
//! candle-ckpt's engine (every block recomputed) and `LocalUpdater`, which steps the
//! `VarMap`'s own variables.
//!
//! `cargo run --release --example bring_your_model` (add `--candle-nn` to run the same model
//! on candle-nn's own layers and see the check name the ops that lose gradients)

use anyhow::Context;
use candle::{DType, Device, Module, Result, Tensor};
use candle_fit::ckpt::{
    forward_backward, segment_infos, verify_gradients, Recompute, RecomputePolicy, Rng, SegmentContext,
    SegmentParameter, SegmentedModel,
};
use candle_fit::train::{AdamWConfig, LocalUpdater, OptimizerConfig, Parameters, Updater};
use candle_nn::{VarBuilder, VarMap};

/// Which library the layers come from (the model's code is the same).
#[derive(Clone, Copy, PartialEq)]
enum Layers {
    CandleNn,
    CandleTrain,
}

fn linear(layers: Layers, i: usize, o: usize, vb: VarBuilder) -> Result<Box<dyn Module>> {
    Ok(match layers {
        Layers::CandleNn => Box::new(candle_nn::linear(i, o, vb)?),
        Layers::CandleTrain => Box::new(candle_fit::train::nn::linear(i, o, vb)?),
    })
}

fn layer_norm(layers: Layers, size: usize, vb: VarBuilder) -> Result<Box<dyn Module>> {
    Ok(match layers {
        Layers::CandleNn => Box::new(candle_nn::layer_norm(size, 1e-5, vb)?),
        Layers::CandleTrain => Box::new(candle_fit::train::nn::layer_norm(size, 1e-5, vb)?),
    })
}

struct Block {
    ln_1: Box<dyn Module>,
    qkv: Box<dyn Module>,
    proj: Box<dyn Module>,
    ln_2: Box<dyn Module>,
    fc: Box<dyn Module>,
    fc_out: Box<dyn Module>,
}

struct TinyGpt {
    layers: Layers,
    params: Parameters,
    wte: Box<dyn Module>,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Box<dyn Module>,
    lm_head: Box<dyn Module>,
    heads: usize,
}

const VOCAB: usize = 256;

struct Batch {
    ids: Tensor,
    targets: Tensor,
}

impl TinyGpt {
    fn new(
        layers: Layers,
        map: &VarMap,
        dtype: DType,
        dim: usize,
        n_layer: usize,
        seq: usize,
    ) -> Result<Self> {
        let vb = VarBuilder::from_varmap(map, dtype, &Device::Cpu);
        let wte: Box<dyn Module> = match layers {
            Layers::CandleNn => Box::new(candle_nn::embedding(VOCAB, dim, vb.pp("wte"))?),
            Layers::CandleTrain => Box::new(candle_fit::train::nn::embedding(VOCAB, dim, vb.pp("wte"))?),
        };
        let wpe = vb.pp("wpe").get_with_hints(
            (seq, dim),
            "weight",
            candle_nn::Init::Randn { mean: 0., stdev: 0.02 },
        )?;
        let mut blocks = Vec::new();
        for i in 0..n_layer {
            let vb = vb.pp("h").pp(i);
            blocks.push(Block {
                ln_1: layer_norm(layers, dim, vb.pp("ln_1"))?,
                qkv: linear(layers, dim, 3 * dim, vb.pp("attn").pp("qkv"))?,
                proj: linear(layers, dim, dim, vb.pp("attn").pp("proj"))?,
                ln_2: layer_norm(layers, dim, vb.pp("ln_2"))?,
                fc: linear(layers, dim, 4 * dim, vb.pp("mlp").pp("fc"))?,
                fc_out: linear(layers, 4 * dim, dim, vb.pp("mlp").pp("fc_out"))?,
            });
        }
        let ln_f = layer_norm(layers, dim, vb.pp("ln_f"))?;
        let lm_head = linear(layers, dim, VOCAB, vb.pp("lm_head"))?;
        // The same variables the map holds: the updater will write them in place.
        let params = Parameters::from_var_map(map).map_err(|e| candle::Error::Msg(e.to_string()))?;
        Ok(Self { layers, params, wte, wpe, blocks, ln_f, lm_head, heads: 4 })
    }

    fn attention(&self, block: &Block, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = block.qkv.forward(x)?;
        let split = |i: usize| {
            qkv.narrow(2, i * c, c)?.reshape((b, t, self.heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let mask: Vec<f32> =
            (0..t * t).map(|i| if i % t <= i / t { 0.0 } else { f32::NEG_INFINITY }).collect();
        let scores =
            scores.broadcast_add(&Tensor::from_vec(mask, (t, t), x.device())?.to_dtype(x.dtype())?)?;
        let probs = match self.layers {
            Layers::CandleNn => candle_nn::ops::softmax_last_dim(&scores)?,
            Layers::CandleTrain => candle_fit::train::nn::ops::softmax_last_dim(&scores)?,
        };
        block.proj.forward(&probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?)
    }
}

impl SegmentedModel for TinyGpt {
    type Batch = Batch;
    fn num_segments(&self) -> usize {
        self.blocks.len() + 2
    }
    fn segment_name(&self, index: usize) -> String {
        match index {
            0 => "embedding".into(),
            i if i <= self.blocks.len() => format!("h.{}", i - 1),
            _ => "head".into(),
        }
    }
    fn first_input(&self, batch: &Batch) -> Result<Tensor> {
        Ok(batch.ids.clone())
    }
    fn forward_segment(&self, index: usize, x: &Tensor, batch: &Batch, _: &SegmentContext) -> Result<Tensor> {
        match index {
            0 => self.wte.forward(x)?.broadcast_add(&self.wpe),
            i if i <= self.blocks.len() => {
                let block = &self.blocks[i - 1];
                let x = (x + self.attention(block, &block.ln_1.forward(x)?)?)?;
                let mlp = block.fc_out.forward(&block.fc.forward(&block.ln_2.forward(&x)?)?.gelu()?)?;
                x + mlp
            }
            _ => {
                let logits = self.lm_head.forward(&self.ln_f.forward(x)?)?;
                candle_nn::loss::cross_entropy(
                    &logits.reshape(((), VOCAB))?.to_dtype(DType::F32)?,
                    &batch.targets,
                )
            }
        }
    }
    fn segment_parameters(&self, index: usize) -> Vec<SegmentParameter> {
        let under = |prefix: &str| self.params.segment_parameters_under(prefix);
        match index {
            0 => [under("wte"), under("wpe")].concat(),
            i if i <= self.blocks.len() => under(&format!("h.{}", i - 1)),
            _ => [under("ln_f"), under("lm_head")].concat(),
        }
    }
}

/// `rows` windows of `seq + 1` bytes at seeded positions.
fn batch(text: &[u8], rows: usize, seq: usize, rng: &mut Rng) -> Result<Batch> {
    let (mut ids, mut targets) = (Vec::new(), Vec::new());
    for _ in 0..rows {
        let start = rng.below((text.len() - seq - 1) as u64) as usize;
        ids.extend(text[start..start + seq].iter().map(|&b| b as u32));
        targets.extend(text[start + 1..start + seq + 1].iter().map(|&b| b as u32));
    }
    Ok(Batch {
        ids: Tensor::from_vec(ids, (rows, seq), &Device::Cpu)?,
        targets: Tensor::from_vec(targets, rows * seq, &Device::Cpu)?,
    })
}

fn main() -> anyhow::Result<()> {
    let layers =
        if std::env::args().any(|a| a == "--candle-nn") { Layers::CandleNn } else { Layers::CandleTrain };
    let text = candle_fit::BUNDLED_CORPUS;
    let mut rng = Rng::seeded(0);
    let policy = Recompute::All;

    // Check once, in F64, on a small copy of the model: no op without a backward rule, and the
    // segmented engine equals one plain backward.
    let check_map = VarMap::new();
    // (candle-nn's fused norms have no F64 kernel: its variant is checked in F32.)
    let (dtype, tolerance) =
        if layers == Layers::CandleNn { (DType::F32, 1e-5) } else { (DType::F64, 1e-12) };
    let small = TinyGpt::new(layers, &check_map, dtype, 16, 2, 8)?;
    let decisions = policy.decide(&segment_infos(&small))?;
    match verify_gradients(
        &small,
        &batch(text, 2, 8, &mut rng)?,
        SegmentContext::eval(),
        &decisions,
        tolerance,
    ) {
        Ok(report) => println!(
            "verify_gradients: {} parameters, engine = plain backward (max relative difference {:.1e})",
            report.parameters.len(),
            report.max_relative_difference()
        ),
        Err(e) => {
            println!("verify_gradients refused the model:\n  {e}");
            return Ok(());
        }
    }

    // Train in F32.
    let (dim, n_layer, seq, rows) = (64, 4, 64, 8);
    let map = VarMap::new();
    let model = TinyGpt::new(layers, &map, DType::F32, dim, n_layer, seq)?;
    let decisions = policy.decide(&segment_infos(&model))?;
    let adamw = OptimizerConfig::AdamW(AdamWConfig::default());
    let mut updater = LocalUpdater::from_config(&model.params, &adamw)?;
    println!(
        "{} parameters in {} tensors, segments recomputed: {policy:?}",
        model.params.num_elements(),
        model.params.len()
    );
    for step in 0..=60 {
        let batch = batch(text, rows, seq, &mut rng)?;
        let loss = forward_backward(&model, &batch, SegmentContext::eval(), &decisions, 1.0, |g| {
            updater.accumulate(&g).map_err(|e| candle::Error::Msg(e.to_string()))
        })?;
        updater.step(3e-3, Some(1.0))?;
        if step % 10 == 0 {
            println!("step {step:3}: loss {:.4}", loss.to_scalar::<f32>()?);
        }
    }
    // The map holds the trained values (the updater wrote its variables in place).
    let data = map.data().lock().map_err(|_| anyhow::anyhow!("poisoned lock"))?;
    let wte = data.get("wte.weight").context("wte.weight in the map")?;
    println!(
        "wte.weight in the VarMap is the trained variable: {}",
        wte.as_tensor().id() == model.params.get("wte.weight").context("param")?.id()
    );
    Ok(())
}
