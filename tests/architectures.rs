//! The architectures `candle-fit` loads from a Hugging Face folder, each checked against
//! candle-transformers' implementation of the same architecture: a seeded tiny config is saved
//! as a folder (`config.json` + `model.safetensors`, every tensor drawn at random, norms and
//! biases included, so each one matters), the same folder is loaded by both, and the logits
//! agree within 1e-5 relative (the largest difference over the largest reference logit) in F32.
//! The reference decodes with its own key/value cache (a prompt, then one token at a time);
//! ours is compared both on the whole sequence and through its cache.
//!
//! Each folder also round-trips: loaded and saved, it has the same tensor names and values and
//! every field of the config read, and reloads bit-identically. Unsupported options are refused
//! with an error naming the field and the value.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::{DType, Device, IndexOp, Tensor};
use candle_fit::ckpt::Rng;
use candle_fit::train::models::{KvCache, Llama, LlamaConfig};
use candle_nn::VarBuilder;
use serde_json::{json, Value};

/// The relative tolerance of F32 logits against the reference.
const TOLERANCE: f64 = 1e-5;

/// The token ids every model reads (vocabulary 32): a prompt of [`PROMPT`] tokens, then one at
/// a time.
const TOKENS: [u32; 8] = [3, 17, 5, 29, 0, 11, 31, 8];
const PROMPT: usize = 5;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-fit-arch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Seeded values for every tensor of `shapes`: norm weights near 1, biases and other weights
/// around 0 (std 0.2 and 0.3), so that no tensor is a no-op.
fn seeded_tensors(shapes: &[(String, Vec<usize>)], seed: u64) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut rng = Rng::seeded(seed);
    let mut out = HashMap::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let is_norm = name.contains("norm") || name.contains("ln_") || name.contains("LayerNorm");
        let values: Vec<f32> = (0..n)
            .map(|_| {
                let z = rng.normal_f64() as f32;
                if is_norm && name.ends_with("weight") {
                    1.0 + 0.2 * z
                } else if name.ends_with("bias") {
                    0.2 * z
                } else {
                    0.3 * z
                }
            })
            .collect();
        out.insert(name.clone(), Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?);
    }
    Ok(out)
}

/// Writes `config` and `tensors` as a Hugging Face folder.
fn write_folder(dir: &Path, config: &Value, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config)?)?;
    candle::safetensors::save(tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// A LLaMA-family folder for `config`: the tensor names and shapes are those of our model for
/// the config (the reference then finds each by name, or fails), the values seeded.
fn llama_family_folder(name: &str, config: &Value) -> anyhow::Result<PathBuf> {
    let dir = temp_dir(name);
    let parsed: LlamaConfig = serde_json::from_value(config.clone())?;
    let model = Llama::new(&parsed, DType::F32, &Device::Cpu, 0)?;
    let shapes: Vec<(String, Vec<usize>)> =
        model.parameters().iter().map(|p| (p.name.clone(), p.dims().to_vec())).collect();
    write_folder(&dir, config, &seeded_tensors(&shapes, 7)?)?;
    Ok(dir)
}

fn reference_weights(dir: &Path) -> anyhow::Result<VarBuilder<'static>> {
    let bytes = std::fs::read(dir.join("model.safetensors"))?;
    Ok(VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu)?)
}

fn relative_error(ours: &Tensor, reference: &Tensor) -> anyhow::Result<f64> {
    let (a, b) = (ours.to_dtype(DType::F64)?, reference.to_dtype(DType::F64)?.reshape(ours.shape())?);
    let diff = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / scale)
}

fn ids(tokens: &[u32]) -> anyhow::Result<Tensor> {
    Ok(Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?)
}

/// The reference's logits for the last prompt position, then for each later token fed alone
/// (`step(ids, offset)` returns the last position's logits).
fn reference_logits(
    mut step: impl FnMut(&Tensor, usize) -> candle::Result<Tensor>,
) -> anyhow::Result<Vec<Tensor>> {
    let mut out = vec![step(&ids(&TOKENS[..PROMPT])?, 0)?.flatten_all()?];
    for (offset, token) in TOKENS.iter().enumerate().skip(PROMPT) {
        out.push(step(&ids(&[*token])?, offset)?.flatten_all()?);
    }
    Ok(out)
}

/// Our model from `dir` against `expected` (positions `PROMPT - 1..`): the whole sequence at
/// once, and the prompt then one token at a time through the cache.
fn check_against_reference(dir: &Path, expected: &[Tensor]) -> anyhow::Result<Llama> {
    let model = Llama::from_pretrained(dir, DType::F32, &Device::Cpu)?;
    let whole = model.logits(&ids(&TOKENS)?)?.squeeze(0)?;
    let mut cache = KvCache::new();
    let mut cached = vec![model.logits_cached(&ids(&TOKENS[..PROMPT])?, &mut cache)?.i((0, PROMPT - 1))?];
    for token in &TOKENS[PROMPT..] {
        cached.push(model.logits_cached(&ids(&[*token])?, &mut cache)?.i((0, 0))?);
    }
    for (i, reference) in expected.iter().enumerate() {
        let position = PROMPT - 1 + i;
        let error = relative_error(&whole.i(position)?, reference)?;
        assert!(error <= TOLERANCE, "{}: position {position}: relative error {error:e}", dir.display());
        let error = relative_error(&cached[i], reference)?;
        assert!(
            error <= TOLERANCE,
            "{}: cached, position {position}: relative error {error:e}",
            dir.display()
        );
    }
    Ok(model)
}

/// Loads `dir`, saves it into a second folder and checks that the second has the same tensors
/// (names and bits), every field of the first's config with the same value, and reloads to the
/// same logits.
fn check_round_trip(dir: &Path, model: &Llama) -> anyhow::Result<()> {
    let saved = dir.with_extension("saved");
    model.save_pretrained(&saved)?;
    let read = |d: &Path| -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(d.join("config.json"))?)?)
    };
    let (original, written) = (read(dir)?, read(&saved)?);
    for (key, value) in original.as_object().expect("a config is an object") {
        assert_eq!(written.get(key), Some(value), "{}: field `{key}`", saved.display());
    }
    let before = candle::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let after = candle::safetensors::load(saved.join("model.safetensors"), &Device::Cpu)?;
    let mut names: Vec<&String> = before.keys().collect();
    names.sort();
    let mut written_names: Vec<&String> = after.keys().collect();
    written_names.sort();
    assert_eq!(names, written_names);
    for (name, tensor) in &before {
        let bits = |t: &Tensor| {
            t.flatten_all()?.to_vec1::<f32>().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        assert_eq!(bits(tensor)?, bits(&after[name])?, "{name}");
    }
    let reloaded = Llama::from_pretrained(&saved, DType::F32, &Device::Cpu)?;
    // The saved config adds `torch_dtype` and the effective `head_dim`; nothing else changes.
    let mut config = reloaded.config().clone();
    assert_eq!(config.extra.remove("torch_dtype"), Some(json!("float32")));
    assert_eq!(config.head_dim(), model.config().head_dim());
    config.head_dim = model.config().head_dim;
    assert_eq!(&config, model.config());
    let all = ids(&TOKENS)?;
    let logits = |m: &Llama| m.logits(&all)?.flatten_all()?.to_vec1::<f32>();
    assert_eq!(logits(&reloaded)?, logits(model)?);
    std::fs::remove_dir_all(&saved)?;
    Ok(())
}

/// A tiny LLaMA-family config: vocabulary 32, width 16, 2 layers, 4 query heads over 2
/// key/value heads.
fn tiny_config(model_type: &str, architecture: &str) -> Value {
    json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
    })
}

fn with(mut config: Value, fields: Value) -> Value {
    if let (Some(map), Some(fields)) = (config.as_object_mut(), fields.as_object()) {
        for (k, v) in fields {
            map.insert(k.clone(), v.clone());
        }
    }
    config
}

fn llama_reference(dir: &Path, config: &Value) -> anyhow::Result<Vec<Tensor>> {
    use candle_transformers::models::llama as reference;
    let cfg: reference::LlamaConfig = serde_json::from_value(config.clone())?;
    let cfg = cfg.into_config(false);
    let model = reference::Llama::load(reference_weights(dir)?, &cfg)?;
    let mut cache = reference::Cache::new(true, DType::F32, &cfg, &Device::Cpu)?;
    reference_logits(|ids, offset| model.forward(ids, offset, &mut cache))
}

#[test]
fn llama_equals_candle_transformers_tied_and_with_llama3_rope_scaling() -> anyhow::Result<()> {
    let tied = with(tiny_config("llama", "LlamaForCausalLM"), json!({"tie_word_embeddings": true}));
    // Width 32 over 4 heads: head dimension 8, frequencies 1, 0.1, 0.01, 0.001 (wavelengths
    // 6.3 to 6283): with these factors one is kept, one interpolated, two divided.
    let scaled = with(
        tiny_config("llama", "LlamaForCausalLM"),
        json!({
            "hidden_size": 32,
            "rope_scaling": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64
            }
        }),
    );
    for (name, config) in [("llama-tied", tied), ("llama-llama3", scaled)] {
        let dir = llama_family_folder(name, &config)?;
        let expected = llama_reference(&dir, &config)?;
        let model = check_against_reference(&dir, &expected)?;
        check_round_trip(&dir, &model)?;
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

#[test]
fn mistral_equals_candle_transformers() -> anyhow::Result<()> {
    use candle_transformers::models::mistral as reference;
    // An explicit head dimension (6) that is not width / heads (4), and a window the sequence
    // fits in.
    let config =
        with(tiny_config("mistral", "MistralForCausalLM"), json!({"head_dim": 6, "sliding_window": 8}));
    let dir = llama_family_folder("mistral", &config)?;
    let cfg: reference::Config = serde_json::from_value(config.clone())?;
    let mut reference = reference::Model::new(&cfg, reference_weights(&dir)?)?;
    let expected = reference_logits(|ids, offset| reference.forward(ids, offset))?;
    let model = check_against_reference(&dir, &expected)?;
    check_round_trip(&dir, &model)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn qwen2_with_its_biases_equals_candle_transformers() -> anyhow::Result<()> {
    use candle_transformers::models::qwen2 as reference;
    let config = with(
        tiny_config("qwen2", "Qwen2ForCausalLM"),
        json!({
            "tie_word_embeddings": true, "sliding_window": 32, "max_window_layers": 2,
            "use_sliding_window": false
        }),
    );
    let dir = llama_family_folder("qwen2", &config)?;
    let names = candle::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    assert!(names.contains_key("model.layers.0.self_attn.q_proj.bias"));
    assert!(!names.contains_key("model.layers.0.self_attn.o_proj.bias"));
    let cfg: reference::Config = serde_json::from_value(config.clone())?;
    let mut reference = reference::ModelForCausalLM::new(&cfg, reference_weights(&dir)?)?;
    let expected = reference_logits(|ids, offset| reference.forward(ids, offset))?;
    let model = check_against_reference(&dir, &expected)?;
    check_round_trip(&dir, &model)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn qwen3_with_head_norms_and_biases_equals_candle_transformers() -> anyhow::Result<()> {
    use candle_transformers::models::qwen3 as reference;
    // Head dimension 8 (queries 32 wide over a width of 16), biases on all four projections.
    let config = with(
        tiny_config("qwen3", "Qwen3ForCausalLM"),
        json!({
            "head_dim": 8, "attention_bias": true, "sliding_window": null, "max_window_layers": 2,
            "use_sliding_window": false
        }),
    );
    let dir = llama_family_folder("qwen3", &config)?;
    let names = candle::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    assert!(names.contains_key("model.layers.1.self_attn.k_norm.weight"));
    assert!(names.contains_key("model.layers.1.self_attn.o_proj.bias"));
    let cfg: reference::Config = serde_json::from_value(config.clone())?;
    let mut reference = reference::ModelForCausalLM::new(&cfg, reference_weights(&dir)?)?;
    let expected = reference_logits(|ids, offset| reference.forward(ids, offset))?;
    let model = check_against_reference(&dir, &expected)?;
    check_round_trip(&dir, &model)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The error `candle-fit` prints for the folder holding `config` (with seeded weights for the
/// tiny LLaMA).
fn load_error(name: &str, config: &Value) -> String {
    let dir = temp_dir(name);
    let result = (|| -> anyhow::Result<()> {
        let base = llama_family_folder(&format!("{name}-base"), &tiny_config("llama", "LlamaForCausalLM"))?;
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(base.join("model.safetensors"), dir.join("model.safetensors"))?;
        std::fs::write(dir.join("config.json"), serde_json::to_string(config)?)?;
        std::fs::remove_dir_all(&base)?;
        candle_fit::model_source::load_model(dir.to_str().unwrap_or_default(), DType::F32, &Device::Cpu)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(()) => panic!("{name}: the folder loaded"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn unsupported_architectures_and_options_are_refused_naming_field_and_value() -> anyhow::Result<()> {
    let llama = tiny_config("llama", "LlamaForCausalLM");
    let cases = [
        (
            "arch",
            with(llama.clone(), json!({"architectures": ["PhiForCausalLM"], "model_type": "phi"})),
            "architectures",
            "PhiForCausalLM",
        ),
        ("model-type", with(llama.clone(), json!({"model_type": "falcon"})), "model_type", "falcon"),
        (
            "yarn",
            with(llama.clone(), json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})),
            "rope_scaling",
            "yarn",
        ),
        (
            "act",
            with(llama.clone(), json!({"hidden_act": "gelu_pytorch_tanh"})),
            "hidden_act",
            "gelu_pytorch_tanh",
        ),
        ("mlp-bias", with(llama.clone(), json!({"mlp_bias": true})), "mlp_bias", "true"),
        ("head-dim", with(llama.clone(), json!({"head_dim": 5})), "head_dim", "5"),
        (
            "mismatch",
            with(llama.clone(), json!({"architectures": ["LlamaForCausalLM"], "model_type": "qwen2"})),
            "architectures",
            "qwen2",
        ),
    ];
    for (name, config, field, value) in cases {
        let message = load_error(name, &config);
        assert!(
            message.contains(field) && message.contains(value) && message.contains("config.json"),
            "{name}: {message}"
        );
    }
    Ok(())
}

#[test]
fn a_tensor_the_config_has_no_parameter_for_is_refused_by_name() -> anyhow::Result<()> {
    // Qwen2 weights (with q/k/v biases) under a LLaMA config would lose their biases silently.
    let qwen = with(
        tiny_config("qwen2", "Qwen2ForCausalLM"),
        json!({"sliding_window": 32, "max_window_layers": 2, "use_sliding_window": false}),
    );
    let dir = llama_family_folder("stray", &qwen)?;
    std::fs::write(dir.join("config.json"), tiny_config("llama", "LlamaForCausalLM").to_string())?;
    let message =
        format!("{:#}", Llama::from_pretrained(&dir, DType::F32, &Device::Cpu).expect_err("refused"));
    assert!(
        message.contains("self_attn.") && message.contains(".bias") && message.contains("llama"),
        "{message}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn a_sliding_window_is_honoured_within_it_and_refused_beyond() -> anyhow::Result<()> {
    let config = with(tiny_config("mistral", "MistralForCausalLM"), json!({"sliding_window": 6}));
    let dir = llama_family_folder("window", &config)?;
    let model = Llama::from_pretrained(&dir, DType::F32, &Device::Cpu)?;
    assert_eq!(model.config().max_sequence_len(), 6);
    model.logits(&ids(&TOKENS[..6])?)?;
    let message = model.logits(&ids(&TOKENS[..7])?).expect_err("beyond the window").to_string();
    assert!(message.contains("sliding_window") && message.contains('6'), "{message}");
    let mut cache = KvCache::new();
    model.logits_cached(&ids(&TOKENS[..6])?, &mut cache)?;
    let message = model.logits_cached(&ids(&[1])?, &mut cache).expect_err("beyond the window").to_string();
    assert!(message.contains("sliding_window"), "{message}");
    // Qwen2's window applies only with `use_sliding_window`.
    let qwen = with(tiny_config("qwen2", "Qwen2ForCausalLM"), json!({"sliding_window": 6}));
    let parsed: LlamaConfig = serde_json::from_value(qwen.clone())?;
    assert_eq!(parsed.max_sequence_len(), 32);
    let parsed: LlamaConfig = serde_json::from_value(with(qwen, json!({"use_sliding_window": true})))?;
    assert_eq!(parsed.max_sequence_len(), 6);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A tiny BERT config as `transformers` writes it (the fields candle-transformers requires
/// included): vocabulary 32, width 16, 2 layers of 4 heads.
fn tiny_bert_config(architecture: &str) -> Value {
    json!({
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": 32,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 24,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 16,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "classifier_dropout": null,
    })
}

/// A padded batch of two: ids, token types, mask (the second row has two padding positions).
fn bert_batch() -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let ids = Tensor::new(&[[2u32, 17, 5, 29, 9, 3], [2, 11, 31, 3, 0, 0]], &Device::Cpu)?;
    let types = Tensor::new(&[[0u32, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu)?;
    Ok((ids, types, mask))
}

/// Checks that `saved` holds every field of `original`'s config with its value and the same
/// tensors, bit for bit.
fn check_same_folder(original: &Path, saved: &Path) -> anyhow::Result<()> {
    let read = |d: &Path| -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(d.join("config.json"))?)?)
    };
    let (before, after) = (read(original)?, read(saved)?);
    for (key, value) in before.as_object().expect("a config is an object") {
        assert_eq!(after.get(key), Some(value), "{}: field `{key}`", saved.display());
    }
    let before = candle::safetensors::load(original.join("model.safetensors"), &Device::Cpu)?;
    let after = candle::safetensors::load(saved.join("model.safetensors"), &Device::Cpu)?;
    assert_eq!(before.len(), after.len());
    for (name, tensor) in &before {
        let written = after.get(name).unwrap_or_else(|| panic!("{name} is not written"));
        let bits = |t: &Tensor| -> anyhow::Result<Vec<u32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
        };
        assert_eq!(bits(tensor)?, bits(written)?, "{name}");
    }
    Ok(())
}

#[test]
fn bert_encoder_equals_candle_transformers() -> anyhow::Result<()> {
    use candle_fit::train::models::{Bert, BertConfig};
    use candle_transformers::models::bert as reference;
    let config = tiny_bert_config("BertModel");
    let dir = temp_dir("bert");
    let parsed: BertConfig = serde_json::from_value(config.clone())?;
    let shapes: Vec<(String, Vec<usize>)> = Bert::new(&parsed, "", DType::F32, &Device::Cpu, 0)?
        .parameters()
        .iter()
        .map(|p| (p.name.clone(), p.dims().to_vec()))
        .collect();
    write_folder(&dir, &config, &seeded_tensors(&shapes, 11)?)?;

    let (ids, types, mask) = bert_batch()?;
    let cfg: reference::Config = serde_json::from_value(config)?;
    let expected =
        reference::BertModel::load(reference_weights(&dir)?, &cfg)?.forward(&ids, &types, Some(&mask))?;
    let model = Bert::from_pretrained(&dir, DType::F32, &Device::Cpu)?;
    let ours = model.forward(&ids, Some(&types), &mask, &mut Rng::seeded(0), false)?;
    let error = relative_error(&ours, &expected)?;
    assert!(error <= TOLERANCE, "relative error {error:e}");

    let saved = dir.with_extension("saved");
    model.save_pretrained(&saved)?;
    check_same_folder(&dir, &saved)?;
    let reloaded = Bert::from_pretrained(&saved, DType::F32, &Device::Cpu)?;
    let again = reloaded.forward(&ids, Some(&types), &mask, &mut Rng::seeded(0), false)?;
    assert_eq!(again.flatten_all()?.to_vec1::<f32>()?, ours.flatten_all()?.to_vec1::<f32>()?);
    std::fs::remove_dir_all(&dir)?;
    std::fs::remove_dir_all(&saved)?;
    Ok(())
}

#[test]
fn bert_sequence_classifier_equals_candle_transformers_with_its_head() -> anyhow::Result<()> {
    use candle_fit::train::models::{Bert, BertClassifier, BertConfig, Pooling};
    use candle_nn::Module;
    use candle_transformers::models::bert as reference;
    let mut config = tiny_bert_config("BertForSequenceClassification");
    config["id2label"] = json!({"0": "negative", "1": "neutral", "2": "positive"});
    config["label2id"] = json!({"negative": 0, "neutral": 1, "positive": 2});
    let dir = temp_dir("bert-classifier");
    let parsed: BertConfig = serde_json::from_value(config.clone())?;
    let encoder = Bert::new(&parsed, "bert.", DType::F32, &Device::Cpu, 0)?;
    let shapes: Vec<(String, Vec<usize>)> = BertClassifier::with_pooling(encoder, 3, Pooling::ClsPooler, 0)?
        .parameters()
        .iter()
        .map(|p| (p.name.clone(), p.dims().to_vec()))
        .collect();
    write_folder(&dir, &config, &seeded_tensors(&shapes, 13)?)?;

    // candle-transformers has the encoder; the head is `BertForSequenceClassification`'s:
    // tanh(pooler.dense(CLS)), then `classifier`.
    let (ids, types, mask) = bert_batch()?;
    let cfg: reference::Config = serde_json::from_value(config)?;
    let vb = reference_weights(&dir)?;
    let hidden = reference::BertModel::load(vb.clone(), &cfg)?.forward(&ids, &types, Some(&mask))?;
    let pooler = candle_nn::linear(16, 16, vb.pp("bert.pooler.dense"))?;
    let classifier = candle_nn::linear(16, 3, vb.pp("classifier"))?;
    let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
    let expected = classifier.forward(&pooler.forward(&cls)?.tanh()?)?;
    let (model, labels) = BertClassifier::from_pretrained(&dir, DType::F32, &Device::Cpu)?;
    assert_eq!(labels, ["negative", "neutral", "positive"]);
    let ours = model.logits(&ids, &types, &mask)?;
    let error = relative_error(&ours, &expected)?;
    assert!(error <= TOLERANCE, "relative error {error:e}");

    let saved = dir.with_extension("saved");
    model.save_pretrained(&saved, &labels)?;
    check_same_folder(&dir, &saved)?;
    let (reloaded, _) = BertClassifier::from_pretrained(&saved, DType::F32, &Device::Cpu)?;
    let again = reloaded.logits(&ids, &types, &mask)?;
    assert_eq!(again.flatten_all()?.to_vec1::<f32>()?, ours.flatten_all()?.to_vec1::<f32>()?);
    std::fs::remove_dir_all(&dir)?;
    std::fs::remove_dir_all(&saved)?;
    Ok(())
}

#[test]
fn bert_with_relative_positions_or_another_activation_is_refused() -> anyhow::Result<()> {
    use candle_fit::train::models::BertConfig;
    for (field, value) in [("position_embedding_type", "relative_key"), ("hidden_act", "gelu_new")] {
        let mut config = tiny_bert_config("BertModel");
        config[field] = json!(value);
        let dir = temp_dir(&format!("bert-{field}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("config.json"), config.to_string())?;
        let message = BertConfig::from_json_file(&dir.join("config.json")).expect_err("refused").to_string();
        assert!(message.contains(field) && message.contains(value), "{message}");
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// A tiny GPT-2 config as `transformers` writes it: vocabulary 32, context 16, width 16, 2
/// layers of 4 heads.
fn tiny_gpt2_config() -> Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": 32,
        "n_positions": 16,
        "n_ctx": 16,
        "n_embd": 16,
        "n_layer": 2,
        "n_head": 4,
        "n_inner": null,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": 30,
        "eos_token_id": 30,
    })
}

/// GPT-2's logits from the folder's tensors through candle-nn layers, written out op by op as
/// `transformers`' `GPT2LMHeadModel` computes them (`Conv1D` weights `[in, out]`, the tanh
/// GELU, a causal mask, the head tied to `wte`). candle-transformers has no GPT-2: its
/// `bigcode` (GPT-BigCode) reshapes the fused projection of multi-head attention by the width
/// instead of the head count, so it only runs multi-query models, and `metavoice`'s GPT is not
/// causal.
fn gpt2_reference(dir: &Path, config: &Value, tokens: &[u32]) -> anyhow::Result<Tensor> {
    use candle_nn::Module;
    let vb = reference_weights(dir)?.pp("transformer");
    let (c, heads, layers) = (16, 4, 2);
    let eps = config["layer_norm_epsilon"].as_f64().unwrap_or(1e-5);
    let t = tokens.len();
    let conv1d = |vb: VarBuilder, inp: usize, out: usize| -> candle::Result<candle_nn::Linear> {
        Ok(candle_nn::Linear::new(vb.get((inp, out), "weight")?.t()?, Some(vb.get(out, "bias")?)))
    };
    let wte = vb.get((32, c), "wte.weight")?;
    let positions = Tensor::arange(0u32, t as u32, &Device::Cpu)?;
    let mut h = (candle_nn::Embedding::new(wte.clone(), c).forward(&ids(tokens)?)?
        + candle_nn::Embedding::new(vb.get((16, c), "wpe.weight")?, c).forward(&positions)?.unsqueeze(0)?)?;
    let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
    for i in 0..layers {
        let vb = vb.pp(format!("h.{i}"));
        let x = candle_nn::layer_norm(c, eps, vb.pp("ln_1"))?.forward(&h)?;
        let qkv = conv1d(vb.pp("attn.c_attn"), c, 3 * c)?.forward(&x)?;
        let head = |j: usize| qkv.narrow(2, j * c, c)?.reshape((1, t, heads, c / heads))?.transpose(1, 2);
        let (q, k, v) = (head(0)?.contiguous()?, head(1)?.contiguous()?, head(2)?.contiguous()?);
        let scores = (q.matmul(&k.t()?)? / ((c / heads) as f64).sqrt())?.broadcast_add(&mask)?;
        let y = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?.transpose(1, 2)?.reshape((1, t, c))?;
        h = (h + conv1d(vb.pp("attn.c_proj"), c, c)?.forward(&y)?)?;
        let x = candle_nn::layer_norm(c, eps, vb.pp("ln_2"))?.forward(&h)?;
        let x = conv1d(vb.pp("mlp.c_fc"), c, 4 * c)?.forward(&x)?.gelu()?;
        h = (h + conv1d(vb.pp("mlp.c_proj"), 4 * c, c)?.forward(&x)?)?;
    }
    let h = candle_nn::layer_norm(c, eps, vb.pp("ln_f"))?.forward(&h)?;
    Ok(h.squeeze(0)?.matmul(&wte.t()?)?)
}

#[test]
fn gpt2_equals_the_reference_and_round_trips_with_its_names() -> anyhow::Result<()> {
    use candle_fit::train::models::{gpt2_config, Gpt, GPT2_PREFIX};
    let config = tiny_gpt2_config();
    let shapes: Vec<(String, Vec<usize>)> = Gpt::new(gpt2_config(&config)?, DType::F32, &Device::Cpu, 0)?
        .parameters()
        .iter()
        .map(|p| (format!("{GPT2_PREFIX}{}", p.name), p.dims().to_vec()))
        .collect();
    let mut tensors = seeded_tensors(&shapes, 17)?;
    // The causal-mask buffer old checkpoints carry is ignored.
    tensors
        .insert("transformer.h.0.attn.bias".into(), Tensor::ones((1, 1, 16, 16), DType::F32, &Device::Cpu)?);
    let dir = temp_dir("gpt2");
    write_folder(&dir, &config, &tensors)?;
    let tokens = &TOKENS[..7];
    let expected = gpt2_reference(&dir, &config, tokens)?;
    let model = Gpt::from_pretrained(&dir, DType::F32, &Device::Cpu)?;
    assert_eq!(model.parameters().iter().next().map(|p| p.name.as_str()), Some("transformer.wte.weight"));
    let ours = model.logits(&ids(tokens)?)?.squeeze(0)?;
    let error = relative_error(&ours, &expected)?;
    assert!(error <= TOLERANCE, "relative error {error:e}");

    let saved = dir.with_extension("saved");
    model.save_pretrained(&saved)?;
    std::fs::remove_file(dir.join("model.safetensors"))?;
    tensors.remove("transformer.h.0.attn.bias");
    candle::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    check_same_folder(&dir, &saved)?;
    let reloaded = Gpt::from_pretrained(&saved, DType::F32, &Device::Cpu)?;
    let again = reloaded.logits(&ids(tokens)?)?.squeeze(0)?;
    assert_eq!(again.flatten_all()?.to_vec1::<f32>()?, ours.flatten_all()?.to_vec1::<f32>()?);

    for (field, value, shown) in [
        ("activation_function", json!("relu"), "relu"),
        ("n_inner", json!(40), "40"),
        ("attn_pdrop", json!(0.0), "attn_pdrop"),
        ("scale_attn_by_inverse_layer_idx", json!(true), "true"),
    ] {
        let mut bad = config.clone();
        bad[field] = value;
        std::fs::write(dir.join("config.json"), bad.to_string())?;
        let message = Gpt::from_pretrained(&dir, DType::F32, &Device::Cpu).expect_err("refused").to_string();
        assert!(message.contains(field) && message.contains(shown), "{message}");
    }
    // A tensor no GPT-2 parameter takes is refused by name, not dropped.
    std::fs::write(dir.join("config.json"), config.to_string())?;
    tensors.insert("transformer.h.1.ln_3.weight".into(), Tensor::ones(16, DType::F32, &Device::Cpu)?);
    candle::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let message = Gpt::from_pretrained(&dir, DType::F32, &Device::Cpu).expect_err("refused").to_string();
    assert!(message.contains("transformer.h.1.ln_3.weight"), "{message}");
    std::fs::remove_dir_all(&dir)?;
    std::fs::remove_dir_all(&saved)?;
    Ok(())
}
