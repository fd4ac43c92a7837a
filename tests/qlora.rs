//! QLoRA through the public API: LoRA over a frozen base held quantized (NF4 with double
//! quantization, GGML Q4_0 / Q4_1 / Q8_0 quantized here, and a GGUF file's own blocks) equals
//! the same model whose weights are the quantized ones dequantized once to F32: logits and
//! adapter gradients within 1e-5 (relative), under several recompute policies, with the weights
//! dequantized a few rows at a time. The quantized base gets no gradient and stays bit-identical
//! through training.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle::quantized::gguf_file::Value;
use candle::quantized::{GgmlDType, QTensor};
use candle::{DType, Device, Tensor};
use candle_fit::ckpt::{forward_backward, segment_infos, Recompute, RecomputePolicy, SegmentContext};
use candle_fit::shard::driver::{fit_in_process, InProcessConfig};
use candle_fit::shard::ZeroStage;
use candle_fit::train::lora::{LoraConfig, LoraModel};
use candle_fit::train::models::llama::{is_base_linear, quantize_linears};
use candle_fit::train::models::GgufFile;
use candle_fit::train::quant::{BaseQuantization, QuantizedWeight};
use candle_fit::train::serve::Snapshot;
use candle_fit::train::{
    AdamWConfig, Corpus, Llama, LlamaConfig, LocalUpdater, OptimizerConfig, SgdConfig, TokenBatch,
    TrainableModel, Trainer, TrainerConfig, Updater,
};

/// Widths that are whole GGML blocks (32): 2 layers of width 32, 4 query heads of dimension 8
/// sharing 2 key/value heads, feed-forward 64.
fn config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 23,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 16,
        ..LlamaConfig::tiny()
    }
}

fn lora() -> LoraConfig {
    LoraConfig { rank: 2, alpha: 6.0, ..LoraConfig::new(["all-linear"]) }
}

fn batch(rows: usize) -> candle::Result<TokenBatch> {
    let ids: Vec<u32> = (0..rows as u32 * 6).map(|i| (i * 7 + 3) % 23).collect();
    let targets: Vec<u32> = ids.iter().map(|i| (i * 5 + 1) % 23).collect();
    Ok(TokenBatch {
        inputs: Tensor::from_vec(ids, (rows, 6), &Device::Cpu)?,
        targets: Tensor::from_vec(targets, (rows, 6), &Device::Cpu)?,
    })
}

/// A seeded model's tensors by name, with larger weights than N(0, 0.02²) so that the
/// quantized base matters to the logits.
fn dense_tensors(config: &LlamaConfig) -> anyhow::Result<HashMap<String, Tensor>> {
    let model = Llama::new(config, DType::F32, &Device::Cpu, 7)?;
    let mut tensors = HashMap::new();
    for p in model.parameters().iter() {
        let t = p.tensor()?;
        let t = if p.name.ends_with("proj.weight") { (t * 10.0)? } else { t };
        tensors.insert(p.name.clone(), t);
    }
    Ok(tensors)
}

/// Gives every `lora_B` the same non-zero values in both models (B starts at zero).
fn randomize_b(model: &LoraModel<Llama>) -> anyhow::Result<()> {
    for (k, p) in model.adapter_parameters().iter().enumerate() {
        if p.name.ends_with("lora_B.weight") {
            let n = p.elem_count();
            let values: Vec<f32> = (0..n).map(|i| 0.3 * ((i * 13 + k * 7) as f32).sin()).collect();
            p.var()?.set(&Tensor::from_vec(values, p.shape(), &Device::Cpu)?)?;
        }
    }
    Ok(())
}

type Grads = BTreeMap<String, Tensor>;

fn engine_grads(model: &LoraModel<Llama>, policy: Recompute) -> anyhow::Result<Grads> {
    let decisions = policy.decide(&segment_infos(model))?;
    let mut grads = Grads::new();
    forward_backward(model, &batch(3)?, SegmentContext::train(5, 0, 0), &decisions, 1.0, |segment| {
        for g in segment.gradients {
            grads.insert(g.name, g.grad);
        }
        Ok(())
    })?;
    Ok(grads)
}

fn relative(got: &Tensor, reference: &Tensor) -> anyhow::Result<f64> {
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
    let diff = (got - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    anyhow::ensure!(scale > 0.0, "zero reference");
    Ok(f64::from(diff / scale))
}

/// The quantized model and its reference (the quantized weights dequantized once to F32)
/// compute the same logits and adapter gradients, under several recompute policies.
fn check_against_dequantized(quantized: Llama, reference: Llama, what: &str) -> anyhow::Result<()> {
    assert!(!quantized.quantized_weights().is_empty(), "{what}: nothing is quantized");
    assert!(reference.quantized_weights().is_empty());
    let quantized = LoraModel::new(quantized, lora(), 3)?;
    let reference = LoraModel::new(reference, lora(), 3)?;
    randomize_b(&quantized)?;
    randomize_b(&reference)?;
    let ids = batch(2)?.inputs;
    let rel = relative(&quantized.inner().logits(&ids)?, &reference.inner().logits(&ids)?)?;
    assert!(rel <= 1e-5, "{what}: logits differ by {rel:e}");
    let expected = engine_grads(&reference, Recompute::Never)?;
    assert_eq!(expected.len(), 2 * 7 * 2, "{what}: {:?}", expected.keys());
    for policy in [Recompute::Never, Recompute::All, Recompute::EveryK(2)] {
        let got = engine_grads(&quantized, policy)?;
        assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
        for (name, g) in &expected {
            let rel = relative(&got[name], g)?;
            assert!(rel <= 1e-5, "{what}, {policy:?}: `{name}` differs by {rel:e}");
        }
    }
    Ok(())
}

/// The tensors with every quantized weight replaced by its dequantized F32 value.
fn dequantized(
    tensors: &HashMap<String, Tensor>,
    quantized: &[QuantizedWeight],
) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut all = tensors.clone();
    for q in quantized {
        all.insert(q.name().to_string(), q.dequantize(&Device::Cpu)?);
    }
    Ok(all)
}

#[test]
fn each_format_equals_its_dequantized_weights() -> anyhow::Result<()> {
    let config = config();
    for quantization in
        [BaseQuantization::Nf4, BaseQuantization::Q4_0, BaseQuantization::Q4_1, BaseQuantization::Q8_0]
    {
        let mut tensors = dense_tensors(&config)?;
        // Five rows at a time: every weight is dequantized in several chunks, the last short.
        let quantized: Vec<QuantizedWeight> = quantize_linears(&mut tensors, quantization)?
            .into_iter()
            .map(|q| q.with_chunk_rows(5))
            .collect::<candle::Result<_>>()?;
        assert_eq!(quantized.len(), 7 * 2);
        assert!(tensors.keys().all(|n| !is_base_linear(n)), "a dense copy is left");
        let reference =
            Llama::from_tensors(&config, dequantized(&tensors, &quantized)?, DType::F32, &Device::Cpu)?;
        // The quantized weights differ from the dense ones they came from (the test compares
        // with what was quantized, not with the original).
        let original = dense_tensors(&config)?;
        let q_name = "model.layers.0.self_attn.q_proj.weight";
        let deq = reference.parameters().get(q_name).map(|p| p.tensor()).transpose()?;
        let deq = deq.ok_or_else(|| anyhow::anyhow!("no {q_name}"))?;
        assert!(relative(&deq, &original[q_name])? > 1e-4, "{quantization}: quantization changed nothing");
        let model = Llama::from_tensors_quantized(&config, tensors, quantized, DType::F32, &Device::Cpu)?;
        check_against_dequantized(model, reference, quantization.name())?;
    }
    Ok(())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-fit-qlora-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ok();
    dir
}

/// llama.cpp's rotary layout of a query/key weight (convert_hf_to_gguf.py's permute).
fn interleave(weight: &Tensor, heads: usize) -> candle::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    weight.reshape((heads, 2, rows / heads / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

/// A GGUF file of the model `tensors` describe, the decoder layers' weights in GGML blocks
/// (query Q4_0, key Q4_1, value Q8_0, ... cycling), the rest F32.
fn write_gguf(
    path: &std::path::Path,
    config: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    let mut qtensors: Vec<(String, QTensor)> = Vec::new();
    let types = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for (k, name) in names.into_iter().enumerate() {
        let t = &tensors[name];
        let gguf = match name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            other => {
                let rest = other.strip_prefix("model.layers.").ok_or_else(|| anyhow::anyhow!("{other}"))?;
                let (layer, part) = rest.split_once('.').ok_or_else(|| anyhow::anyhow!("{other}"))?;
                let part = match part {
                    "input_layernorm.weight" => "attn_norm.weight",
                    "post_attention_layernorm.weight" => "ffn_norm.weight",
                    "self_attn.q_proj.weight" => "attn_q.weight",
                    "self_attn.k_proj.weight" => "attn_k.weight",
                    "self_attn.v_proj.weight" => "attn_v.weight",
                    "self_attn.o_proj.weight" => "attn_output.weight",
                    "mlp.gate_proj.weight" => "ffn_gate.weight",
                    "mlp.up_proj.weight" => "ffn_up.weight",
                    "mlp.down_proj.weight" => "ffn_down.weight",
                    _ => anyhow::bail!("{other}"),
                };
                format!("blk.{layer}.{part}")
            }
        };
        let t = if name.ends_with("q_proj.weight") {
            interleave(t, config.num_attention_heads)?
        } else if name.ends_with("k_proj.weight") {
            interleave(t, config.num_key_value_heads)?
        } else {
            t.clone()
        };
        let dtype = if is_base_linear(name) { types[k % types.len()] } else { GgmlDType::F32 };
        qtensors.push((gguf, QTensor::quantize(&t, dtype)?));
    }
    let u32v = |n: usize| Value::U32(n as u32);
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u32v(config.hidden_size)),
        ("llama.feed_forward_length", u32v(config.intermediate_size)),
        ("llama.block_count", u32v(config.num_hidden_layers)),
        ("llama.attention.head_count", u32v(config.num_attention_heads)),
        ("llama.attention.head_count_kv", u32v(config.num_key_value_heads)),
        ("llama.context_length", u32v(config.max_position_embeddings)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(config.rms_norm_eps as f32)),
        ("llama.rope.freq_base", Value::F32(config.rope_theta as f32)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path)?;
    candle::quantized::gguf_file::write(&mut file, &metadata, &refs)?;
    Ok(())
}

/// A GGUF file's own Q4_0 / Q4_1 / Q8_0 blocks (query and key rows permuted back as whole
/// rows) equal the file dequantized to F32 as `GgufFile::llama` reads it; the other modes read
/// the same file and quantize it again.
#[test]
fn a_gguf_files_blocks_equal_the_file_dequantized() -> anyhow::Result<()> {
    let config = config();
    let dir = temp_dir("gguf");
    let path = dir.join("tiny.gguf");
    write_gguf(&path, &config, &dense_tensors(&config)?)?;
    let file = GgufFile::open(&path)?;
    let model = file.llama_quantized(BaseQuantization::Gguf, DType::F32, &Device::Cpu)?;
    let formats: Vec<String> = model.quantized_weights().iter().map(|q| q.format()).collect();
    for format in ["q4_0", "q4_1", "q8_0"] {
        assert!(formats.iter().any(|f| f == format), "{format} not among {formats:?}");
    }
    check_against_dequantized(model, file.llama(DType::F32, &Device::Cpu)?, "gguf")?;
    // NF4 over the same file: its reference is its own weights dequantized.
    let model = file.llama_quantized(BaseQuantization::Nf4, DType::F32, &Device::Cpu)?;
    let mut tensors: HashMap<String, Tensor> = file
        .llama(DType::F32, &Device::Cpu)?
        .parameters()
        .iter()
        .map(|p| Ok((p.name.clone(), p.tensor()?)))
        .collect::<anyhow::Result<_>>()?;
    for q in model.quantized_weights() {
        tensors.insert(q.name().to_string(), q.dequantize(&Device::Cpu)?);
    }
    let reference = Llama::from_tensors(&config, tensors, DType::F32, &Device::Cpu)?;
    check_against_dequantized(model, reference, "nf4 from gguf")?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn blocks(model: &Llama) -> anyhow::Result<Vec<Vec<u32>>> {
    model
        .quantized_weights()
        .iter()
        .map(|q| {
            Ok(q.dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect())
        })
        .collect()
}

/// Through the Trainer (AdamW, every block recomputed, two accumulated micro-batches): the loss
/// falls, the updater holds state for the adapters alone, no base weight gets a gradient, and
/// the quantized base is bit-identical afterwards.
#[test]
fn training_leaves_the_quantized_base_unchanged() -> anyhow::Result<()> {
    let config = LlamaConfig { vocab_size: 256, ..config() };
    let mut tensors = dense_tensors(&config)?;
    let quantized = quantize_linears(&mut tensors, BaseQuantization::Nf4)?;
    let base = Llama::from_tensors_quantized(&config, tensors, quantized, DType::F32, &Device::Cpu)?;
    let before = blocks(&base)?;
    let dense_before: Vec<Vec<f32>> = base
        .parameters()
        .iter()
        .map(|p| Ok(p.tensor()?.flatten_all()?.to_vec1::<f32>()?))
        .collect::<anyhow::Result<_>>()?;
    let model = LoraModel::new(
        base,
        LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::new(["all-linear", "lm_head"]) },
        3,
    )?;
    // One backward: gradients for the adapters and nothing shaped as a base weight.
    let grads = model.inner().logits(&batch(2)?.inputs)?.sqr()?.sum_all()?.backward()?;
    for p in model.adapter_parameters().iter() {
        assert!(grads.get_id(p.id()).is_some(), "no gradient for `{}`", p.name);
    }
    let shapes: Vec<Vec<usize>> =
        grads.get_ids().filter_map(|&id| grads.get_id(id)).map(|g| g.dims().to_vec()).collect();
    for q in model.inner().quantized_weights() {
        let (out, inp) = q.dims();
        assert!(
            !shapes.iter().any(|s| s == &[out, inp] || s == &[inp, out]),
            "a gradient shaped as `{}`",
            q.name()
        );
    }
    let optimizer = OptimizerConfig::AdamW(AdamWConfig::default());
    let mut updater = LocalUpdater::from_config(TrainableModel::parameters(&model), &optimizer)?;
    let trainer = Trainer::new(
        TrainerConfig::builder()
            .micro_batch(2)
            .accumulation_steps(2)
            .seq_len(12)
            .steps(30)
            .eval_windows(4)
            .recompute(Recompute::All)
            .lr(1e-2)
            .build()?,
    );
    let corpus = Corpus::from_bytes("austen.txt".as_ref(), candle_fit::BUNDLED_CORPUS[..6000].to_vec(), 0.2)?;
    let report = trainer.fit(&model, &corpus, &mut updater)?;
    assert!(
        report.final_val_loss < report.initial_val_loss - 0.5,
        "{} -> {}",
        report.initial_val_loss,
        report.final_val_loss
    );
    assert_eq!(blocks(model.inner())?, before, "the quantized base changed");
    let dense_after: Vec<Vec<f32>> = model
        .inner()
        .parameters()
        .iter()
        .map(|p| Ok(p.tensor()?.flatten_all()?.to_vec1::<f32>()?))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(dense_after, dense_before, "the dense frozen parameters changed");
    let state = updater.state_bytes();
    assert_eq!(state.optimizer_state, 2 * 4 * model.adapter_parameters().num_elements(), "{state:?}");
    // The resident bytes count the blocks (NF4: about half a byte per weight), not a dense copy.
    let linear_elements: usize =
        model.inner().quantized_weights().iter().map(|q| q.dims().0 * q.dims().1).sum();
    let resident = model.resident_parameter_bytes();
    let dense = model.inner().parameters().size_in_bytes() + model.adapter_parameters().size_in_bytes();
    assert!(
        resident > dense && resident < dense + linear_elements,
        "{resident} vs {dense} + {linear_elements}"
    );
    Ok(())
}

#[test]
fn what_a_quantized_base_cannot_do_is_refused_by_name() -> anyhow::Result<()> {
    let config = config();
    let mut tensors = dense_tensors(&config)?;
    let quantized = quantize_linears(&mut tensors, BaseQuantization::Q8_0)?;
    let base = Llama::from_tensors_quantized(&config, tensors.clone(), quantized, DType::F32, &Device::Cpu)?;
    let err = base.save_pretrained(&temp_dir("save")).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("quantized") && err.contains("adapter"), "{err}");
    let model = LoraModel::new(base, lora(), 3)?;
    let err = model.merge().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("model.layers.0.self_attn.q_proj") && err.contains("quantized"), "{err}");
    // A quantized weight no layer takes, and one of the wrong shape.
    let extra = QuantizedWeight::nf4(
        "model.layers.9.mlp.up_proj.weight",
        &Tensor::ones((64, 32), DType::F32, &Device::Cpu)?,
    )?;
    let mut all = dense_tensors(&config)?;
    let mut q = quantize_linears(&mut all, BaseQuantization::Nf4)?;
    q.push(extra);
    let err =
        Llama::from_tensors_quantized(&config, all, q, DType::F32, &Device::Cpu).err().map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("model.layers.9.mlp.up_proj.weight"));
    let mut all = dense_tensors(&config)?;
    let mut q = quantize_linears(&mut all, BaseQuantization::Nf4)?;
    q.retain(|w| w.name() != "model.layers.0.mlp.up_proj.weight");
    q.push(QuantizedWeight::nf4(
        "model.layers.0.mlp.up_proj.weight",
        &Tensor::ones((32, 32), DType::F32, &Device::Cpu)?,
    )?);
    let err =
        Llama::from_tensors_quantized(&config, all, q, DType::F32, &Device::Cpu).err().map(|e| e.to_string());
    assert!(err.unwrap_or_default().contains("model.layers.0.mlp.up_proj.weight"));
    // GGML blocks need whole blocks along the input dimension.
    let err = BaseQuantization::Q4_0.quantize("w", &Tensor::ones((4, 16), DType::F32, &Device::Cpu)?).err();
    let err = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("`w`") && err.contains("16 input features"), "{err}");
    let err = "int3".parse::<BaseQuantization>().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("int3") && err.contains("nf4"), "{err}");
    Ok(())
}

/// In BF16 the quantized layers take a BF16 input (multiplied in F32 on the CPU) and give a
/// BF16 output: the logits stay within twice the distance to the F32 model over the same blocks
/// that a dense BF16 model (its weights the dequantized ones, rounded to BF16) keeps (BF16
/// rounding noise: 3.5e-2 against 2.2e-2 here).
#[test]
fn a_bf16_model_over_the_same_blocks_stays_close() -> anyhow::Result<()> {
    let config = config();
    let mut tensors = dense_tensors(&config)?;
    let quantized = quantize_linears(&mut tensors, BaseQuantization::Q4_1)?;
    let all = dequantized(&tensors, &quantized)?;
    let reference = Llama::from_tensors(&config, all.clone(), DType::F32, &Device::Cpu)?;
    let dense_bf16 = Llama::from_tensors(&config, all, DType::BF16, &Device::Cpu)?;
    let model = Llama::from_tensors_quantized(&config, tensors, quantized, DType::BF16, &Device::Cpu)?;
    let ids = batch(2)?.inputs;
    let want = reference.logits(&ids)?;
    let logits = model.logits(&ids)?;
    assert_eq!(logits.dtype(), DType::BF16);
    let rel = relative(&logits.to_dtype(DType::F32)?, &want)?;
    let dense = relative(&dense_bf16.logits(&ids)?.to_dtype(DType::F32)?, &want)?;
    assert!(
        rel > 0.0 && rel <= 2.0 * dense,
        "BF16 logits differ by {rel:e}, a dense BF16 model's by {dense:e}"
    );
    Ok(())
}

/// `LoraConfig::quantize_base` states the base's format: `LoraModel::new` checks it against the
/// layers (a dense base, or layers in another format, are refused naming the field), and a
/// dense model quantized in place (`Llama::quantize_base`) holds the same blocks as a loaded one.
#[test]
fn the_lora_config_states_the_base_format() -> anyhow::Result<()> {
    let config = config();
    let with = |q: BaseQuantization| LoraConfig { quantize_base: Some(q), ..lora() };
    let dense = Llama::from_tensors(&config, dense_tensors(&config)?, DType::F32, &Device::Cpu)?;
    let err = LoraModel::new(dense, with(BaseQuantization::Nf4), 3).err().map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(err.contains("lora quantize_base") && err.contains("dense"), "{err}");
    let dense = Llama::from_tensors(&config, dense_tensors(&config)?, DType::F32, &Device::Cpu)?;
    let nf4 = dense.quantize_base(BaseQuantization::Nf4)?;
    let mut tensors = dense_tensors(&config)?;
    let loaded = quantize_linears(&mut tensors, BaseQuantization::Nf4)?;
    let loaded = Llama::from_tensors_quantized(&config, tensors, loaded, DType::F32, &Device::Cpu)?;
    assert_eq!(blocks(&nf4)?, blocks(&loaded)?);
    let err = nf4.quantize_base(BaseQuantization::Q8_0).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("quantized already"), "{err}");
    let err = LoraModel::new(loaded, with(BaseQuantization::Q8_0), 3).err().map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(err.contains("model.layers.0.self_attn.q_proj") && err.contains("nf4"), "{err}");
    let dense = Llama::from_tensors(&config, dense_tensors(&config)?, DType::F32, &Device::Cpu)?;
    let model =
        LoraModel::new(dense.quantize_base(BaseQuantization::Q4_0)?, with(BaseQuantization::Q4_0), 3)?;
    // The run's settings record it (and so do its checkpoints'); a dense run's do not.
    assert!(model.settings().contains("\"quantize_base\":\"q4_0\""), "{}", model.settings());
    let dense = Llama::from_tensors(&config, dense_tensors(&config)?, DType::F32, &Device::Cpu)?;
    assert!(!LoraModel::new(dense, lora(), 3)?.settings().contains("quantize_base"));
    Ok(())
}

fn bits(t: &Tensor) -> anyhow::Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
}

/// Fails naming the first differing element (and how many differ), not printing both vectors.
fn assert_same_bits(got: &[u32], want: &[u32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    if let Some(&i) = differ.first() {
        panic!(
            "{what}: {} of {} elements differ, the first at {i}: {} ({:#x}) against {} ({:#x})",
            differ.len(),
            got.len(),
            f32::from_bits(got[i]),
            got[i],
            f32::from_bits(want[i]),
            want[i]
        );
    }
}

/// Seeded values of mixed magnitudes (blocks of very different absmaxes, some all zero).
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let block = i / 64;
            let scale = if (block + seed) % 7 == 3 { 0.0 } else { 1.0 + ((block * 5 + seed) % 11) as f32 };
            scale * ((i * 31 + seed * 17) as f32 * 0.37).sin()
        })
        .collect()
}

/// NF4 dequantized on the device with tensor ops (what training runs) equals the host's
/// element-by-element dequantization (`Nf4Tensor::dequantize_range`, checked against
/// bitsandbytes in the unit tests) bit for bit: odd element counts (a padding nibble), a short
/// last block, more than 256 blocks (two absmax groups), every chunk size and so every chunk
/// boundary, and ranges that start and end inside blocks.
#[test]
fn nf4_on_the_device_equals_the_host_bit_for_bit() -> anyhow::Result<()> {
    for (k, (rows, cols)) in [(3, 7), (5, 100), (37, 129), (300, 70), (1, 64)].into_iter().enumerate() {
        let data = values(rows * cols, k);
        let weight = QuantizedWeight::nf4("w", &Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)?;
        let host = weight.to_nf4()?.ok_or_else(|| anyhow::anyhow!("not nf4"))?;
        let n = rows * cols;
        assert_eq!(weight.storage_bytes(), host.storage_bytes());
        let reference: Vec<u32> = host.dequantize_range(0, n)?.into_iter().map(f32::to_bits).collect();
        assert!(reference.iter().any(|&b| b != 0), "{rows}x{cols}: all zero");
        let whole = bits(&weight.dequantize(&Device::Cpu)?)?;
        assert_same_bits(&whole, &reference, &format!("{rows}x{cols}: whole"));
        let whole = bits(&weight.dequantize_rows_portable(0, rows)?)?;
        assert_same_bits(&whole, &reference, &format!("{rows}x{cols}: whole, tensor ops"));
        let chunk_sizes: Vec<usize> = if rows <= 40 { (1..=rows).collect() } else { vec![1, 7, 256, 299] };
        let mut weight = weight;
        for chunk in chunk_sizes {
            weight = weight.with_chunk_rows(chunk)?;
            let mut covered = 0;
            for (start, len) in weight.chunks() {
                let want = &reference[start * cols..(start + len) * cols];
                let got = bits(&weight.dequantize_rows(start, len, &Device::Cpu)?)?;
                assert_same_bits(&got, want, &format!("{rows}x{cols}: rows {start}+{len}"));
                let got = bits(&weight.dequantize_rows_portable(start, len)?)?;
                assert_same_bits(&got, want, &format!("{rows}x{cols}: rows {start}+{len}, tensor ops"));
                covered += len;
            }
            assert_eq!(covered, rows);
        }
        assert!(weight.dequantize_rows_portable(rows, 1).is_err());
    }
    Ok(())
}

/// GGML blocks held one `QTensor` per chunk of rows dequantize, chunk by chunk and over any
/// range of rows, to what candle gives for the whole tensor; a GGUF file's F16/BF16/F32 weights
/// (held as a plain tensor) too, bit for bit.
#[test]
fn ggml_chunks_equal_the_whole_tensor_dequantized() -> anyhow::Result<()> {
    let (rows, cols) = (13, 64);
    let dense = Tensor::from_vec(values(rows * cols, 2), (rows, cols), &Device::Cpu)?;
    let types =
        [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F16, GgmlDType::BF16, GgmlDType::F32];
    for dtype in types {
        let q = QTensor::quantize(&dense, dtype)?;
        let whole = bits(&q.dequantize(&Device::Cpu)?)?;
        let weight = QuantizedWeight::from_qtensor("w", &q, None)?;
        assert_eq!(weight.storage_bytes(), q.storage_size_in_bytes(), "{dtype:?}");
        assert_eq!(weight.format(), format!("{dtype:?}").to_ascii_lowercase());
        let mut weight = weight;
        for chunk in [1, 4, 5, 13] {
            weight = weight.with_chunk_rows(chunk)?;
            assert_eq!(weight.storage_bytes(), q.storage_size_in_bytes(), "{dtype:?}, {chunk} rows");
            for (start, len) in weight.chunks().chain([(3, 7), (0, 13), (12, 1)]) {
                let want = &whole[start * cols..(start + len) * cols];
                let got = bits(&weight.dequantize_rows(start, len, &Device::Cpu)?)?;
                assert_same_bits(&got, want, &format!("{dtype:?}: rows {start}+{len}"));
                let got = bits(&weight.dequantize_rows_portable(start, len)?)?;
                assert_same_bits(&got, want, &format!("{dtype:?}: rows {start}+{len}, portable"));
            }
        }
        assert!(weight.dequantize_rows(10, 4, &Device::Cpu).is_err());
    }
    // Rows permuted as whole rows (llama.cpp's rotary layout undone): row i is q's row rows[i].
    let q = QTensor::quantize(&dense, GgmlDType::Q4_1)?;
    let order: Vec<usize> = (0..rows).rev().collect();
    let permuted = QuantizedWeight::from_qtensor("w", &q, Some(&order))?.with_chunk_rows(4)?;
    let whole = q.dequantize(&Device::Cpu)?;
    for (i, &r) in order.iter().enumerate() {
        let want = bits(&whole.narrow(0, r, 1)?)?;
        assert_same_bits(&bits(&permuted.dequantize_rows(i, 1, &Device::Cpu)?)?, &want, &format!("row {i}"));
    }
    Ok(())
}

/// A SmolLM2-sized weight (576 x 1536, the MLP's down projection) dequantized in its chunks of
/// rows three ways: with tensor ops (`dequantize_rows_portable`, what CUDA and Metal run), by
/// `dequantize_rows` on the CPU (a host loop over the blocks' tensors), and by the host
/// `Nf4Tensor::dequantize_range`: equal bit for bit; the times are printed (`--nocapture`),
/// never asserted. BENCHMARKS.md section 18 quotes them.
#[test]
fn nf4_dequantization_time_on_a_smollm2_weight() -> anyhow::Result<()> {
    let (rows, cols) = (576, 1536);
    let dense = Tensor::from_vec(values(rows * cols, 5), (rows, cols), &Device::Cpu)?;
    let weight = QuantizedWeight::nf4("model.layers.0.mlp.down_proj.weight", &dense)?;
    let host = weight.to_nf4()?.ok_or_else(|| anyhow::anyhow!("not nf4"))?;
    let chunks: Vec<(usize, usize)> = weight.chunks().collect();
    let time = |f: &dyn Fn() -> anyhow::Result<Vec<Tensor>>| -> anyhow::Result<(f64, Vec<Tensor>)> {
        let mut best = f64::INFINITY;
        let mut out = Vec::new();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            out = f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok((best * 1e3, out))
    };
    let (tensor_ms, tensor) =
        time(&|| chunks.iter().map(|&(s, n)| Ok(weight.dequantize_rows_portable(s, n)?)).collect())?;
    let (cpu_ms, cpu) =
        time(&|| chunks.iter().map(|&(s, n)| Ok(weight.dequantize_rows(s, n, &Device::Cpu)?)).collect())?;
    let (host_ms, host_out) = time(&|| {
        chunks
            .iter()
            .map(|&(s, n)| {
                Ok(Tensor::from_vec(host.dequantize_range(s * cols, n * cols)?, (n, cols), &Device::Cpu)?)
            })
            .collect()
    })?;
    assert_eq!(tensor.len(), chunks.len());
    for (k, ((a, b), c)) in tensor.iter().zip(&host_out).zip(&cpu).enumerate() {
        assert_same_bits(&bits(a)?, &bits(b)?, &format!("chunk {k}, tensor ops"));
        assert_same_bits(&bits(c)?, &bits(b)?, &format!("chunk {k}, dequantize_rows"));
    }
    println!(
        "nf4 {rows}x{cols} in {} chunks, best of 5: tensor ops {tensor_ms:.2} ms, dequantize_rows on the \
         CPU (host loop over the blocks' tensors) {cpu_ms:.2} ms, Nf4Tensor::dequantize_range {host_ms:.2} ms",
        chunks.len()
    );
    Ok(())
}

/// The adapters' values by name.
fn adapter_values(model: &LoraModel<Llama>) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    model
        .adapter_parameters()
        .iter()
        .map(|p| Ok((p.name.clone(), p.tensor()?.flatten_all()?.to_vec1()?)))
        .collect()
}

/// QLoRA under ZeRO stages 0-3 on two in-process ranks ends where one rank does (the adapters
/// within 1e-6 of their magnitude, the tolerance of `tests/lora.rs`'s LoRA-under-ZeRO test):
/// the adapters are the trainable parameters (partitioned by stage 1-3, released and gathered
/// by stage 3), and every rank's model is a snapshot of one NF4 base, sharing its blocks
/// (the same `Arc`s, not copies). The base stays bit-identical.
#[test]
fn qlora_under_zero_on_two_ranks_equals_one_rank() -> anyhow::Result<()> {
    let config = LlamaConfig { vocab_size: 256, ..config() };
    let mut tensors = dense_tensors(&config)?;
    let quantized = quantize_linears(&mut tensors, BaseQuantization::Nf4)?;
    let base = Llama::from_tensors_quantized(&config, tensors, quantized, DType::F32, &Device::Cpu)?;
    let before = blocks(&base)?;
    let copy = base.snapshot()?;
    let (ours, theirs) = (base.quantized_weights(), copy.quantized_weights());
    assert_eq!(ours.len(), 14);
    assert!(
        ours.iter().zip(&theirs).all(|(a, b)| std::sync::Arc::ptr_eq(a, b)),
        "the snapshot copied the blocks"
    );
    let make = |_rank: usize| -> candle_fit::train::Result<LoraModel<Llama>> {
        let model = LoraModel::new(base.snapshot()?, lora(), 3)?;
        // Non-zero B for every rank alike (B starts at zero).
        randomize_b(&model).map_err(|e| candle_fit::train::Error::config("test", e.to_string()))?;
        Ok(model)
    };
    let optimizer = OptimizerConfig::Sgd(SgdConfig::default());
    let data = Corpus::from_bytes("austen.txt".as_ref(), candle_fit::BUNDLED_CORPUS[..6000].to_vec(), 0.2)?;
    let trainer = || -> anyhow::Result<Trainer> {
        Ok(Trainer::new(
            TrainerConfig::builder()
                .micro_batch(2)
                .accumulation_steps(2)
                .seq_len(12)
                .steps(2)
                .eval_windows(4)
                .recompute(Recompute::All)
                .lr(1e-1)
                .build()?,
        ))
    };
    let initial = adapter_values(&make(0)?)?;
    let single = {
        let model = make(0)?;
        let mut updater = LocalUpdater::from_config(TrainableModel::parameters(&model), &optimizer)?;
        trainer()?.fit(&model, &data, &mut updater)?;
        adapter_values(&model)?
    };
    for stage in [ZeroStage::Stage0, ZeroStage::Stage1, ZeroStage::Stage2, ZeroStage::Stage3] {
        let config = InProcessConfig {
            world_size: std::num::NonZeroUsize::new(2).ok_or_else(|| anyhow::anyhow!("zero ranks"))?,
            stage,
            timeout: std::time::Duration::from_secs(60),
        };
        let runs = fit_in_process(&config, &trainer()?, &data, &optimizer, make)?;
        let ranked = adapter_values(&runs[0].model)?;
        assert_eq!(ranked.len(), single.len());
        let mut moved = 0.0f32;
        for (((name, one), (other, many)), (_, start)) in single.iter().zip(&ranked).zip(&initial) {
            assert_eq!(name, other);
            let step = one.iter().zip(start).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let diff = one.iter().zip(many).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let magnitude = one.iter().fold(step, |m, v| m.max(v.abs()));
            moved = moved.max(step);
            assert!(diff <= 1e-6 * magnitude, "{stage:?}: `{name}` differs by {diff:e} (update {step:e})");
        }
        assert!(moved > 1e-4, "{stage:?}: training did not move the adapters");
        assert_eq!(blocks(runs[0].model.inner())?, before, "{stage:?}: the quantized base changed");
    }
    Ok(())
}
