//! LoRA through the public API: adapter gradients against one plain backward through the merged
//! weights `W + s B A` (F64, 1e-12) under every recompute policy and with accumulation, dropout
//! replayed under recompute, the frozen base (no gradient, no optimizer state, unchanged by
//! training), training through the Trainer, ZeRO on two ranks, PEFT's files and merging.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use candle::{DType, Device, Tensor};
use candle_fit::ckpt::{
    forward_backward, plain_forward_backward, segment_infos, Recompute, RecomputePolicy, SegmentContext,
    SegmentedModel,
};
use candle_fit::shard::driver::{fit_in_process, InProcessConfig};
use candle_fit::shard::ZeroStage;
use candle_fit::train::lora::peft::{PeftInfo, CONFIG_FILE, WEIGHTS_FILE};
use candle_fit::train::lora::{LoraConfig, LoraModel};
use candle_fit::train::module::Module;
use candle_fit::train::{
    AdamWConfig, Corpus, Gpt, GptConfig, Llama, LlamaConfig, LocalUpdater, OptimizerConfig, SgdConfig,
    TokenBatch, TrainableModel, Trainer, TrainerConfig, Updater,
};

const LLAMA_TARGETS: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
const GPT_TARGETS: [&str; 3] = ["c_attn", "c_proj", "c_fc"];

fn tiny_gpt(dropout: f32) -> GptConfig {
    GptConfig { vocab_size: 23, n_ctx: 16, n_embd: 8, n_layer: 3, n_head: 2, dropout, ..GptConfig::default() }
}

fn tiny_llama() -> LlamaConfig {
    LlamaConfig { num_hidden_layers: 3, ..LlamaConfig::tiny() }
}

fn lora(targets: &[&str], dropout: f32) -> LoraConfig {
    LoraConfig { rank: 2, alpha: 6.0, dropout, ..LoraConfig::new(targets.iter().copied()) }
}

/// Rows `first .. first + rows` of a batch of tokens below 23 (`[rows, 6]`) and their targets.
fn batch(rows: usize, first: u32) -> candle::Result<TokenBatch> {
    let ids: Vec<u32> = (first * 6..(first + rows as u32) * 6).map(|i| (i * 7 + 3) % 23).collect();
    let targets: Vec<u32> = ids.iter().map(|i| (i * 5 + 1) % 23).collect();
    Ok(TokenBatch {
        inputs: Tensor::from_vec(ids, (rows, 6), &Device::Cpu)?,
        targets: Tensor::from_vec(targets, (rows, 6), &Device::Cpu)?,
    })
}

/// Gives every `lora_B` non-zero values (B starts at zero, where A's gradient is zero too).
fn randomize_b<M: Module>(model: &LoraModel<M>) -> anyhow::Result<()> {
    for (k, p) in model.adapter_parameters().iter().enumerate() {
        if p.name.ends_with("lora_B.weight") {
            let n = p.elem_count();
            let values: Vec<f64> = (0..n).map(|i| 0.3 * ((i * 13 + k * 7) as f64).sin()).collect();
            p.var()?.set(&Tensor::from_vec(values, p.shape(), &Device::Cpu)?.to_dtype(p.dtype())?)?;
        }
    }
    Ok(())
}

type Grads = BTreeMap<String, Tensor>;

fn engine_grads<M: SegmentedModel>(
    model: &M,
    batch: &M::Batch,
    ctx: SegmentContext,
    policy: Recompute,
    multiplier: f64,
) -> anyhow::Result<Grads> {
    let decisions = policy.decide(&segment_infos(model))?;
    let mut grads = Grads::new();
    forward_backward(model, batch, ctx, &decisions, multiplier, |segment| {
        for g in segment.gradients {
            let sum = match grads.remove(&g.name) {
                Some(previous) => (previous + &g.grad)?,
                None => g.grad,
            };
            grads.insert(g.name, sum);
        }
        Ok(())
    })?;
    Ok(grads)
}

fn plain_grads<M: SegmentedModel>(model: &M, batch: &M::Batch, ctx: SegmentContext) -> anyhow::Result<Grads> {
    let mut grads = Grads::new();
    plain_forward_backward(model, batch, ctx, 1.0, |segment| {
        for g in segment.gradients {
            grads.insert(g.name, g.grad.detach());
        }
        Ok(())
    })?;
    Ok(grads)
}

/// The largest difference of a parameter's gradient relative to the largest entry of the
/// reference's, over every parameter; the names must be the same.
fn max_relative(got: &Grads, reference: &Grads) -> anyhow::Result<f64> {
    assert_eq!(got.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>());
    let mut worst = 0.0f64;
    for (name, r) in reference {
        let scale = r.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        assert!(scale > 0.0, "`{name}` has a zero reference gradient");
        let diff = (&got[name] - r)?.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        worst = worst.max(diff / scale);
    }
    Ok(worst)
}

/// Adapter gradients (and nothing else) equal one plain backward through `W + s B A` under
/// every recompute policy, and two accumulated half batches equal the whole batch.
fn check_against_merged<M: SegmentedModel<Batch = TokenBatch> + Module>(
    model: &LoraModel<M>,
) -> anyhow::Result<()> {
    randomize_b(model)?;
    let (whole, first, second) = (batch(4, 0)?, batch(2, 0)?, batch(2, 2)?);
    let ctx = SegmentContext::train(5, 0, 0);
    model.set_merged_reference(true);
    let reference = plain_grads(model, &whole, ctx)?;
    model.set_merged_reference(false);
    let names: Vec<&str> = model.adapter_parameters().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(reference.keys().map(String::as_str).collect::<Vec<_>>(), {
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted
    });
    for policy in [Recompute::Never, Recompute::All, Recompute::EveryK(2), Recompute::Sqrt] {
        let got = engine_grads(model, &whole, ctx, policy, 1.0)?;
        let rel = max_relative(&got, &reference)?;
        assert!(rel <= 1e-12, "{policy:?}: relative difference {rel:e}");
        // Accumulation: each half's mean loss weighted by its share.
        let mut sum = engine_grads(model, &first, ctx, policy, 0.5)?;
        for (name, g) in engine_grads(model, &second, SegmentContext::train(5, 0, 1), policy, 0.5)? {
            let total = (&sum[&name] + g)?;
            sum.insert(name, total);
        }
        let rel = max_relative(&sum, &reference)?;
        assert!(rel <= 1e-12, "{policy:?}, two micro-batches: relative difference {rel:e}");
    }
    Ok(())
}

#[test]
fn llama_adapter_gradients_equal_the_merged_computation() -> anyhow::Result<()> {
    let base = Llama::new(&tiny_llama(), DType::F64, &Device::Cpu, 1)?;
    let model = LoraModel::new(base, lora(&LLAMA_TARGETS, 0.0), 2)?;
    assert_eq!(model.adapted_layers().len(), 7 * 3);
    check_against_merged(&model)
}

#[test]
fn gpt_adapter_gradients_equal_the_merged_computation() -> anyhow::Result<()> {
    let base = Gpt::new(tiny_gpt(0.0), DType::F64, &Device::Cpu, 1)?;
    let model = LoraModel::new(base, lora(&GPT_TARGETS, 0.0), 2)?;
    // c_proj matches both the attention's and the MLP's output projection.
    assert_eq!(model.adapted_layers().len(), 4 * 3);
    assert_eq!(model.adapted_layers()[0], "h.0.attn.c_attn");
    check_against_merged(&model)
}

/// With LoRA dropout (and the model's own), every policy replays the masks: the engine's
/// gradients equal one plain backward of the same training step, and the dropout is active
/// (they differ from evaluation's).
#[test]
fn adapter_dropout_replays_under_recompute() -> anyhow::Result<()> {
    let base = Gpt::new(tiny_gpt(0.1), DType::F64, &Device::Cpu, 1)?;
    let model = LoraModel::new(base, lora(&["all-linear"], 0.3), 2)?;
    randomize_b(&model)?;
    let whole = batch(4, 0)?;
    let ctx = SegmentContext::train(9, 3, 0);
    let reference = plain_grads(&model, &whole, ctx)?;
    for policy in [Recompute::Never, Recompute::All, Recompute::EveryK(2), Recompute::Sqrt] {
        let rel = max_relative(&engine_grads(&model, &whole, ctx, policy, 1.0)?, &reference)?;
        assert!(rel <= 1e-12, "{policy:?}: relative difference {rel:e}");
    }
    let eval = plain_grads(&model, &whole, SegmentContext::eval())?;
    assert!(max_relative(&eval, &reference)? > 1e-3, "dropout changed nothing");
    // The merged reference has no dropout: it refuses a training step that needs one.
    model.set_merged_reference(true);
    let err = plain_grads(&model, &whole, ctx).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("no dropout"), "{err}");
    Ok(())
}

fn values(params: &candle_fit::train::Parameters) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    params
        .iter()
        .map(|p| Ok((p.name.clone(), p.tensor()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

fn corpus() -> anyhow::Result<Corpus> {
    let text = candle_fit::BUNDLED_CORPUS[..6000].to_vec();
    Ok(Corpus::from_bytes("austen.txt".as_ref(), text, 0.2)?)
}

fn trainer(steps: usize, lr: f64) -> anyhow::Result<Trainer> {
    Ok(Trainer::new(
        TrainerConfig::builder()
            .micro_batch(2)
            .accumulation_steps(2)
            .seq_len(12)
            .steps(steps)
            .eval_windows(4)
            .recompute(Recompute::All)
            .lr(lr)
            .build()?,
    ))
}

/// Through `Trainer::fit` with AdamW: the validation loss falls, the base is bit-for-bit
/// unchanged, and the updater holds gradients and moments for the adapters alone.
#[test]
fn training_moves_only_the_adapters() -> anyhow::Result<()> {
    let config = LlamaConfig { vocab_size: 256, hidden_size: 16, intermediate_size: 32, ..tiny_llama() };
    let base = Llama::new(&config, DType::F32, &Device::Cpu, 1)?;
    let base_before = values(base.parameters())?;
    // A random base: its head (N(0, 0.02²) behind a norm) barely moves the logits unless adapted.
    let targets = ["all-linear", "lm_head"];
    let model = LoraModel::new(base, LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::new(targets) }, 3)?;
    assert_eq!(model.adapted_layers().len(), 7 * 3 + 1);
    let adapters_before = values(model.adapter_parameters())?;
    let optimizer = OptimizerConfig::AdamW(AdamWConfig::default());
    let mut updater = LocalUpdater::from_config(TrainableModel::parameters(&model), &optimizer)?;
    let report = trainer(40, 1e-2)?.fit(&model, &corpus()?, &mut updater)?;
    assert!(
        report.final_val_loss < report.initial_val_loss - 1.0,
        "validation loss {} -> {}",
        report.initial_val_loss,
        report.final_val_loss
    );
    assert_eq!(values(model.inner().parameters())?, base_before, "the frozen base changed");
    assert_ne!(values(model.adapter_parameters())?, adapters_before);
    let adapter_elements = model.adapter_parameters().num_elements();
    assert!(adapter_elements < model.inner().parameters().num_elements());
    let state = updater.state_bytes();
    assert_eq!(state.optimizer_state, 2 * 4 * adapter_elements, "{state:?}");
    assert_eq!(state.master_weights, 0, "{state:?}");
    assert!(state.gradients <= 4 * adapter_elements, "{state:?}");

    // BF16: the master copy is the adapters' only, and training still works.
    let base = Llama::new(&config, DType::BF16, &Device::Cpu, 1)?;
    let base_before = values(base.parameters())?;
    let model = LoraModel::new(base, LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::new(targets) }, 3)?;
    let mut updater = LocalUpdater::from_config(TrainableModel::parameters(&model), &optimizer)?;
    assert_eq!(updater.state_bytes().master_weights, 4 * model.adapter_parameters().num_elements());
    let report = trainer(40, 1e-2)?.fit(&model, &corpus()?, &mut updater)?;
    assert!(report.final_val_loss < report.initial_val_loss - 1.0, "BF16: {report:?}");
    assert_eq!(values(model.inner().parameters())?, base_before, "the frozen BF16 base changed");
    Ok(())
}

/// GPT's head is its tied, frozen embedding (N(0, 0.02²) behind a norm): adapters on the blocks
/// alone can move the logits only so far, and the loss falls by a little but surely.
#[test]
fn gpt_trains_through_the_trainer() -> anyhow::Result<()> {
    let config = GptConfig { vocab_size: 256, n_embd: 32, ..tiny_gpt(0.0) };
    let base = Gpt::new(config, DType::F32, &Device::Cpu, 1)?;
    let model = LoraModel::new(base, LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::new(GPT_TARGETS) }, 3)?;
    let optimizer = OptimizerConfig::AdamW(AdamWConfig::default());
    let mut updater = LocalUpdater::from_config(TrainableModel::parameters(&model), &optimizer)?;
    let report = trainer(40, 1e-2)?.fit(&model, &corpus()?, &mut updater)?;
    assert!(
        report.final_val_loss < report.initial_val_loss - 0.1,
        "validation loss {} -> {}",
        report.initial_val_loss,
        report.final_val_loss
    );
    Ok(())
}

/// ZeRO stages 0-3 on two in-process ranks (the adapters partitioned, the frozen base whole on
/// each) end where one rank does (within 1e-6 of the values), LoRA dropout active: each rank
/// draws its rows of the one-rank masks.
#[test]
fn zero_on_two_ranks_equals_one_rank() -> anyhow::Result<()> {
    let config = GptConfig { vocab_size: 256, ..tiny_gpt(0.0) };
    let make = |_rank: usize| -> candle_fit::train::Result<LoraModel<Gpt>> {
        LoraModel::new(Gpt::new(config, DType::F32, &Device::Cpu, 1)?, lora(&GPT_TARGETS, 0.2), 3)
    };
    // SGD: the update is linear in the gradient, so the ranks' other summation order stays at
    // the level of rounding (AdamW divides tiny early gradients by their own square root).
    let optimizer = OptimizerConfig::Sgd(SgdConfig::default());
    let data = corpus()?;
    let initial = values(make(0)?.adapter_parameters())?;
    let single = {
        let model = make(0)?;
        let mut updater = LocalUpdater::from_config(TrainableModel::parameters(&model), &optimizer)?;
        trainer(2, 1e-1)?.fit(&model, &data, &mut updater)?;
        values(model.adapter_parameters())?
    };
    for stage in [ZeroStage::Stage0, ZeroStage::Stage1, ZeroStage::Stage2, ZeroStage::Stage3] {
        let config = InProcessConfig {
            world_size: NonZeroUsize::new(2).ok_or_else(|| anyhow::anyhow!("zero ranks"))?,
            stage,
            timeout: Duration::from_secs(60),
        };
        let runs = fit_in_process(&config, &trainer(2, 1e-1)?, &data, &optimizer, make)?;
        let ranked = values(runs[0].model.adapter_parameters())?;
        for (((name, one), (_, many)), (_, start)) in single.iter().zip(&ranked).zip(&initial) {
            let step = one.iter().zip(start).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let diff = one.iter().zip(many).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let magnitude = one.iter().fold(step, |m, v| m.max(v.abs()));
            // F32: the ranks sum the gradients in another order (a few ulps of the values).
            assert!(diff <= 1e-6 * magnitude, "{stage:?}: `{name}` differs by {diff:e} (update {step:e})");
        }
    }
    Ok(())
}

fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("candle-fit-lora-{name}-{}", std::process::id()))
}

/// Saved in PEFT's layout (names, config fields), loaded into a fresh base: the same logits;
/// merged into the base: the same logits from plain weights.
#[test]
fn peft_files_round_trip_and_merge() -> anyhow::Result<()> {
    let dir = temp_dir("round-trip");
    let config = lora(&["q_proj", "v_proj", "down_proj"], 0.05);
    let model = LoraModel::new(Llama::new(&tiny_llama(), DType::F64, &Device::Cpu, 1)?, config.clone(), 2)?;
    randomize_b(&model)?;
    model.save_peft(&dir, &PeftInfo::default())?;

    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE))?)?;
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 2);
    assert_eq!(json["lora_alpha"], 6.0);
    assert_eq!(json["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));
    assert_eq!(json["bias"], "none");
    assert_eq!(json["fan_in_fan_out"], false);
    assert_eq!(json["task_type"], "CAUSAL_LM");
    let weights = candle::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu)?;
    assert_eq!(weights.len(), 3 * 3 * 2);
    let a = &weights["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"];
    assert_eq!(a.dims(), [2, 24]);
    assert_eq!(weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].dims(), [16, 2]);

    let ids =
        Tensor::from_vec((0..12u32).map(|i| (i * 5 + 2) % 23).collect::<Vec<_>>(), (2, 6), &Device::Cpu)?;
    let expected = model.inner().logits(&ids)?;
    let plain = Llama::new(&tiny_llama(), DType::F64, &Device::Cpu, 1)?.logits(&ids)?;
    let close = |a: &Tensor, b: &Tensor| -> anyhow::Result<f64> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()?)
    };
    assert!(close(&expected, &plain)? > 1e-3, "the adapters change nothing");

    let (loaded, info) =
        LoraModel::from_peft(Llama::new(&tiny_llama(), DType::F64, &Device::Cpu, 1)?, &dir, "")?;
    assert_eq!(loaded.config(), &config);
    assert_eq!(info.task_type.as_deref(), Some("CAUSAL_LM"));
    assert!(close(&loaded.inner().logits(&ids)?, &expected)? == 0.0);

    let merged = loaded.merge()?;
    assert!(merged.parameters().iter().all(|p| !p.is_frozen()));
    assert!(close(&merged.logits(&ids)?, &expected)? < 1e-12);
    let saved = dir.join("merged");
    merged.save_pretrained(&saved)?;
    let reloaded = Llama::from_pretrained(&saved, DType::F64, &Device::Cpu)?;
    assert!(close(&reloaded.logits(&ids)?, &expected)? < 1e-12);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// GPT-2's Conv1D layout is written as `fan_in_fan_out`, under `transformer.`; merging writes
/// `(s B A)ᵀ` into the `[in, out]` weights.
#[test]
fn gpt_adapters_use_the_conv1d_layout() -> anyhow::Result<()> {
    let dir = temp_dir("gpt");
    let model =
        LoraModel::new(Gpt::new(tiny_gpt(0.0), DType::F64, &Device::Cpu, 1)?, lora(&["c_attn"], 0.0), 2)?;
    randomize_b(&model)?;
    let info = PeftInfo { module_prefix: "transformer.".into(), ..PeftInfo::default() };
    model.save_peft(&dir, &info)?;
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE))?)?;
    assert_eq!(json["fan_in_fan_out"], true);
    let weights = candle::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu)?;
    assert_eq!(weights["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"].dims(), [24, 2]);
    let ids = batch(2, 0)?.inputs;
    let expected = model.inner().logits(&ids)?;
    let merged = model.merge()?;
    let diff = (merged.logits(&ids)? - &expected)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(diff < 1e-12, "{diff:e}");
    // A model without the prefix finds none of the file's tensors.
    let fresh = Gpt::new(tiny_gpt(0.0), DType::F64, &Device::Cpu, 1)?;
    let err = LoraModel::from_peft(fresh, &dir, "").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("base_model.model.h.0.attn.c_attn.lora_A.weight"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Every field of a PEFT folder is checked, and the error names what is wrong.
#[test]
fn bad_adapter_files_are_refused_naming_the_field() -> anyhow::Result<()> {
    let dir = temp_dir("bad");
    let make = || Llama::new(&tiny_llama(), DType::F32, &Device::Cpu, 1);
    LoraModel::new(make()?, lora(&["q_proj"], 0.0), 2)?.save_peft(&dir, &PeftInfo::default())?;
    let good: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE))?)?;
    let cases: [(&str, serde_json::Value, &str); 9] = [
        ("peft_type", "PREFIX_TUNING".into(), "`peft_type` must be \"LORA\""),
        ("r", 0.into(), "`r` must be a positive integer"),
        ("lora_alpha", "16".into(), "`lora_alpha` must be a number"),
        ("target_modules", ".*q_proj".into(), "regular expression"),
        ("target_modules", serde_json::json!(["query"]), "`query` matches no linear module"),
        ("bias", "all".into(), "`bias` is \"all\""),
        ("use_dora", true.into(), "DoRA"),
        ("rank_pattern", serde_json::json!({"q_proj": 4}), "per-layer ranks"),
        ("lora_dropout", 1.5.into(), "lora dropout"),
    ];
    for (field, value, expected) in cases {
        let mut config = good.clone();
        config[field] = value;
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_vec(&config)?)?;
        let err = LoraModel::from_peft(make()?, &dir, "").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(expected), "{field}: {err}");
    }
    // Weights for other targets than the config says: the missing tensor is named.
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_vec(&good)?)?;
    LoraModel::new(make()?, lora(&["k_proj"], 0.0), 2)?.save_peft(&dir.join("k"), &PeftInfo::default())?;
    std::fs::copy(dir.join("k").join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE))?;
    let err = LoraModel::from_peft(make()?, &dir, "").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The frozen base takes no part in autograd: one backward through the logits computes a
/// gradient for every adapter and for no base parameter (not even one left unused), while the
/// base's input gradients still flow to the earliest adapters.
#[test]
fn the_base_receives_no_gradient() -> anyhow::Result<()> {
    let model = LoraModel::new(
        Llama::new(&tiny_llama(), DType::F64, &Device::Cpu, 1)?,
        lora(&LLAMA_TARGETS, 0.0),
        2,
    )?;
    randomize_b(&model)?;
    let grads = model.inner().logits(&batch(2, 0)?.inputs)?.sqr()?.sum_all()?.backward()?;
    for p in model.inner().parameters().iter() {
        assert!(grads.get_id(p.id()).is_none(), "`{}` received a gradient", p.name);
    }
    for p in model.adapter_parameters().iter() {
        let g = grads.get_id(p.id()).ok_or_else(|| anyhow::anyhow!("no gradient for `{}`", p.name))?;
        assert!(g.abs()?.max_all()?.to_scalar::<f64>()? > 0.0, "`{}` has a zero gradient", p.name);
    }
    // Tied heads (GPT's `wte`, a tied LLaMA's table) read the frozen table as a constant too.
    let gpt = LoraModel::new(Gpt::new(tiny_gpt(0.0), DType::F64, &Device::Cpu, 1)?, lora(&["c_fc"], 0.0), 2)?;
    let tied = LlamaConfig { tie_word_embeddings: true, ..tiny_llama() };
    let llama = LoraModel::new(Llama::new(&tied, DType::F64, &Device::Cpu, 1)?, lora(&["o_proj"], 0.0), 2)?;
    let ids = batch(2, 0)?.inputs;
    for (logits, params) in [
        (gpt.inner().logits(&ids)?, gpt.inner().parameters()),
        (llama.inner().logits(&ids)?, llama.inner().parameters()),
    ] {
        let grads = logits.sqr()?.sum_all()?.backward()?;
        // A constant's gradient would sit under the id of its detached copy: look for any
        // gradient shaped as a base matrix (no activation of these shapes has that shape).
        let shapes: Vec<Vec<usize>> =
            grads.get_ids().filter_map(|&id| grads.get_id(id)).map(|g| g.dims().to_vec()).collect();
        for p in params.iter().filter(|p| p.rank() == 2) {
            let (rows, cols) = (p.dims()[0], p.dims()[1]);
            assert!(
                !shapes.iter().any(|s| s == &[rows, cols] || s == &[cols, rows]),
                "a gradient shaped as `{}` was computed",
                p.name
            );
        }
    }
    Ok(())
}

/// An adapter PEFT wrote (scripts/reference/peft_lora.py: a seeded tiny LLaMA in transformers,
/// LoRA on q/v/down with random B) loads here onto the base transformers saved: logits and
/// every adapter gradient of the mean cross-entropy equal PyTorch's within 1e-5 (F32, relative
/// to the largest entry). Saved again here, the files load in PEFT's layout unchanged.
#[test]
fn a_peft_adapter_matches_pytorch() -> anyhow::Result<()> {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/peft_lora");
    let base = Llama::from_pretrained(&data.join("base"), DType::F32, &Device::Cpu)?;
    let (model, info) = LoraModel::from_peft(base, &data.join("adapter"), "")?;
    assert_eq!(model.config().rank, 4);
    assert_eq!(model.adapted_layers().len(), 3 * 2);
    assert_eq!(info.task_type.as_deref(), Some("CAUSAL_LM"));
    let golden = candle::safetensors::load(data.join("golden.safetensors"), &Device::Cpu)?;
    let ids = golden["ids"].to_dtype(DType::U32)?;
    let batch = TokenBatch { inputs: ids.clone(), targets: golden["targets"].to_dtype(DType::U32)? };
    let relative = |got: &Tensor, want: &Tensor| -> anyhow::Result<f64> {
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        Ok((got - want)?.abs()?.max_all()?.to_scalar::<f32>()? as f64 / scale)
    };
    let rel = relative(&model.inner().logits(&ids)?, &golden["logits"])?;
    assert!(rel <= 1e-5, "logits differ by {rel:e}");
    let grads = plain_grads(&model, &batch, SegmentContext::eval())?;
    let engine = engine_grads(&model, &batch, SegmentContext::eval(), Recompute::All, 1.0)?;
    assert_eq!(grads.len(), golden.len() - 3);
    for (name, g) in &grads {
        let want = &golden[&format!("grad.base_model.model.{name}")];
        let rel = relative(g, want)?;
        assert!(rel <= 1e-5, "`{name}`: gradient differs by {rel:e}");
        let rel = relative(&engine[name], want)?;
        assert!(rel <= 1e-5, "`{name}` (recomputed): gradient differs by {rel:e}");
    }
    // Written back, the tensors are PEFT's, bit for bit.
    let dir = temp_dir("peft");
    model.save_peft(&dir, &info)?;
    let ours = candle::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu)?;
    let theirs = candle::safetensors::load(data.join("adapter").join(WEIGHTS_FILE), &Device::Cpu)?;
    assert_eq!(ours.len(), theirs.len());
    for (name, t) in &theirs {
        assert_eq!(ours[name].flatten_all()?.to_vec1::<f32>()?, t.flatten_all()?.to_vec1::<f32>()?, "{name}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Checkpoints hold the adapters only; a run resumed from step 4 (a fresh base and fresh
/// adapters, LoRA dropout active) ends bit-identical to the uninterrupted run, and a model
/// whose LoRA settings differ is refused.
#[test]
fn checkpoints_hold_the_adapters_and_resume_bit_identical() -> anyhow::Result<()> {
    let dir = temp_dir("resume");
    let _ = std::fs::remove_dir_all(&dir);
    let config = GptConfig { vocab_size: 256, ..tiny_gpt(0.1) };
    let make = |lora_config: LoraConfig, seed: u64| -> candle_fit::train::Result<LoraModel<Gpt>> {
        LoraModel::new(Gpt::new(config, DType::F32, &Device::Cpu, 1)?, lora_config, seed)
    };
    let settings = lora(&GPT_TARGETS, 0.2);
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(2)
            .accumulation_steps(2)
            .seq_len(12)
            .steps(8)
            .eval_windows(4)
            .recompute(Recompute::EveryK(2))
            .lr(1e-2)
            .checkpoint(&dir, 4, 2)
            .build()?,
    );
    let optimizer = OptimizerConfig::AdamW(AdamWConfig::default());
    let data = corpus()?;
    let model = make(settings.clone(), 3)?;
    let mut updater = LocalUpdater::from_config(TrainableModel::parameters(&model), &optimizer)?;
    let report = trainer.fit(&model, &data, &mut updater)?;
    let saved = candle::safetensors::load(dir.join("step-00000004").join("model.safetensors"), &Device::Cpu)?;
    let mut names: Vec<&String> = saved.keys().collect();
    names.sort();
    let mut expected: Vec<&String> = model.adapter_parameters().iter().map(|p| &p.name).collect();
    expected.sort();
    assert_eq!(names, expected, "the checkpoint holds exactly the adapters");

    let resumed = make(settings.clone(), 77)?;
    let mut resumed_updater = LocalUpdater::from_config(TrainableModel::parameters(&resumed), &optimizer)?;
    let again = trainer.resume(&resumed, &data, &mut resumed_updater, &dir.join("step-00000004"))?;
    assert_eq!(again.start_step, 4);
    assert_eq!(values(resumed.adapter_parameters())?, values(model.adapter_parameters())?);
    let losses =
        |r: &candle_fit::train::TrainReport| r.history.iter().map(|h| h.loss.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&report)[4..], losses(&again)[..]);

    let other = make(LoraConfig { alpha: 2.0, ..settings }, 3)?;
    let mut other_updater = LocalUpdater::from_config(TrainableModel::parameters(&other), &optimizer)?;
    let err = trainer.resume(&other, &data, &mut other_updater, &dir.join("step-00000004")).err();
    let err = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("alpha"), "a model with other LoRA settings resumed: {err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `unload` detaches the adapters and unfreezes the base, unchanged: its logits are the plain
/// model's again and it takes new adapters.
#[test]
fn unload_gives_the_base_back_unchanged() -> anyhow::Result<()> {
    let ids = batch(2, 0)?.inputs;
    let plain = Llama::new(&tiny_llama(), DType::F64, &Device::Cpu, 1)?.logits(&ids)?;
    let model = LoraModel::new(
        Llama::new(&tiny_llama(), DType::F64, &Device::Cpu, 1)?,
        lora(&["all-linear"], 0.0),
        2,
    )?;
    randomize_b(&model)?;
    let adapted = model.inner().logits(&ids)?;
    assert!((&adapted - &plain)?.abs()?.max_all()?.to_scalar::<f64>()? > 1e-3);
    let base = model.unload()?;
    assert!(base.parameters().iter().all(|p| !p.is_frozen()));
    assert_eq!((base.logits(&ids)? - &plain)?.abs()?.max_all()?.to_scalar::<f64>()?, 0.0);
    let again = LoraModel::new(base, lora(&["q_proj"], 0.0), 2)?;
    assert_eq!(again.adapted_layers().len(), 3);
    Ok(())
}

/// Our adapter for PEFT: a seeded tiny LLaMA saved as a Hugging Face folder, LoRA on q/v/down
/// (random B) saved as PEFT's files, and the ids and our logits beside them;
/// `scripts/reference/peft_load_ours.py DIR` loads the folder with transformers + PEFT and
/// compares. With `CANDLE_FIT_PEFT_OURS=DIR` the files stay in DIR for that script; here they
/// are read back by our own loader, which must give the same logits.
#[test]
fn our_adapter_files_for_peft() -> anyhow::Result<()> {
    let keep = std::env::var_os("CANDLE_FIT_PEFT_OURS").map(PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| temp_dir("peft-ours"));
    let base = Llama::new(&LlamaConfig::tiny(), DType::F32, &Device::Cpu, 11)?;
    base.save_pretrained(&dir.join("base"))?;
    let config = LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::new(["q_proj", "v_proj", "down_proj"]) };
    let model = LoraModel::new(base, config, 12)?;
    randomize_b(&model)?;
    model.save_peft(&dir.join("adapter"), &PeftInfo::default())?;
    let ids = batch(2, 0)?.inputs;
    let logits = model.inner().logits(&ids)?;
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("ids".to_string(), ids.to_dtype(DType::I64)?);
    tensors.insert("logits".to_string(), logits.clone());
    candle::safetensors::save(&tensors, dir.join("ours.safetensors"))?;
    let reloaded = Llama::from_pretrained(&dir.join("base"), DType::F32, &Device::Cpu)?;
    let (again, _) = LoraModel::from_peft(reloaded, &dir.join("adapter"), "")?;
    let diff = (again.inner().logits(&ids)? - &logits)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(diff, 0.0, "our own reload differs by {diff}");
    if keep.is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// The Trainer's builder switch: `TrainerBuilder::lora` + `Trainer::adapt` give the same run as
/// wrapping the model by hand (same adapters drawn from the run's seed, bit-identical values
/// after training), QLoRA's `quantize_base` included; a run refuses a model without the
/// configured adapters or with others, before any step.
#[test]
fn the_trainer_builder_carries_lora() -> anyhow::Result<()> {
    use candle_fit::train::quant::BaseQuantization;
    let config = LlamaConfig { vocab_size: 256, hidden_size: 32, intermediate_size: 64, ..tiny_llama() };
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        quantize_base: Some(BaseQuantization::Q8_0),
        ..LoraConfig::new(["all-linear"])
    };
    let build = |lora: Option<LoraConfig>| -> anyhow::Result<Trainer> {
        Ok(Trainer::new(
            TrainerConfig::builder()
                .micro_batch(2)
                .seq_len(12)
                .steps(3)
                .eval_windows(2)
                .seed(5)
                .lr(1e-2)
                .lora(lora)
                .build()?,
        ))
    };
    let optimizer = OptimizerConfig::AdamW(AdamWConfig::default());
    let base = || -> anyhow::Result<Llama> {
        Ok(Llama::new(&config, DType::F32, &Device::Cpu, 1)?.quantize_base(BaseQuantization::Q8_0)?)
    };
    let trainer = build(Some(lora.clone()))?;
    let adapted = trainer.adapt(base()?)?;
    let initial = values(adapted.adapter_parameters())?;
    let mut updater = LocalUpdater::from_config(TrainableModel::parameters(&adapted), &optimizer)?;
    trainer.fit(&adapted, &corpus()?, &mut updater)?;
    let by_hand = LoraModel::new(base()?, lora.clone(), 5)?;
    let mut updater = LocalUpdater::from_config(TrainableModel::parameters(&by_hand), &optimizer)?;
    build(None)?.fit(&by_hand, &corpus()?, &mut updater)?;
    assert_ne!(values(adapted.adapter_parameters())?, initial, "the run did not train the adapters");
    assert_eq!(values(adapted.adapter_parameters())?, values(by_hand.adapter_parameters())?);

    // Forgetting `adapt` would train every parameter: refused, naming the setting.
    let plain = Llama::new(&config, DType::F32, &Device::Cpu, 1)?;
    let mut updater = LocalUpdater::from_config(plain.parameters(), &optimizer)?;
    let before = values(plain.parameters())?;
    let err = trainer.fit(&plain, &corpus()?, &mut updater).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("lora") && err.contains("Trainer::adapt"), "{err}");
    assert_eq!(values(plain.parameters())?, before, "a refused run changed the model");
    // Other adapters than the configured ones: refused.
    let other = LoraModel::new(base()?, LoraConfig { rank: 2, ..lora.clone() }, 5)?;
    let mut updater = LocalUpdater::from_config(TrainableModel::parameters(&other), &optimizer)?;
    let err = trainer.fit(&other, &corpus()?, &mut updater).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("rank 2") && err.contains("rank 4"), "{err}");
    // `adapt` without LoRA settings, and invalid settings at build time.
    let err = build(None)?.adapt(base()?).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("without LoRA settings"), "{err}");
    assert!(build(Some(LoraConfig { rank: 0, ..lora })).is_err());
    Ok(())
}
