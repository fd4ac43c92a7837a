//! Hugging Face GPT-2 folders (`GPT2LMHeadModel` / `GPT2Model`: `config.json` and one
//! `model.safetensors`) as a trainable [`Gpt`]: the config's GPT-2 fields mapped onto
//! [`GptConfig`], the options this model does not implement refused by name, and the folder
//! written back with the names and config it was read with.

use std::collections::HashMap;
use std::path::Path;

use candle::{DType, Device};
use serde_json::{json, Map, Value};

use crate::models::gpt::{Gpt, GptConfig};
use crate::params::ParamBuilder;

/// The name prefix `GPT2LMHeadModel` checkpoints give the transformer (`GPT2Model`'s have none).
pub const GPT2_PREFIX: &str = "transformer.";

/// What a [`Gpt`] loaded from a folder keeps to write it back: its parameter-name prefix and
/// every field of the `config.json` read.
#[derive(Debug, Clone)]
pub(crate) struct Gpt2Source {
    pub(crate) prefix: String,
    config: Map<String, Value>,
}

/// The [`GptConfig`] a GPT-2 `config.json` value describes.
///
/// # Errors
/// [`crate::Error::InvalidConfig`] naming the field: a missing or non-integer size, an
/// `activation_function` other than the tanh GELU (`gelu_new`, `gelu_pytorch_tanh`), an
/// `n_inner` other than `4 * n_embd`, differing dropout probabilities (this model has one),
/// `scale_attn_by_inverse_layer_idx` or `add_cross_attention`; then as [`GptConfig::validate`].
pub fn gpt2_config(value: &Value) -> crate::Result<GptConfig> {
    let size = |field: &'static str| -> crate::Result<usize> {
        value
            .get(field)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| crate::Error::config(field, "is missing or not a non-negative integer"))
    };
    let n_embd = size("n_embd")?;
    let activation = value.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
    if !matches!(activation, "gelu_new" | "gelu_pytorch_tanh") {
        return Err(crate::Error::config(
            "activation_function",
            format!("`{activation}` is not supported (supported: gelu_new, gelu_pytorch_tanh)"),
        ));
    }
    match value.get("n_inner") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(4 * n_embd as u64) => {}
        Some(n) => {
            return Err(crate::Error::config(
                "n_inner",
                format!("{n} is not supported (the feed-forward width is 4 * n_embd = {})", 4 * n_embd),
            ))
        }
    }
    for field in ["scale_attn_by_inverse_layer_idx", "add_cross_attention"] {
        if let Some(v) = value.get(field).filter(|v| **v == true) {
            return Err(crate::Error::config(field, format!("{v} is not supported")));
        }
    }
    if let Some(v) = value.get("scale_attn_weights").filter(|v| **v == false) {
        return Err(crate::Error::config("scale_attn_weights", format!("{v} is not supported")));
    }
    let probability = |field: &str| value.get(field).and_then(Value::as_f64).unwrap_or(0.1);
    let dropout = probability("resid_pdrop");
    for field in ["embd_pdrop", "attn_pdrop"] {
        if probability(field) != dropout {
            return Err(crate::Error::config(
                if field == "embd_pdrop" { "embd_pdrop" } else { "attn_pdrop" },
                format!(
                    "{} differs from resid_pdrop = {dropout} (this model has one dropout probability)",
                    probability(field)
                ),
            ));
        }
    }
    let n_positions = match value.get("n_positions") {
        Some(_) => size("n_positions")?,
        None => size("n_ctx")?,
    };
    let config = GptConfig {
        vocab_size: size("vocab_size")?,
        n_ctx: n_positions,
        n_embd,
        n_layer: size("n_layer")?,
        n_head: size("n_head")?,
        dropout: dropout as f32,
        layer_norm_eps: value.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-5),
    };
    config.validate()?;
    Ok(config)
}

impl Gpt {
    /// A GPT-2 model saved as a Hugging Face folder (`config.json`, one `model.safetensors`
    /// with the `GPT2Model` names or the `transformer.`-prefixed `GPT2LMHeadModel` ones; the
    /// attention-mask buffers and a tied `lm_head.weight` are ignored), converted to `dtype`.
    ///
    /// # Errors
    /// [`crate::Error::Io`] for an unreadable file, [`crate::Error::InvalidConfig`] naming the
    /// config's unsupported or bad field ([`gpt2_config`]), [`crate::Error::MalformedState`] for
    /// a file that is not safetensors, [`crate::Error::StateMismatch`] naming a missing or
    /// misshapen tensor (or an `lm_head.weight` that is not the token embedding).
    pub fn from_pretrained(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config_path = dir.join("config.json");
        let bytes = crate::io::read_bounded(&config_path, crate::io::MAX_CONFIG_BYTES)?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| crate::Error::config("config.json", e.to_string()))?;
        let config = gpt2_config(&value)?;
        let path = dir.join("model.safetensors");
        let bytes = crate::io::read_bounded(&path, crate::io::MAX_STATE_BYTES)?;
        let tensors: HashMap<String, candle::Tensor> = candle::safetensors::load_buffer(&bytes, device)
            .map_err(|e| crate::Error::MalformedState { path: path.clone(), reason: e.to_string() })?;
        let prefix = if tensors.contains_key(&format!("{GPT2_PREFIX}wte.weight")) { GPT2_PREFIX } else { "" };
        if let Some(head) = tensors.get("lm_head.weight") {
            let wte = tensors.get(&format!("{prefix}wte.weight"));
            let tied = match wte {
                Some(wte) if wte.dims() == head.dims() => {
                    (wte - head)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?
                        == 0.0
                }
                _ => false,
            };
            if !tied {
                return Err(crate::Error::StateMismatch {
                    name: "lm_head.weight".into(),
                    expected: format!("the token embedding {prefix}wte.weight (GPT-2 ties them)"),
                    found: "a different tensor".into(),
                });
            }
        }
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        let mut model =
            Self::build(config, ParamBuilder::from_values(dtype, device.clone(), tensors), prefix)?;
        let known: std::collections::HashSet<&str> =
            model.parameters().iter().map(|p| p.name.as_str()).collect();
        // The attention-mask buffers and the (checked) tied head carry no parameter.
        let ignorable = |name: &str| {
            name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name == "lm_head.weight"
        };
        if let Some(unused) = names.iter().find(|n| !known.contains(n.as_str()) && !ignorable(n)) {
            return Err(crate::Error::StateMismatch {
                name: unused.clone(),
                expected: "no such tensor: a GPT-2 model has no parameter of this name".into(),
                found: format!("a tensor in {}", path.display()),
            });
        }
        let config = value.as_object().cloned().unwrap_or_default();
        model.source = Some(Gpt2Source { prefix: prefix.to_string(), config });
        Ok(model)
    }

    /// Writes `config.json` (the config read, every field kept, with the shape fields and
    /// `torch_dtype` set from the model; a `GPT2LMHeadModel` config for a model not loaded from
    /// a folder) and `model.safetensors` (every parameter under the names it was read with, in
    /// the parameters' dtype; the tied head is not written twice) into `dir`, creating it;
    /// each file atomically.
    ///
    /// # Errors
    /// [`crate::Error::Io`] on a file-system error.
    pub fn save_pretrained(&self, dir: &Path) -> crate::Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io("create", dir, e))?;
        let (mut config, prefix) = match &self.source {
            Some(source) => (source.config.clone(), source.prefix.as_str()),
            None => (Map::new(), ""),
        };
        let c = self.config();
        let mut set = |key: &str, value: Value| {
            config.insert(key.to_string(), value);
        };
        set("vocab_size", json!(c.vocab_size));
        set("n_positions", json!(c.n_ctx));
        set("n_embd", json!(c.n_embd));
        set("n_layer", json!(c.n_layer));
        set("n_head", json!(c.n_head));
        set("layer_norm_epsilon", json!(c.layer_norm_eps));
        set("torch_dtype", json!(crate::models::llama::hf_dtype_name(self.dtype())));
        if self.source.is_none() {
            set("architectures", json!(["GPT2LMHeadModel"]));
            set("model_type", json!("gpt2"));
            set("n_ctx", json!(c.n_ctx));
            set("activation_function", json!("gelu_new"));
            // The shortest decimal of the F32 probability (0.1, not 0.10000000149011612).
            let dropout: f64 = c.dropout.to_string().parse().unwrap_or(f64::from(c.dropout));
            for field in ["resid_pdrop", "embd_pdrop", "attn_pdrop"] {
                set(field, json!(dropout));
            }
        }
        let text = serde_json::to_string_pretty(&Value::Object(config))
            .map_err(|e| crate::Error::config("config.json", e.to_string()))?;
        crate::io::write_atomic(&dir.join("config.json"), text.as_bytes())?;
        let path = dir.join("model.safetensors");
        debug_assert!(self.parameters().iter().all(|p| p.name.starts_with(prefix)));
        self.parameters().save_safetensors(&path)
    }
}
