//! LoRA on a model written the candle-nn way with `candle_train::nn`'s drop-in layers
//! (`candle_train::nn::Lora`): a pre-norm attention + MLP block whose code knows nothing of
//! LoRA, built through `Lora::build` over a `VarMap`. Checked against candle-nn's own layers
//! and ops (`candle_nn::Linear`, `ops::layer_norm_slow`, `ops::softmax`) computing through the
//! merged weights `W + s B A`, in F64 to 1e-12: outputs, adapter gradients and the input's
//! gradient; no base variable gets a gradient; PEFT files round-trip; merging gives a plain
//! model with the same outputs; a few AdamW steps move only the adapters.

use candle::{DType, Device, Module, Result, Tensor, Var, D};
use candle_fit::train::lora::peft::{PeftInfo, CONFIG_FILE, WEIGHTS_FILE};
use candle_fit::train::lora::LoraConfig;
use candle_fit::train::nn::{layer_norm, linear, linear_no_bias, ops::softmax_last_dim, LayerNorm, Linear};
use candle_fit::train::nn::{Lora, VarBuilder, VarMap};
use candle_nn::Optimizer;

const DIM: usize = 8;
const HIDDEN: usize = 12;
/// Exact in F32, so candle-nn's `layer_norm_slow` (an `f32` eps) and ours agree in F64.
const EPS: f64 = 1.0 / 1024.0;

/// A pre-norm transformer block as a candle-nn user writes it, on the drop-in layers.
struct Block {
    ln1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn new(vb: VarBuilder) -> Result<Self> {
        let attn = vb.pp("attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            ln1: layer_norm(DIM, EPS, vb.pp("ln1"))?,
            q_proj: linear_no_bias(DIM, DIM, attn.pp("q_proj"))?,
            k_proj: linear_no_bias(DIM, DIM, attn.pp("k_proj"))?,
            v_proj: linear(DIM, DIM, attn.pp("v_proj"))?,
            o_proj: linear(DIM, DIM, attn.pp("o_proj"))?,
            ln2: layer_norm(DIM, EPS, vb.pp("ln2"))?,
            fc1: linear(DIM, HIDDEN, mlp.pp("fc1"))?,
            fc2: linear(HIDDEN, DIM, mlp.pp("fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln1.forward(x)?;
        let (q, k, v) = (self.q_proj.forward(&h)?, self.k_proj.forward(&h)?, self.v_proj.forward(&h)?);
        let scores = (q.matmul(&k.t()?)? / (DIM as f64).sqrt())?;
        let x = (x + self.o_proj.forward(&softmax_last_dim(&scores)?.matmul(&v)?)?)?;
        let h = self.fc2.forward(&self.fc1.forward(&self.ln2.forward(&x)?)?.gelu_erf()?)?;
        x + h
    }
}

/// The same block on candle-nn's own differentiable layers and ops, each adapted layer through
/// its merged weight `W + s B A` (differentiable in the adapter variables).
fn reference(base: &VarMap, lora: &Lora, x: &Tensor) -> Result<Tensor> {
    let vars = base.data().lock().map_err(|_| candle::Error::Msg("poisoned".into()))?.clone();
    let get = |name: &str| -> Result<Tensor> {
        vars.get(name).map(|v| v.as_tensor().detach()).ok_or_else(|| candle::Error::Msg(format!("no {name}")))
    };
    let adapters: Vec<Var> = lora.vars();
    let names = lora.adapted_layers();
    let scale = lora.config().scale();
    let lin = |path: &str| -> Result<candle_nn::Linear> {
        let mut w = get(&format!("{path}.weight"))?;
        if let Some(i) = names.iter().position(|n| n == path) {
            let (a, b) = (adapters[2 * i].as_tensor(), adapters[2 * i + 1].as_tensor());
            w = (w + (b.matmul(a)? * scale)?)?;
        }
        Ok(candle_nn::Linear::new(w, get(&format!("{path}.bias")).ok()))
    };
    let norm = |x: &Tensor, p: &str| {
        candle_nn::ops::layer_norm_slow(
            x,
            &get(&format!("{p}.weight"))?,
            &get(&format!("{p}.bias"))?,
            EPS as f32,
        )
    };
    let h = norm(x, "ln1")?;
    let q = lin("attn.q_proj")?.forward(&h)?;
    let k = lin("attn.k_proj")?.forward(&h)?;
    let v = lin("attn.v_proj")?.forward(&h)?;
    let scores = (q.matmul(&k.t()?)? / (DIM as f64).sqrt())?;
    let x = (x + lin("attn.o_proj")?.forward(&candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?)?)?;
    let h = lin("mlp.fc2")?.forward(&lin("mlp.fc1")?.forward(&norm(&x, "ln2")?)?.gelu_erf()?)?;
    x + h
}

/// A copy of the map's name -> variable table.
fn variables(map: &VarMap) -> anyhow::Result<std::collections::HashMap<String, Var>> {
    Ok(map.data().lock().map_err(|_| anyhow::anyhow!("the VarMap's lock is poisoned"))?.clone())
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

fn config(targets: &[&str]) -> LoraConfig {
    LoraConfig { rank: 3, alpha: 6.0, ..LoraConfig::new(targets.iter().copied()) }
}

/// A base `VarMap` (candle-nn's initialisation, F64), the adapted block over it, and the
/// adapters' `B` set to random values (PEFT starts it at zero, which would hide `A`'s
/// gradient and the update itself).
fn adapted(targets: &[&str]) -> anyhow::Result<(VarMap, Lora, Block)> {
    let base = VarMap::new();
    let lora = Lora::new(config(targets), 7)?;
    let block = lora.build(&base, DType::F64, &Device::Cpu, Block::new)?;
    for (i, var) in lora.vars().iter().enumerate().filter(|(i, _)| i % 2 == 1) {
        var.set(&(Tensor::randn(0.0, 0.5, var.shape(), &Device::Cpu)? * (i as f64))?)?;
    }
    Ok((base, lora, block))
}

fn input() -> Result<Tensor> {
    Tensor::randn(0.0, 1.0, (2, 5, DIM), &Device::Cpu)?.to_dtype(DType::F64)
}

#[test]
fn adapter_gradients_equal_candle_nns_merged_backward() -> anyhow::Result<()> {
    let (base, lora, block) = adapted(&["q_proj", "v_proj", "mlp.fc1"])?;
    assert_eq!(lora.adapted_layers(), ["attn.q_proj", "attn.v_proj", "mlp.fc1"]);
    let target = Tensor::randn(0.0, 1.0, (2, 5, DIM), &Device::Cpu)?.to_dtype(DType::F64)?;
    let x = Var::from_tensor(&input()?)?;

    let ours = block.forward(x.as_tensor())?;
    let theirs = reference(&base, &lora, x.as_tensor())?;
    let scale = theirs.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    assert!(max_diff(&ours, &theirs)? <= 1e-12 * scale, "outputs differ by {}", max_diff(&ours, &theirs)?);

    let g_ours = (ours * &target)?.sum_all()?.backward()?;
    let g_theirs = (theirs * &target)?.sum_all()?.backward()?;
    let params = lora.parameters()?;
    assert_eq!(params.len(), 6);
    for (p, var) in params.iter().zip(lora.vars()) {
        let (a, b) = (g_ours.get(var.as_tensor()), g_theirs.get(var.as_tensor()));
        let (Some(a), Some(b)) = (a, b) else { panic!("`{}` got no gradient (ours {a:?})", p.name) };
        let norm = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        assert!(norm > 1e-6, "`{}`'s reference gradient is zero: the check would be empty", p.name);
        let diff = max_diff(a, b)?;
        assert!(diff <= 1e-12 * norm.max(1.0), "`{}`: gradients differ by {diff} (scale {norm})", p.name);
    }
    // The input's gradient flows through the frozen layers (and through the adapters).
    let (Some(a), Some(b)) = (g_ours.get(x.as_tensor()), g_theirs.get(x.as_tensor())) else {
        anyhow::bail!("the input got no gradient")
    };
    assert!(max_diff(a, b)? <= 1e-12, "input gradients differ by {}", max_diff(a, b)?);
    // No base variable is in the graph: no gradient is computed for any of them.
    let vars = variables(&base)?;
    assert_eq!(vars.len(), 14, "{:?}", vars.keys());
    for (name, var) in &vars {
        assert!(g_ours.get(var.as_tensor()).is_none(), "base `{name}` got a gradient");
    }
    Ok(())
}

#[test]
fn all_linear_adapts_every_linear_layer_and_peft_files_round_trip() -> anyhow::Result<()> {
    let (base, lora, block) = adapted(&["all-linear"])?;
    assert_eq!(lora.adapted_layers().len(), 6);
    let x = input()?;
    let out = block.forward(&x)?;
    let dir = std::env::temp_dir().join(format!("candle-fit-nn-lora-{}", std::process::id()));
    let info = PeftInfo { base_model: Some("tiny-block".into()), ..PeftInfo::default() };
    lora.save_peft(dir.as_path(), &info)?;

    // The files are PEFT's: the config's fields and the weights' names.
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.as_path().join(CONFIG_FILE))?)?;
    assert_eq!(json["r"], 3);
    assert_eq!(json["lora_alpha"], 6.0);
    assert_eq!(json["target_modules"], "all-linear");
    assert_eq!(json["fan_in_fan_out"], false);
    let tensors = candle::safetensors::load(dir.as_path().join(WEIGHTS_FILE), &Device::Cpu)?;
    assert_eq!(tensors.len(), 12);
    let b = &tensors["base_model.model.mlp.fc1.lora_B.weight"];
    assert_eq!(b.dims(), [HIDDEN, 3]);

    // Loaded into a fresh build over the same base: the same adapters, the same outputs.
    let (again, read) = Lora::from_peft(dir.as_path(), "")?;
    assert_eq!(read.base_model.as_deref(), Some("tiny-block"));
    let block_again = again.build(&base, DType::F64, &Device::Cpu, Block::new)?;
    for (p, q) in lora.parameters()?.iter().zip(again.parameters()?.iter()) {
        assert_eq!(p.name, q.name);
        assert_eq!(max_diff(&p.tensor()?, &q.tensor()?)?, 0.0, "`{}` differs after loading", p.name);
    }
    assert_eq!(max_diff(&out, &block_again.forward(&x)?)?, 0.0);
    // Without the file (B = 0) the outputs are the base's: the loaded values matter.
    let fresh = Lora::new(config(&["all-linear"]), 0)?.build(&base, DType::F64, &Device::Cpu, Block::new)?;
    assert!(max_diff(&out, &fresh.forward(&x)?)? > 1e-3);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn merging_gives_a_plain_model_with_the_same_outputs() -> anyhow::Result<()> {
    let (base, lora, block) = adapted(&["q_proj", "fc2"])?;
    let x = input()?;
    let adapted_out = block.forward(&x)?;
    drop(block);
    let before = VarBuilder::from_varmap(&base, DType::F64, &Device::Cpu);
    let plain_before = Block::new(before)?.forward(&x)?;
    assert!(max_diff(&adapted_out, &plain_before)? > 1e-3, "the adapters change nothing: an empty check");
    lora.merge_into(&base)?;
    let merged = Block::new(VarBuilder::from_varmap(&base, DType::F64, &Device::Cpu))?;
    let diff = max_diff(&adapted_out, &merged.forward(&x)?)?;
    assert!(diff <= 1e-12, "merged outputs differ by {diff}");
    Ok(())
}

#[test]
fn adamw_moves_only_the_adapters() -> anyhow::Result<()> {
    let (base, lora, block) = adapted(&["q_proj", "v_proj"])?;
    let snapshot: Vec<(String, Tensor)> = variables(&base)?
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
        .collect::<Result<_>>()?;
    let x = input()?;
    let target = Tensor::zeros((2, 5, DIM), DType::F64, &Device::Cpu)?;
    let loss = |block: &Block| -> Result<Tensor> { (block.forward(&x)? - &target)?.sqr()?.mean_all() };
    let mut opt = candle_nn::AdamW::new_lr(lora.vars(), 1e-2)?;
    let first = loss(&block)?.to_scalar::<f64>()?;
    for _ in 0..5 {
        opt.backward_step(&loss(&block)?)?;
    }
    let last = loss(&block)?.to_scalar::<f64>()?;
    assert!(last < first, "loss {first} -> {last}");
    for (name, value) in snapshot {
        let now = variables(&base)?[&name].as_tensor().clone();
        assert_eq!(max_diff(&value, &now)?, 0.0, "base `{name}` moved");
    }
    Ok(())
}

#[test]
fn dropout_draws_only_with_a_seed() -> anyhow::Result<()> {
    let base = VarMap::new();
    let lora = Lora::new(LoraConfig { dropout: 0.5, ..config(&["fc1"]) }, 0)?;
    let block = lora.build(&base, DType::F64, &Device::Cpu, Block::new)?;
    lora.vars()[1].set(&Tensor::ones((HIDDEN, 3), DType::F64, &Device::Cpu)?)?;
    let x = input()?;
    let eval = block.forward(&x)?;
    lora.set_dropout_seed(Some(1))?;
    let train = block.forward(&x)?;
    lora.set_dropout_seed(Some(1))?;
    assert_eq!(max_diff(&train, &block.forward(&x)?)?, 0.0, "a seed replays its masks");
    lora.set_dropout_seed(None)?;
    assert_eq!(max_diff(&eval, &block.forward(&x)?)?, 0.0);
    assert!(max_diff(&eval, &train)? > 1e-6, "dropout changed nothing");
    Ok(())
}

#[test]
fn mistakes_are_named() -> anyhow::Result<()> {
    let base = VarMap::new();
    let err = Lora::new(config(&["q_proj", "query"]), 0)?
        .build(&base, DType::F64, &Device::Cpu, Block::new)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("`query` matches no linear layer") && err.contains("attn.q_proj"), "{err}");

    // A targeted layer whose weight is a trainable variable (fetched through another builder).
    let other = VarMap::new();
    let err = Lora::new(config(&["fc1"]), 0)?
        .build(&base, DType::F64, &Device::Cpu, |_| {
            linear(DIM, HIDDEN, VarBuilder::from_varmap(&other, DType::F64, &Device::Cpu).pp("fc1"))
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("`fc1` is a LoRA target, but its weight is a trainable variable"), "{err}");

    let lora = Lora::new(config(&["fc1"]), 0)?;
    lora.build(&base, DType::F64, &Device::Cpu, Block::new)?;
    let err = lora.build(&base, DType::F64, &Device::Cpu, Block::new).err().map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("already built"));

    // Outside a build, the layers take no adapter.
    let plain = Block::new(VarBuilder::from_varmap(&base, DType::F64, &Device::Cpu))?;
    assert!(plain.fc1.adapter().is_none());
    Ok(())
}
