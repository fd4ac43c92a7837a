//! Hugging Face PEFT's adapter files: `adapter_config.json` and `adapter_model.safetensors`
//! with tensors named `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`.
//!
//! The module path is the model's own (`model.layers.0.self_attn.q_proj` for LLaMA); a model
//! whose Hugging Face class nests it (GPT-2's `GPT2LMHeadModel` holds the blocks under
//! `transformer.`) passes that as the prefix.

use std::collections::HashSet;
use std::path::Path;

use candle::Tensor;
use serde_json::{json, Value};

use super::{LoraConfig, LoraModel, ALL_LINEAR};
use crate::error::{Error, Result};
use crate::layers::WeightLayout;
use crate::module::Module;
use crate::params::Parameters;

/// The configuration file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What PEFT puts before a module path in the weights file.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// What the adapter files say beyond the [`LoraConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeftInfo {
    /// `task_type` (`CAUSAL_LM`, `SEQ_CLS`, ...), if given.
    pub task_type: Option<String>,
    /// `base_model_name_or_path`, if given.
    pub base_model: Option<String>,
    /// The prefix between `base_model.model.` and this model's module paths (`""` for LLaMA,
    /// `transformer.` for GPT-2's LM head model).
    pub module_prefix: String,
}

impl Default for PeftInfo {
    /// A causal language model with no prefix and no base named.
    fn default() -> Self {
        Self { task_type: Some("CAUSAL_LM".into()), base_model: None, module_prefix: String::new() }
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::MalformedState { path: path.to_path_buf(), reason: reason.into() }
}

/// `adapter_config.json`'s contents for `config` (PEFT's field names and the values that mean
/// what this implementation does: no bias, no DoRA, no per-layer patterns).
pub fn config_json(config: &LoraConfig, fan_in_fan_out: bool, info: &PeftInfo) -> Value {
    let targets: Value = if config.targets.iter().any(|t| t == ALL_LINEAR) {
        Value::String(ALL_LINEAR.into())
    } else {
        json!(config.targets)
    };
    json!({
        "peft_type": "LORA",
        "task_type": info.task_type,
        "base_model_name_or_path": info.base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
    })
}

/// Reads `adapter_config.json`, checking every field this implementation depends on.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read; [`Error::MalformedState`] naming the file and
/// the field: not JSON, `peft_type` other than `LORA`, a missing or mistyped `r`,
/// `lora_alpha`, `target_modules`, a `bias` other than `none`, and any feature this
/// implementation does not have (DoRA, adapter biases, QA-LoRA, `modules_to_save`,
/// `exclude_modules`, per-layer rank or alpha patterns, `layers_to_transform`, layer
/// replication, trainable tokens, parameter targets, regular-expression targets). Fields that
/// do not change the computation (`inference_mode`, `peft_version`, `revision`, ...) are
/// ignored.
pub fn read_config(path: &Path) -> Result<(LoraConfig, bool, PeftInfo)> {
    let bytes = crate::io::read_bounded(path, crate::io::MAX_CONFIG_BYTES)?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| bad(path, format!("not JSON: {e}")))?;
    let Value::Object(map) = value else { return Err(bad(path, "not a JSON object")) };
    let field = |name: &str| map.get(name).filter(|v| !v.is_null());
    let string = |name: &str| -> Result<Option<String>> {
        match field(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(bad(path, format!("`{name}` must be a string, found {v}"))),
        }
    };
    let boolean = |name: &str| -> Result<bool> {
        match field(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(path, format!("`{name}` must be true or false, found {v}"))),
        }
    };
    match string("peft_type")?.as_deref() {
        Some("LORA") => {}
        other => return Err(bad(path, format!("`peft_type` must be \"LORA\", found {other:?}"))),
    }
    let rank = field("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad(path, format!("`r` must be a positive integer, found {:?}", map.get("r"))))?;
    let alpha = field("lora_alpha").and_then(Value::as_f64).ok_or_else(|| {
        bad(path, format!("`lora_alpha` must be a number, found {:?}", map.get("lora_alpha")))
    })?;
    let dropout = match field("lora_dropout") {
        None => 0.0,
        Some(v) => {
            v.as_f64().ok_or_else(|| bad(path, format!("`lora_dropout` must be a number, found {v}")))?
        }
    };
    let targets = match field("target_modules") {
        Some(Value::String(s)) if s == ALL_LINEAR => vec![ALL_LINEAR.to_string()],
        Some(Value::String(s)) => {
            return Err(bad(path, format!("`target_modules` is the regular expression `{s}`: only a list of names or \"all-linear\" is supported")))
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad(path, format!("`target_modules` holds {v}, not a name"))))
            .collect::<Result<Vec<_>>>()?,
        other => return Err(bad(path, format!("`target_modules` must be a list of names, found {other:?}"))),
    };
    match string("bias")?.as_deref() {
        None | Some("none") => {}
        Some(other) => return Err(bad(path, format!("`bias` is \"{other}\": only \"none\" is supported"))),
    }
    for (name, what) in [
        ("use_dora", "DoRA adapters are not supported"),
        ("lora_bias", "adapters with a bias are not supported"),
        ("use_qalora", "QA-LoRA adapters are not supported"),
    ] {
        if boolean(name)? {
            return Err(bad(path, format!("`{name}` is true: {what}")));
        }
    }
    for name in [
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "exclude_modules",
        "target_parameters",
        "trainable_token_indices",
        "layer_replication",
    ] {
        if let Some(v) = field(name).filter(|v| !matches!(v, Value::Array(a) if a.is_empty())) {
            return Err(bad(
                path,
                format!("`{name}` is {v}: not supported (only adapters on linear layers)"),
            ));
        }
    }
    for name in ["rank_pattern", "alpha_pattern"] {
        if let Some(v) = field(name).filter(|v| !matches!(v, Value::Object(m) if m.is_empty())) {
            return Err(bad(path, format!("`{name}` is {v}: per-layer ranks and alphas are not supported")));
        }
    }
    let config = LoraConfig {
        rank: usize::try_from(rank).map_err(|_| bad(path, format!("`r` = {rank} is too large")))?,
        alpha,
        dropout: dropout as f32,
        targets,
        use_rslora: boolean("use_rslora")?,
        quantize_base: None,
    };
    config.validate().map_err(|e| bad(path, e.to_string()))?;
    let fan_in_fan_out = boolean("fan_in_fan_out")?;
    let info = PeftInfo {
        task_type: string("task_type")?,
        base_model: string("base_model_name_or_path")?,
        module_prefix: String::new(),
    };
    Ok((config, fan_in_fan_out, info))
}

/// The name a tensor has in PEFT's weights file.
fn file_name(info: &PeftInfo, name: &str) -> String {
    format!("{PEFT_PREFIX}{}{name}", info.module_prefix)
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (created if needed),
/// each atomically: `adapters` (named `{path}.lora_A.weight`, ...) in their dtype under PEFT's
/// names. What [`LoraModel::save_peft`] and [`crate::nn::Lora::save_peft`] write.
pub(crate) fn write_files(
    dir: &Path,
    config: &LoraConfig,
    fan_in_fan_out: bool,
    adapters: &Parameters,
    info: &PeftInfo,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        action: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    let config = serde_json::to_vec_pretty(&config_json(config, fan_in_fan_out, info))
        .map_err(|e| bad(&dir.join(CONFIG_FILE), e.to_string()))?;
    let tensors = adapters
        .iter()
        .map(|p| Ok((file_name(info, &p.name), p.var()?.as_tensor().clone())))
        .collect::<Result<Vec<(String, Tensor)>>>()?;
    let path = dir.join(WEIGHTS_FILE);
    let weights = safetensors::serialize(tensors, None).map_err(|e| bad(&path, e.to_string()))?;
    crate::io::write_atomic(&path, &weights)?;
    crate::io::write_atomic(&dir.join(CONFIG_FILE), &config)
}

/// Sets `adapters` from a PEFT weights file: each must be present with its shape (converted
/// to the adapter's dtype), and the file must hold no other tensor; nothing changes unless
/// everything matches. What [`LoraModel::load_peft_weights`] and
/// [`crate::nn::Lora::load_peft_weights`] do.
pub(crate) fn load_values(path: &Path, adapters: &Parameters, info: &PeftInfo) -> Result<()> {
    let loaded = crate::io::read_safetensors(path, &adapters.device())?;
    let values = adapters.values_by_name(&loaded, |name| file_name(info, name))?;
    let expected: HashSet<String> = adapters.iter().map(|p| file_name(info, &p.name)).collect();
    if let Some(extra) = loaded.keys().filter(|k| !expected.contains(*k)).min() {
        return Err(bad(path, format!("`{extra}` belongs to no adapted layer of this model (are the targets or the module prefix different?)")));
    }
    for (var, value) in values {
        var.set(&value)?;
    }
    Ok(())
}

impl<M: Module> LoraModel<M> {
    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (created if
    /// needed), each atomically: the adapters in their dtype under PEFT's names.
    ///
    /// # Errors
    /// On I/O or serialization failure; a released adapter.
    pub fn save_peft(&self, dir: &Path, info: &PeftInfo) -> Result<()> {
        let fan_in_fan_out = self.layers.iter().any(|l| l.layout() == WeightLayout::InOut);
        write_files(dir, &self.config, fan_in_fan_out, &self.trainable, info)
    }

    /// Wraps `inner` with the adapters of a PEFT folder: the config read and checked
    /// ([`read_config`]), then every adapter's values loaded ([`LoraModel::load_peft_weights`]).
    /// `module_prefix` is what stands between `base_model.model.` and this model's paths.
    ///
    /// # Errors
    /// As [`read_config`], [`LoraModel::new`] and [`LoraModel::load_peft_weights`].
    pub fn from_peft(inner: M, dir: &Path, module_prefix: &str) -> Result<(Self, PeftInfo)> {
        let (config, _, mut info) = read_config(&dir.join(CONFIG_FILE))?;
        info.module_prefix = module_prefix.to_string();
        let model = Self::new(inner, config, 0)?;
        model.load_peft_weights(&dir.join(WEIGHTS_FILE), &info)?;
        Ok((model, info))
    }

    /// Loads the adapters' values from a PEFT weights file: each must be present with its
    /// shape (converted to the adapter's dtype), and the file must hold no other tensor.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::MalformedState`] for a file that is not safetensors or holds a
    /// tensor no adapter has (naming it); [`Error::StateMismatch`] naming a missing or
    /// misshapen tensor. Nothing changes unless everything matches.
    pub fn load_peft_weights(&self, path: &Path, info: &PeftInfo) -> Result<()> {
        load_values(path, &self.trainable, info)
    }
}
