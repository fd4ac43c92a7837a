//! The trainable LLaMA-family decoder: forward equivalence with candle-transformers'
//! `quantized_llama` on SmolLM2-135M's weights, gradients against finite differences, recompute
//! and accumulation equivalence, save/reload under Hugging Face names, the GGUF tokenizer, and
//! clear errors for bad input.
//!
//! Tests that need the model package skip, printing the pip line that installs it.

use std::collections::{BTreeSet, HashMap};
use std::io::Cursor;

use candle::quantized::{gguf_file, GgmlDType, QTensor};
use candle::{DType, Device, IndexOp, Tensor, Var};
use candle_fit::ckpt::{
    forward_backward, plain_forward_backward, segment_infos, Decision, Recompute, RecomputePolicy, Rng,
    SegmentContext, SegmentedModel,
};
use candle_fit::pretrained::SmolLm2Files;
use candle_fit::train::layers::cross_entropy;
use candle_fit::train::models::{Llama, LlamaConfig, TokenBatch};
use candle_fit::train::{
    AdamWConfig, Corpus, LocalUpdater, OptimizerConfig, Trainer, TrainerConfig, Updater,
};

fn files() -> Option<SmolLm2Files> {
    match SmolLm2Files::locate() {
        Ok(files) => Some(files),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

const AUSTEN: &str = "It is a truth universally acknowledged, that a single man in possession \
of a good fortune, must be in want of a wife.";

/// `max |a - b| / max |b|`, in F64.
fn relative_error(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let diff = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / scale)
}

fn ids(values: &[u32]) -> anyhow::Result<Tensor> {
    Ok(Tensor::new(values, &Device::Cpu)?.unsqueeze(0)?)
}

/// The reference: candle-transformers' `quantized_llama::ModelWeights` (llama.cpp's layout,
/// interleaved rotary, Candle's fused ops) built from a GGUF file written in memory whose
/// tensors are the package's tensors dequantized to F32. On quantized tensors its matmuls
/// would quantize the activations to 8 bits (llama.cpp's Q8_1 dot products), which no
/// trainable F32 model reproduces; on F32 tensors they are plain F32 matmuls over exactly the
/// weights our model trains, so the two forwards must agree to F32 rounding. Its `forward`
/// returns the last position's logits, so each prefix is run on its own.
fn reference_logits(files: &SmolLm2Files, tokens: &[u32]) -> anyhow::Result<Vec<Tensor>> {
    let mut file = std::fs::File::open(&files.gguf)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let dequantized = content.tensor(&mut file, name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
        tensors.push((name.as_str(), QTensor::quantize(&dequantized, GgmlDType::F32)?));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut buffer = Cursor::new(Vec::new());
    gguf_file::write(&mut buffer, &metadata, &tensor_refs)?;
    drop(tensor_refs);
    drop(tensors);
    buffer.set_position(0);
    let f32_content = gguf_file::Content::read(&mut buffer)?;
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        f32_content,
        &mut buffer,
        &Device::Cpu,
    )?;
    drop(buffer);
    let mut out = Vec::with_capacity(tokens.len());
    for t in 1..=tokens.len() {
        out.push(reference.forward(&ids(&tokens[..t])?, 0)?.squeeze(0)?);
    }
    Ok(out)
}

/// Tolerance: for every position of a 12-token sentence, the largest element-wise difference
/// of the logits is at most 1e-5 of their largest magnitude, in F32.
#[test]
fn smollm2_logits_match_candle_transformers_quantized_llama_on_the_same_f32_weights() -> anyhow::Result<()> {
    let Some(files) = files() else { return Ok(()) };
    let tokenizer = files.tokenizer()?;
    let mut tokens = tokenizer.encode(AUSTEN)?;
    tokens.truncate(12);
    let model = files.model(DType::F32, &Device::Cpu)?;
    let ours = model.logits(&ids(&tokens)?)?.squeeze(0)?;
    drop(model);
    let expected = reference_logits(&files, &tokens)?;
    let mut worst = 0f64;
    for (t, reference) in expected.iter().enumerate() {
        let error = relative_error(&ours.i(t)?, reference)?;
        assert!(error <= 1e-5, "position {t}: relative error {error:e} exceeds 1e-5");
        worst = worst.max(error);
    }
    eprintln!("largest relative error over {} positions: {worst:e}", tokens.len());
    Ok(())
}

#[test]
fn smollm2_config_comes_from_the_gguf_metadata() -> anyhow::Result<()> {
    let Some(files) = files() else { return Ok(()) };
    let config = files.open()?.llama_config()?;
    let expected = LlamaConfig::smollm2_135m();
    // The file stores epsilon as an F32 (1e-5 rounded).
    assert!((config.rms_norm_eps - expected.rms_norm_eps).abs() < 1e-12);
    assert_eq!(LlamaConfig { rms_norm_eps: expected.rms_norm_eps, ..config.clone() }, expected);
    assert_eq!(config.num_parameters(), 134_515_008);
    Ok(())
}

/// The pretrained model predicts English: SmolLM2-135M gives 2.77 nats per token on this
/// sentence; without the query/key permutation back to the half-split rotary layout it gives
/// 7.9, and a wrong tokenizer or head gives more (uniform: ln(49152) = 10.8).
#[test]
fn smollm2_predicts_austen_well_in_f32_and_bf16() -> anyhow::Result<()> {
    let Some(files) = files() else { return Ok(()) };
    let tokens = files.tokenizer()?.encode(AUSTEN)?;
    let n = tokens.len() - 1;
    let batch = TokenBatch { inputs: ids(&tokens[..n])?, targets: ids(&tokens[1..])? };
    let f32_loss = files.model(DType::F32, &Device::Cpu)?.loss(&batch)?.to_scalar::<f32>()?;
    let bf16_loss = files.model(DType::BF16, &Device::Cpu)?.loss(&batch)?.to_scalar::<f32>()?;
    eprintln!("loss per token: F32 {f32_loss}, BF16 {bf16_loss}");
    assert!(f32_loss < 4.0, "F32 loss {f32_loss} nats per token");
    assert!((bf16_loss - f32_loss).abs() < 0.1, "BF16 loss {bf16_loss} against F32 {f32_loss}");
    Ok(())
}

#[test]
fn gguf_tokenizer_splits_digits_round_trips_and_knows_its_control_tokens() -> anyhow::Result<()> {
    let Some(files) = files() else { return Ok(()) };
    let tokenizer = files.tokenizer()?;
    assert_eq!(tokenizer.vocab_size(), 49_152);
    let ids = tokenizer.encode("Hello world 2024!")?;
    let tokens: Vec<String> = ids.iter().filter_map(|&id| tokenizer.token(id)).collect();
    // GPT-2 byte-level BPE (a leading space is `Ġ`), each digit on its own (llama.cpp's
    // `smollm` pre-tokenizer).
    assert_eq!(tokens, ["Hello", "Ġworld", "Ġ", "2", "0", "2", "4", "!"]);
    assert_eq!(tokenizer.encode("<|im_start|>user")?.first(), Some(&1));
    assert_eq!(tokenizer.eos_id(), Some(2));
    let text = std::str::from_utf8(candle_fit::BUNDLED_CORPUS)?.chars().take(3000).collect::<String>();
    assert_eq!(tokenizer.decode(&tokenizer.encode(&text)?)?, text);
    Ok(())
}

fn tiny(tied: bool) -> LlamaConfig {
    LlamaConfig { tie_word_embeddings: tied, ..LlamaConfig::tiny() }
}

fn tiny_batch(vocab: u32, batch: usize, t: usize, seed: u64) -> anyhow::Result<TokenBatch> {
    let mut rng = Rng::seeded(seed);
    let tokens: Vec<u32> = (0..batch * (t + 1)).map(|_| (rng.next_u64() % u64::from(vocab)) as u32).collect();
    let all = Tensor::from_vec(tokens, (batch, t + 1), &Device::Cpu)?;
    Ok(TokenBatch { inputs: all.narrow(1, 0, t)?, targets: all.narrow(1, 1, t)? })
}

/// A random model whose norm weights are not all 1 and biases not all 0 (so their gradients
/// are exercised too).
fn random_model(config: &LlamaConfig, dtype: DType, seed: u64) -> anyhow::Result<Llama> {
    let model = Llama::new(config, dtype, &Device::Cpu, seed)?;
    let mut rng = Rng::seeded(seed + 1);
    for p in
        model.parameters().iter().filter(|p| p.name.ends_with("norm.weight") || p.name.ends_with(".bias"))
    {
        let base = if p.name.ends_with(".bias") { 0.0 } else { 1.0 };
        let values: Vec<f64> = (0..p.elem_count()).map(|_| base + 0.3 * rng.normal_f64()).collect();
        p.var()?.set(&Tensor::from_vec(values, p.shape(), &Device::Cpu)?.to_dtype(dtype)?)?;
    }
    Ok(model)
}

fn whole_loss(model: &Llama, batch: &TokenBatch) -> candle::Result<Tensor> {
    let logits = model.logits(&batch.inputs)?;
    let (b, t, v) = logits.dims3()?;
    cross_entropy(&logits.reshape((b * t, v))?, &batch.targets.flatten_all()?)
}

fn set_element(var: &Var, index: usize, value: f64) -> candle::Result<()> {
    let mut values = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    values[index] = value;
    var.set(&Tensor::from_vec(values, var.shape(), var.device())?)
}

/// Central differences in F64 (h = 1e-6) on 5 elements of every parameter must match the
/// analytic gradient within 1e-6 (1 + |numeric|), for a tied and an untied head, and for the
/// family's variants: Qwen2's q/k/v biases, Qwen3's per-head q/k norms with biases on all four
/// projections and a head dimension (6) that is not width / heads.
#[test]
fn tiny_llama_gradients_match_finite_differences() -> anyhow::Result<()> {
    use candle_fit::train::models::DecoderFamily;
    let qwen2 = LlamaConfig { model_type: DecoderFamily::Qwen2, ..tiny(false) };
    let qwen3 = LlamaConfig {
        model_type: DecoderFamily::Qwen3,
        attention_bias: Some(true),
        head_dim: Some(6),
        ..tiny(true)
    };
    for config in [tiny(false), tiny(true), qwen2, qwen3] {
        let model = random_model(&config, DType::F64, 3)?;
        let batch = tiny_batch(23, 2, 7, 4)?;
        let grads = whole_loss(&model, &batch)?.backward()?;
        for p in model.parameters().iter() {
            let analytic = grads
                .get_id(p.id())
                .ok_or_else(|| anyhow::anyhow!("`{}` received no gradient", p.name))?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let values = p.tensor()?.flatten_all()?.to_vec1::<f64>()?;
            let h = 1e-6;
            for i in (0..values.len()).step_by((values.len() / 5).max(1)) {
                set_element(p.var()?, i, values[i] + h)?;
                let plus = whole_loss(&model, &batch)?.to_scalar::<f64>()?;
                set_element(p.var()?, i, values[i] - h)?;
                let minus = whole_loss(&model, &batch)?.to_scalar::<f64>()?;
                set_element(p.var()?, i, values[i])?;
                let numeric = (plus - minus) / (2.0 * h);
                let error = (analytic[i] - numeric).abs();
                assert!(
                    error <= 1e-6 * (1.0 + numeric.abs()),
                    "{:?} tied={} d/d{}[{i}]: analytic {} vs numeric {numeric}",
                    config.model_type,
                    config.tie_word_embeddings,
                    p.name,
                    analytic[i]
                );
            }
        }
    }
    Ok(())
}

fn engine_gradients(
    model: &Llama,
    batches: &[TokenBatch],
    decisions: &[Decision],
) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (micro, batch) in batches.iter().enumerate() {
        let ctx = SegmentContext::train(1, 0, micro as u64);
        forward_backward(model, batch, ctx, decisions, 1.0 / batches.len() as f64, |g| {
            for p in g.gradients {
                let sum = match out.remove(&p.name) {
                    Some(prev) => (prev + &p.grad)?,
                    None => p.grad,
                };
                out.insert(p.name, sum);
            }
            Ok(())
        })?;
    }
    Ok(out)
}

fn max_relative_difference(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> anyhow::Result<f64> {
    assert_eq!(a.keys().collect::<BTreeSet<_>>(), b.keys().collect::<BTreeSet<_>>());
    let mut worst = 0f64;
    for (name, reference) in b {
        worst = worst.max(relative_error(&a[name], reference)?);
    }
    Ok(worst)
}

/// The segmented backward gives the gradients of one plain backward over the whole graph,
/// every built-in recompute policy gives those of no recompute, and two accumulated
/// micro-batches of 2 give those of one batch of 4 (F64: 1e-12 relative, F32: 1e-6).
#[test]
fn recompute_and_accumulation_give_the_gradients_of_one_plain_pass() -> anyhow::Result<()> {
    for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
        let config = LlamaConfig { num_hidden_layers: 4, ..tiny(true) };
        let model = random_model(&config, dtype, 5)?;
        let batch = tiny_batch(23, 4, 9, 6)?;
        let infos = segment_infos(&model);
        let keep = vec![Decision::Keep; model.num_segments()];
        let reference = engine_gradients(&model, std::slice::from_ref(&batch), &keep)?;
        assert_eq!(reference.len(), model.parameters().len(), "every parameter has a gradient");
        // The segmented backward equals one backward over the whole graph.
        let mut plain = HashMap::new();
        plain_forward_backward(&model, &batch, SegmentContext::train(1, 0, 0), 1.0, |g| {
            plain.extend(g.gradients.into_iter().map(|p| (p.name, p.grad)));
            Ok(())
        })?;
        let error = max_relative_difference(&reference, &plain)?;
        assert!(error <= tolerance, "{dtype:?} segmented vs plain: {error:e}");
        let mut decision_sets = Vec::new();
        for policy in [Recompute::All, Recompute::EveryK(2), Recompute::Sqrt] {
            decision_sets.push(policy.decide(&infos)?);
        }
        // The embedding and the head recomputed too.
        decision_sets.push(vec![Decision::Recompute; model.num_segments()]);
        for decisions in decision_sets {
            assert!(decisions.contains(&Decision::Recompute));
            let got = engine_gradients(&model, std::slice::from_ref(&batch), &decisions)?;
            let error = max_relative_difference(&got, &reference)?;
            assert!(error <= tolerance, "{dtype:?} {decisions:?}: {error:e}");
        }
        let halves = [
            TokenBatch { inputs: batch.inputs.narrow(0, 0, 2)?, targets: batch.targets.narrow(0, 0, 2)? },
            TokenBatch { inputs: batch.inputs.narrow(0, 2, 2)?, targets: batch.targets.narrow(0, 2, 2)? },
        ];
        let accumulated = engine_gradients(&model, &halves, &Recompute::All.decide(&infos)?)?;
        let error = max_relative_difference(&accumulated, &reference)?;
        assert!(error <= tolerance, "{dtype:?} accumulation: {error:e}");
    }
    Ok(())
}

/// BF16 parameters with an F32 residual stream: the loss and gradients follow F32 within
/// BF16's precision (2e-2 relative on the loss, every gradient finite and non-zero).
#[test]
fn bf16_model_follows_f32() -> anyhow::Result<()> {
    let config = tiny(true);
    let f32_model = random_model(&config, DType::F32, 7)?;
    let tensors = f32_model
        .parameters()
        .iter()
        .map(|p| Ok((p.name.clone(), p.tensor()?)))
        .collect::<candle::Result<_>>()?;
    let bf16_model = Llama::from_tensors(&config, tensors, DType::BF16, &Device::Cpu)?;
    assert_eq!(bf16_model.residual_dtype(), DType::F32);
    let batch = tiny_batch(23, 2, 8, 8)?;
    let keep = vec![Decision::Keep; f32_model.num_segments()];
    let a = f32_model.loss(&batch)?.to_scalar::<f32>()?;
    let b = bf16_model.loss(&batch)?.to_scalar::<f32>()?;
    assert!((a - b).abs() <= 2e-2 * a, "F32 loss {a}, BF16 loss {b}");
    let grads = engine_gradients(&bf16_model, std::slice::from_ref(&batch), &keep)?;
    for (name, g) in &grads {
        assert_eq!(g.dtype(), DType::BF16);
        let norm = g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(norm.is_finite() && norm > 0.0, "{name}: {norm}");
    }
    Ok(())
}

#[test]
fn saved_model_keeps_hugging_face_names_and_reloads_to_identical_logits() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("candle-fit-llama-{}", std::process::id()));
    for tied in [true, false] {
        let model = random_model(&tiny(tied), DType::F32, 9)?;
        model.save_pretrained(&dir)?;
        let saved: BTreeSet<String> =
            candle::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?.into_keys().collect();
        assert!(saved.contains("model.embed_tokens.weight"));
        assert!(saved.contains("model.layers.1.self_attn.k_proj.weight"));
        assert!(saved.contains("model.layers.0.mlp.gate_proj.weight"));
        assert!(saved.contains("model.norm.weight"));
        assert_eq!(
            saved.contains("lm_head.weight"),
            !tied,
            "a tied head is saved once, as transformers does"
        );
        assert_eq!(saved.len(), model.parameters().len());
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        assert_eq!(config["model_type"], "llama");
        assert_eq!(config["num_key_value_heads"], 2);

        let reloaded = Llama::from_pretrained(&dir, DType::F32, &Device::Cpu)?;
        let inputs = tiny_batch(23, 2, 6, 10)?.inputs;
        let (a, b) = (model.logits(&inputs)?, reloaded.logits(&inputs)?);
        assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A tiny LLaMA over byte tokens trains through the Trainer (it is a `LanguageModel`), with
/// recomputation of every block and two accumulated micro-batches.
#[test]
fn tiny_llama_trains_through_the_trainer() -> anyhow::Result<()> {
    let config =
        LlamaConfig { vocab_size: 256, hidden_size: 32, intermediate_size: 48, ..LlamaConfig::tiny() };
    let model = Llama::new(&config, DType::F32, &Device::Cpu, 1)?;
    let text = AUSTEN.repeat(30);
    let corpus = Corpus::from_bytes("austen.txt".as_ref(), text.into_bytes(), 0.2)?;
    let optimizer = OptimizerConfig::AdamW(AdamWConfig::default());
    let mut updater = LocalUpdater::from_config(model.parameters(), &optimizer)?;
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(2)
            .accumulation_steps(2)
            .seq_len(16)
            .steps(25)
            .eval_windows(4)
            .recompute(Recompute::All)
            .lr(1e-2)
            .build()?,
    );
    let report = trainer.fit(&model, &corpus, &mut updater)?;
    assert!(
        report.final_val_loss < report.initial_val_loss - 0.5,
        "validation loss {} -> {}",
        report.initial_val_loss,
        report.final_val_loss
    );
    assert_eq!(updater.world_size(), 1);
    Ok(())
}

#[test]
fn bad_configs_and_inputs_fail_with_clear_errors() -> anyhow::Result<()> {
    let bad = LlamaConfig { num_key_value_heads: 3, ..LlamaConfig::tiny() };
    let err = Llama::new(&bad, DType::F32, &Device::Cpu, 0).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("num_key_value_heads"), "{err}");
    let bad = LlamaConfig { hidden_act: "gelu".into(), ..LlamaConfig::tiny() };
    assert!(Llama::new(&bad, DType::F32, &Device::Cpu, 0).is_err());

    let model = Llama::new(&LlamaConfig::tiny(), DType::F32, &Device::Cpu, 0)?;
    let err = model.logits(&ids(&[1, 2, 23])?).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("out of the vocabulary"), "{err}");
    let long = vec![1u32; 33];
    let err = model.logits(&ids(&long)?).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("exceeds"), "{err}");

    // A checkpoint that lacks a tensor names it and builds nothing.
    let mut tensors: HashMap<String, Tensor> = model
        .parameters()
        .iter()
        .map(|p| Ok((p.name.clone(), p.tensor()?)))
        .collect::<candle::Result<_>>()?;
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    let err = Llama::from_tensors(&LlamaConfig::tiny(), tensors, DType::F32, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    Ok(())
}
