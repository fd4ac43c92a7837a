//! A trainable LLaMA-family decoder under Hugging Face parameter names: RMSNorm, rotary
//! positions in the half-split form, grouped-query attention, a SwiGLU feed-forward block and a
//! tied or untied head. One model covers the family's members, chosen by `model_type`
//! ([`DecoderFamily`]): LLaMA 2/3 (SmolLM2; LLaMA 3.1's `llama3` rope scaling; `attention_bias`),
//! Mistral (a `sliding_window` is honoured for sequences that fit in it and refused beyond),
//! Qwen2 (biases on the query, key and value projections) and Qwen3 (an RMSNorm over each query
//! and key head; an explicit `head_dim`). Cut into segments for the recompute engine:
//! embedding, one per decoder layer, final norm + head + loss.
//!
//! Every op has a backward (our norms, rotary, softmax and cross-entropy; Candle's matmul and
//! `silu`). In BF16/F16 the residual stream stays F32 and only the layers' matmuls run in the
//! half type, as in [`crate::models::Gpt`]. The model has no dropout (LLaMA's default).

use std::collections::HashMap;
use std::path::Path;

use candle::{DType, Device, Result, Tensor};
use candle_ckpt::SegmentContext;
use serde::{Deserialize, Serialize};

use crate::device::reduction_dtype;
use crate::layers::ops::residual_add;
use crate::layers::rotary::llama3_inverse_frequencies;
use crate::layers::{
    AttentionOptions, Embedding, GroupedQueryAttention, Linear, RmsNorm, Rotary, SwiGlu, WeightLayout,
};
use crate::models::TokenBatch;
use crate::module::{parameters_of, Forward, ForwardContext, Module, ModuleBuilder, Stacked};
use crate::params::{ParamBuilder, Parameter, Parameters};

/// The members of the LLaMA family this model implements, by their `config.json`
/// `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DecoderFamily {
    /// `llama` (`LlamaForCausalLM`): LLaMA 2/3, SmolLM2. Biases on all four attention
    /// projections with `attention_bias`.
    #[default]
    Llama,
    /// `mistral` (`MistralForCausalLM`): no biases; an attention window (`sliding_window`).
    Mistral,
    /// `qwen2` (`Qwen2ForCausalLM`): biases on `q_proj`, `k_proj`, `v_proj` (always).
    Qwen2,
    /// `qwen3` (`Qwen3ForCausalLM`): `q_norm`, `k_norm` over each head; biases with
    /// `attention_bias`.
    Qwen3,
}

impl DecoderFamily {
    /// Every member, in the order errors list them.
    pub const ALL: [DecoderFamily; 4] =
        [DecoderFamily::Llama, DecoderFamily::Mistral, DecoderFamily::Qwen2, DecoderFamily::Qwen3];

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            DecoderFamily::Llama => "llama",
            DecoderFamily::Mistral => "mistral",
            DecoderFamily::Qwen2 => "qwen2",
            DecoderFamily::Qwen3 => "qwen3",
        }
    }

    /// The `transformers` class (`architectures[0]` of `config.json`).
    pub fn architecture(self) -> &'static str {
        match self {
            DecoderFamily::Llama => "LlamaForCausalLM",
            DecoderFamily::Mistral => "MistralForCausalLM",
            DecoderFamily::Qwen2 => "Qwen2ForCausalLM",
            DecoderFamily::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The member whose `model_type` is `name`.
    pub fn from_model_type(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == name)
    }

    /// The member whose `transformers` class is `name`.
    pub fn from_architecture(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.architecture() == name)
    }
}

impl TryFrom<String> for DecoderFamily {
    type Error = String;

    fn try_from(name: String) -> std::result::Result<Self, String> {
        Self::from_model_type(&name).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|f| f.model_type()).collect();
            format!("model_type `{name}` is not supported (supported: {})", known.join(", "))
        })
    }
}

impl From<DecoderFamily> for String {
    fn from(family: DecoderFamily) -> String {
        family.model_type().to_string()
    }
}

/// The fields of a Hugging Face LLaMA-family `config.json` this model uses; every other field
/// is kept in [`LlamaConfig::extra`] and written back, so a loaded-and-saved folder has the
/// config it was read from. Serialises back to a `config.json` Hugging Face loads
/// ([`LlamaConfig::to_hf_json`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which member of the family (`model_type`; `llama` when absent).
    #[serde(default)]
    pub model_type: DecoderFamily,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads; divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// The longest sequence the model accepts (the rotary tables' length).
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Whether the head reuses the token embedding (`lm_head.weight` absent).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// The activation; only `"silu"` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// The dimension of one attention head when it is not `hidden_size / num_attention_heads`
    /// (Qwen3; some Mistral checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Biases on the attention projections: on all four for `llama` and `qwen3` (`mistral`
    /// ignores it, `qwen2` always has them on the query, key and value projections, as
    /// `transformers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// The attention window of `mistral` (and of `qwen2`/`qwen3` with `use_sliding_window`):
    /// sequences that fit in it are computed exactly, longer ones refused (windowed attention is
    /// not implemented). Written back as read (`null` included).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Whether `qwen2`/`qwen3` use [`LlamaConfig::sliding_window`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// The rope scaling rule, as read: absent, `null`, `rope_type` `default`, or `llama3` (with
    /// `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
    /// Other kinds are refused by [`LlamaConfig::validate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Every other field of the `config.json` read (`architectures`, token ids, `torch_dtype`,
    /// ...), written back unchanged.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// LLaMA 3.1's rope scaling parameters (`rope_scaling` with `rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// `factor`.
    pub factor: f32,
    /// `low_freq_factor`.
    pub low_freq_factor: f32,
    /// `high_freq_factor`.
    pub high_freq_factor: f32,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: usize,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// SmolLM2-135M's shape (as its `config.json` and GGUF metadata give it).
    pub fn smollm2_135m() -> Self {
        Self {
            vocab_size: 49_152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            tie_word_embeddings: true,
            hidden_act: "silu".into(),
            ..Self::tiny()
        }
    }

    /// A small configuration for tests: 2 layers, width 16, 4 query heads sharing 2 key/value
    /// heads, vocabulary 23, untied head.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 23,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            hidden_act: "silu".into(),
            model_type: DecoderFamily::Llama,
            head_dim: None,
            attention_bias: None,
            sliding_window: None,
            use_sliding_window: None,
            rope_scaling: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Reads a Hugging Face `config.json`.
    ///
    /// # Errors
    /// [`crate::Error::Io`] if the file cannot be read, [`crate::Error::InvalidConfig`] if it
    /// does not parse or describes a model this one does not implement.
    pub fn from_json_file(path: &Path) -> crate::Result<Self> {
        let config: Self = crate::io::read_json_config(path)?;
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` Hugging Face `transformers` reads for this shape
    /// (`LlamaForCausalLM`), with `torch_dtype` naming `dtype`.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] if the config does not serialise (it always does).
    pub fn to_hf_json(&self, dtype: DType) -> crate::Result<String> {
        let mut value =
            serde_json::to_value(self).map_err(|e| crate::Error::config("config.json", e.to_string()))?;
        if let Some(map) = value.as_object_mut() {
            if !map.contains_key("architectures") {
                map.insert("architectures".into(), serde_json::json!([self.model_type.architecture()]));
            }
            if !map.get("head_dim").is_some_and(|d| d.is_u64()) {
                map.insert("head_dim".into(), self.head_dim().into());
            }
            map.insert("torch_dtype".into(), hf_dtype_name(dtype).into());
            if self.model_type == DecoderFamily::Llama && self.sliding_window.is_none() {
                // LLaMA has no window; `null` here would only be noise.
                map.remove("sliding_window");
            }
        }
        serde_json::to_string_pretty(&value).map_err(|e| crate::Error::config("config.json", e.to_string()))
    }

    /// The dimension of one attention head (`head_dim`, else `hidden_size /
    /// num_attention_heads`).
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The attention block's variant for this member of the family.
    pub fn attention_options(&self) -> AttentionOptions {
        let bias = self.attention_bias.unwrap_or(false);
        match self.model_type {
            DecoderFamily::Llama => AttentionOptions { qkv_bias: bias, o_bias: bias, qk_norm_eps: None },
            DecoderFamily::Mistral => AttentionOptions::default(),
            DecoderFamily::Qwen2 => AttentionOptions { qkv_bias: true, o_bias: false, qk_norm_eps: None },
            DecoderFamily::Qwen3 => {
                AttentionOptions { qkv_bias: bias, o_bias: bias, qk_norm_eps: Some(self.rms_norm_eps) }
            }
        }
    }

    /// The attention window that applies, if any: `mistral`'s `sliding_window`, or `qwen2`'s and
    /// `qwen3`'s with `use_sliding_window`. Sequences longer than it are refused.
    pub fn attention_window(&self) -> Option<usize> {
        match self.model_type {
            DecoderFamily::Llama => None,
            DecoderFamily::Mistral => self.sliding_window,
            DecoderFamily::Qwen2 | DecoderFamily::Qwen3 => {
                self.sliding_window.filter(|_| self.use_sliding_window == Some(true))
            }
        }
    }

    /// The longest sequence the model computes: `max_position_embeddings`, or the attention
    /// window when shorter.
    pub fn max_sequence_len(&self) -> usize {
        self.attention_window().map_or(self.max_position_embeddings, |w| w.min(self.max_position_embeddings))
    }

    /// The LLaMA 3.1 rope scaling, when `rope_scaling` sets one (`None` for no scaling).
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] naming `rope_scaling` for a kind other than `default` or
    /// `llama3`, or a missing or non-numeric parameter.
    pub fn llama3_rope_scaling(&self) -> crate::Result<Option<Llama3RopeScaling>> {
        let Some(scaling) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|k| k.as_str());
        match kind {
            Some("default") => Ok(None),
            Some("llama3") => {
                let number = |field: &str| {
                    scaling.get(field).and_then(|v| v.as_f64()).ok_or_else(|| {
                        crate::Error::config(
                            "rope_scaling",
                            format!("`{field}` is missing or not a number (rope_type `llama3`)"),
                        )
                    })
                };
                let scaling = Llama3RopeScaling {
                    factor: number("factor")? as f32,
                    low_freq_factor: number("low_freq_factor")? as f32,
                    high_freq_factor: number("high_freq_factor")? as f32,
                    original_max_position_embeddings: number("original_max_position_embeddings")? as usize,
                };
                let positive = scaling.factor > 0.0
                    && scaling.low_freq_factor > 0.0
                    && scaling.high_freq_factor > scaling.low_freq_factor
                    && scaling.original_max_position_embeddings > 0;
                if !positive {
                    return Err(crate::Error::config(
                        "rope_scaling",
                        format!("llama3 parameters {scaling:?} need positive factors, high above low"),
                    ));
                }
                Ok(Some(scaling))
            }
            other => Err(crate::Error::config(
                "rope_scaling",
                format!(
                    "rope_type {} is not supported (supported: default, llama3)",
                    other.map_or_else(|| scaling.to_string(), |k| format!("`{k}`"))
                ),
            )),
        }
    }

    /// The rotary tables for this config (with its rope scaling) on `device`.
    ///
    /// # Errors
    /// As [`LlamaConfig::llama3_rope_scaling`] and [`Rotary::new`].
    pub fn rotary(&self, device: &Device) -> crate::Result<Rotary> {
        match self.llama3_rope_scaling()? {
            None => Rotary::new(self.head_dim(), self.max_position_embeddings, self.rope_theta, device),
            Some(s) => {
                let inv_freq = llama3_inverse_frequencies(
                    self.head_dim(),
                    self.rope_theta,
                    s.factor,
                    s.low_freq_factor,
                    s.high_freq_factor,
                    s.original_max_position_embeddings,
                );
                Rotary::from_inverse_frequencies(&inv_freq, self.max_position_embeddings, device)
            }
        }
    }

    /// Checks that every field is usable.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] naming the first bad field.
    pub fn validate(&self) -> crate::Result<()> {
        super::check_positive(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        match self.head_dim {
            Some(d) if d == 0 || d % 2 != 0 => {
                return Err(crate::Error::config("head_dim", format!("{d} is not a positive even number")));
            }
            Some(_) => {}
            None if self.hidden_size % self.num_attention_heads != 0 || self.head_dim() % 2 != 0 => {
                return Err(crate::Error::config(
                    "num_attention_heads",
                    format!(
                        "{} heads do not split the width {} into heads of an even dimension",
                        self.num_attention_heads, self.hidden_size
                    ),
                ));
            }
            None => {}
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(crate::Error::config(
                "num_key_value_heads",
                format!(
                    "{} key/value heads do not divide {} query heads",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(crate::Error::config("rms_norm_eps", "must be positive"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(crate::Error::config("rope_theta", "must be positive"));
        }
        if self.hidden_act != "silu" {
            return Err(crate::Error::config(
                "hidden_act",
                format!("`{}` is not supported (supported: silu)", self.hidden_act),
            ));
        }
        if self.sliding_window == Some(0) {
            return Err(crate::Error::config("sliding_window", "must be at least 1"));
        }
        if let Some(bias) = self.extra.get("mlp_bias").filter(|b| !b.is_null() && **b != false) {
            return Err(crate::Error::config(
                "mlp_bias",
                format!("{bias} is not supported (the feed-forward block has no biases)"),
            ));
        }
        self.llama3_rope_scaling()?;
        let architecture =
            self.extra.get("architectures").and_then(|a| a.get(0)).and_then(serde_json::Value::as_str);
        if let Some(architecture) = architecture.filter(|a| *a != self.model_type.architecture()) {
            return Err(crate::Error::config(
                "architectures",
                format!(
                    "`{architecture}` does not match model_type `{}` (expected `{}`)",
                    self.model_type.model_type(),
                    self.model_type.architecture()
                ),
            ));
        }
        Ok(())
    }

    /// The number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim());
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let options = self.attention_options();
        let biases = if options.qkv_bias { q + 2 * kv } else { 0 } + if options.o_bias { h } else { 0 };
        let head_norms = if options.qk_norm_eps.is_some() { 2 * d } else { 0 };
        let layer = 2 * h + h * q + 2 * h * kv + q * h + 3 * h * i + biases + head_norms;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }
}

/// Whether `name` is the weight of a decoder layer's affine map (`model.layers.{i}.self_attn.
/// {q,k,v,o}_proj.weight`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`): the weights
/// QLoRA holds quantized (the embedding, the norms and the head stay dense, as bitsandbytes
/// leaves the head).
pub fn is_base_linear(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else { return false };
    let Some((layer, part)) = rest.split_once('.') else { return false };
    layer.parse::<usize>().is_ok()
        && matches!(
            part,
            "self_attn.q_proj.weight"
                | "self_attn.k_proj.weight"
                | "self_attn.v_proj.weight"
                | "self_attn.o_proj.weight"
                | "mlp.gate_proj.weight"
                | "mlp.up_proj.weight"
                | "mlp.down_proj.weight"
        )
}

/// Takes every decoder-layer affine weight ([`is_base_linear`]) out of `tensors` and returns it
/// quantized as `quantization` says, one at a time (each dense weight is dropped once
/// quantized), in name order.
///
/// # Errors
/// As [`crate::quant::BaseQuantization::quantize`], naming the weight.
pub fn quantize_linears(
    tensors: &mut HashMap<String, Tensor>,
    quantization: crate::quant::BaseQuantization,
) -> crate::Result<Vec<crate::quant::QuantizedWeight>> {
    let mut names: Vec<String> = tensors.keys().filter(|n| is_base_linear(n)).cloned().collect();
    names.sort();
    let mut quantized = Vec::with_capacity(names.len());
    for name in names {
        if let Some(dense) = tensors.remove(&name) {
            quantized.push(quantization.quantize(&name, &dense)?);
        }
    }
    Ok(quantized)
}

/// The name `transformers` gives `dtype` in a `config.json`'s `torch_dtype`.
pub fn hf_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// One decoder layer `model.layers.{i}`: RMSNorm, grouped-query attention, RMSNorm, SwiGLU,
/// each branch added to the residual.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: GroupedQueryAttention,
    post_attention_layernorm: RmsNorm,
    mlp: SwiGlu,
    /// The model's rotary tables (shared, not copied).
    rotary: Rotary,
    /// The matmuls' dtype (the parameters'); the residual stream stays in F32 under a half type.
    dtype: DType,
}

crate::module_fields!(DecoderLayer { input_layernorm, self_attn, post_attention_layernorm, mlp });

impl DecoderLayer {
    fn build(b: &ModuleBuilder, config: &LlamaConfig, rotary: &Rotary, std: f64) -> crate::Result<Self> {
        let (h, eps) = (config.hidden_size, config.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::build(&b.pp("input_layernorm"), h, eps)?,
            self_attn: GroupedQueryAttention::build_with(
                &b.pp("self_attn"),
                h,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim(),
                std,
                config.attention_options(),
            )?,
            post_attention_layernorm: RmsNorm::build(&b.pp("post_attention_layernorm"), h, eps)?,
            mlp: SwiGlu::build(&b.pp("mlp"), h, config.intermediate_size, std)?,
            rotary: rotary.clone(),
            dtype: b.dtype(),
        })
    }
}

impl Forward for DecoderLayer {
    /// The layer on the residual stream `x` (no dropout: the context is not drawn from).
    fn forward(&self, x: &Tensor, _: &mut ForwardContext) -> Result<Tensor> {
        self.residual_branches(x, |normed| self.self_attn.forward(normed, &self.rotary))
    }
}

impl DecoderLayer {
    /// The layer on the new positions `x` over `cache` (this layer's keys and values), which
    /// it extends.
    fn forward_cached(&self, x: &Tensor, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        self.residual_branches(x, |normed| self.self_attn.forward_cached(normed, &self.rotary, cache))
    }

    /// Pre-norm attention (`attention` on the normed stream), then the pre-norm MLP, each
    /// added to the residual stream `x`.
    fn residual_branches(
        &self,
        x: &Tensor,
        attention: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let x = residual_add(x, &attention(&self.input_layernorm.forward_as(x, self.dtype)?)?)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward_as(&x, self.dtype)?)?;
        residual_add(&x, &mlp)
    }
}

/// The keys and values of the positions a causal language model has seen, per layer, for
/// decoding one token at a time ([`Llama::logits_cached`], [`crate::models::Gpt::logits_cached`]).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(crate) len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The name of the token embedding, which the head reuses when the embeddings are tied.
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";

/// A LLaMA-family causal language model (`LlamaForCausalLM`).
///
/// Segments: `0` the token embedding, `1..=num_hidden_layers` the decoder layers
/// `model.layers.{i}`, and the last the final norm `model.norm`, the head (`lm_head`, or the
/// embedding when tied) and the cross-entropy loss (computed in F32).
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    params: Parameters,
    dtype: DType,
}

impl Llama {
    /// A randomly initialised model in `dtype` on `device` (N(0, 0.02²) weights, norms at 1,
    /// as Hugging Face initialises LLaMA), drawn from `seed`.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for a bad config; allocation failure.
    pub fn new(config: &LlamaConfig, dtype: DType, device: &Device, seed: u64) -> crate::Result<Self> {
        config.validate()?;
        Self::build(config, ParamBuilder::new(dtype, device.clone(), seed))
    }

    /// A model whose parameters take their values from `tensors`, by Hugging Face name
    /// (converted to `dtype`); extra tensors are ignored.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for a bad config, [`crate::Error::StateMismatch`]
    /// naming the first missing or misshapen tensor.
    pub fn from_tensors(
        config: &LlamaConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        config.validate()?;
        Self::build(config, ParamBuilder::from_values(dtype, device.clone(), tensors))
    }

    /// A model whose decoder layers' affine weights are the quantized `quantized` (by Hugging
    /// Face name, such as those [`quantize_linears`] makes; QLoRA's frozen base,
    /// [`crate::quant`]) and whose other parameters take their values from `tensors`, as
    /// [`Llama::from_tensors`]. No dense copy of a quantized weight is made; the quantized
    /// layers are frozen and compute through [`crate::quant::quantized_linear`]. A quantized
    /// weight whose blocks are on another device is moved to `device`.
    ///
    /// # Errors
    /// As [`Llama::from_tensors`]; [`crate::Error::StateMismatch`] for a quantized weight of the
    /// wrong shape, [`crate::Error::InvalidConfig`] naming a quantized weight no layer takes.
    pub fn from_tensors_quantized(
        config: &LlamaConfig,
        tensors: HashMap<String, Tensor>,
        quantized: Vec<crate::quant::QuantizedWeight>,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        config.validate()?;
        // The blocks live on the model's device (moved there when they were made elsewhere).
        let quantized =
            quantized.into_iter().map(|q| q.to_device(device)).collect::<candle::Result<Vec<_>>>()?;
        Self::build(
            config,
            ParamBuilder::from_values(dtype, device.clone(), tensors).with_quantized(quantized),
        )
    }

    /// This model with its decoder layers' affine weights quantized as `quantization` says
    /// (QLoRA's frozen base; [`crate::quant::BaseQuantization::Gguf`] is refused: a dense model
    /// has no file blocks). The dense weights are released one by one as they are quantized;
    /// loading the base quantized ([`crate::models::GgufFile::llama_quantized`]) avoids
    /// holding them at all.
    ///
    /// # Errors
    /// As [`quantize_linears`] and [`Llama::from_tensors_quantized`]; a released parameter.
    pub fn quantize_base(self, quantization: crate::quant::BaseQuantization) -> crate::Result<Self> {
        let (config, dtype, device) = (self.config.clone(), self.dtype, self.device());
        if !self.quantized_weights().is_empty() {
            return Err(crate::Error::config("quantize_base", "the base is quantized already"));
        }
        let mut tensors = HashMap::with_capacity(self.params.len());
        for p in self.params.iter() {
            tensors.insert(p.name.clone(), p.tensor()?.detach());
        }
        drop(self);
        let quantized = quantize_linears(&mut tensors, quantization)?;
        Self::from_tensors_quantized(&config, tensors, quantized, dtype, &device)
    }

    /// A model with the weights of a Hugging Face safetensors file (such as one
    /// [`Llama::save_pretrained`] wrote), converted to `dtype`.
    ///
    /// # Errors
    /// [`crate::Error::Io`] if the file cannot be read, [`crate::Error::MalformedState`] if it
    /// is not safetensors, then as [`Llama::from_tensors`].
    pub fn from_safetensors(
        config: &LlamaConfig,
        path: &Path,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        let tensors = crate::io::read_safetensors(path, device)?;
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        let model = Self::from_tensors(config, tensors, dtype, device)?;
        // A tensor the config gives no parameter for (a bias with `attention_bias` unset, a
        // head norm under the wrong `model_type`) would be silently dropped: refuse it.
        let known: std::collections::HashSet<&str> = model.params.iter().map(|p| p.name.as_str()).collect();
        let ignorable = |name: &str| {
            name.ends_with(".rotary_emb.inv_freq") || (name == "lm_head.weight" && config.tie_word_embeddings)
        };
        if let Some(unused) = names.iter().find(|n| !known.contains(n.as_str()) && !ignorable(n)) {
            return Err(crate::Error::StateMismatch {
                name: unused.clone(),
                expected: format!(
                    "no such tensor: config.json (model_type `{}`) describes no parameter of this name",
                    config.model_type.model_type()
                ),
                found: format!("a tensor in {}", path.display()),
            });
        }
        Ok(model)
    }

    /// A model saved by [`Llama::save_pretrained`] (or any Hugging Face LLaMA directory with a
    /// single `model.safetensors`): `config.json` and `model.safetensors` in `dir`.
    ///
    /// # Errors
    /// As [`LlamaConfig::from_json_file`] and [`Llama::from_safetensors`].
    pub fn from_pretrained(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config = LlamaConfig::from_json_file(&dir.join("config.json"))?;
        Self::from_safetensors(&config, &dir.join("model.safetensors"), dtype, device)
    }

    /// Writes `config.json` and `model.safetensors` (every parameter under its Hugging Face
    /// name, in the parameters' dtype; a tied head is not written twice, as `transformers`
    /// saves it) into `dir`, creating it. Each file is written atomically.
    ///
    /// # Errors
    /// [`crate::Error::Io`] on a file-system error.
    pub fn save_pretrained(&self, dir: &Path) -> crate::Result<()> {
        if let Some(name) = self.quantized_weights().first().map(|q| q.name().to_string()) {
            return Err(crate::Error::config(
                "save_pretrained",
                format!("the base is quantized (`{name}`, ...): save the LoRA adapter instead"),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io("create", dir, e))?;
        let config = self.config.to_hf_json(self.dtype)?;
        crate::io::write_atomic(&dir.join("config.json"), config.as_bytes())?;
        self.params.save_safetensors(&dir.join("model.safetensors"))
    }

    fn build(config: &LlamaConfig, pb: ParamBuilder) -> crate::Result<Self> {
        let std = 0.02;
        let (dtype, device) = (pb.dtype(), pb.device().clone());
        let b = ModuleBuilder::new(pb);
        let model = b.pp("model");
        let embed_tokens =
            Embedding::build(&model.pp("embed_tokens"), config.vocab_size, config.hidden_size, std)?;
        let rotary = config.rotary(&device)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::build(&model.pp("layers").pp(i), config, &rotary, std))
            .collect::<crate::Result<_>>()?;
        let norm = RmsNorm::build(&model.pp("norm"), config.hidden_size, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            let head = b.pp("lm_head");
            Some(Linear::build_no_bias(
                &head,
                config.hidden_size,
                config.vocab_size,
                WeightLayout::OutIn,
                std,
            )?)
        };
        if let Some(name) = b.untaken_quantized().first() {
            return Err(crate::Error::config(
                "quantize_base",
                format!("the quantized weight `{name}` has no affine layer of that name in the model"),
            ));
        }
        let params = b.finish();
        Ok(Self { config: config.clone(), embed_tokens, layers, norm, lm_head, params, dtype })
    }

    /// The quantized affine weights (QLoRA's frozen base), in the layers' order; empty for a
    /// dense model.
    pub fn quantized_weights(&self) -> Vec<std::sync::Arc<crate::quant::QuantizedWeight>> {
        let mut found = Vec::new();
        self.visit_linears(&mut |l| {
            if let Some(q) = l.quantized() {
                found.push(std::sync::Arc::clone(q));
            }
        });
        found
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// All parameters, in creation order, under their Hugging Face names.
    pub fn parameters(&self) -> &Parameters {
        &self.params
    }

    /// The dtype of the parameters (and the matmuls).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype of the residual stream: F32 when the parameters are in a half type (as under
    /// PyTorch autocast), else the parameters' dtype.
    pub fn residual_dtype(&self) -> DType {
        reduction_dtype(self.dtype)
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.params.device()
    }

    /// The logits `[batch, t, vocab]` (in the parameters' dtype) for token ids `[batch, t]`.
    ///
    /// # Errors
    /// On a sequence longer than `max_position_embeddings`, an id out of range, or a tensor
    /// error.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let h = self.embed_ids(ids)?;
        self.head_logits(&crate::module::stack::forward_blocks(&self.layers, h, &SegmentContext::eval())?)
    }

    /// The logits `[batch, t, vocab]` of the new tokens `ids` (`[batch, t]`) following the
    /// positions in `cache`, which grows by `t`: the prompt in one call with an empty cache,
    /// then one token per call. Equal, up to float rounding, to the last `t` rows of
    /// [`Llama::logits`] on the whole sequence.
    ///
    /// # Errors
    /// Several tokens over a non-empty cache; a sequence longer than
    /// `max_position_embeddings`; as [`Llama::logits`].
    pub fn logits_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        self.check_length(cache.len + t)?;
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let mut h = self.embed_ids(ids)?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward_cached(&h, layer_cache)?;
        }
        cache.len += t;
        self.head_logits(&h)
    }

    /// The mean next-token cross-entropy (nats per token, F32) of `batch`, without a graph
    /// kept beyond one segment (evaluation through the engine's `forward`).
    ///
    /// # Errors
    /// As [`Llama::logits`].
    pub fn loss(&self, batch: &TokenBatch) -> Result<Tensor> {
        candle_ckpt::forward(self, batch, SegmentContext::eval())
    }

    fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        self.check_length(t)?;
        let vocab = self.config.vocab_size;
        let largest = ids.to_dtype(DType::U32)?.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if largest >= vocab {
            candle::bail!("token id {largest} is out of the vocabulary of {vocab}");
        }
        self.embed_tokens.forward(ids)?.to_dtype(self.residual_dtype())
    }

    /// Refuses a sequence of `len` tokens beyond the positions or the attention window.
    fn check_length(&self, len: usize) -> Result<()> {
        let positions = self.config.max_position_embeddings;
        if len > positions {
            candle::bail!("sequence of {len} tokens exceeds the model's {positions} positions");
        }
        if let Some(window) = self.config.attention_window().filter(|w| len > *w) {
            candle::bail!(
                "sequence of {len} tokens exceeds the attention window (config.json `sliding_window` = \
                 {window}); windowed attention is not implemented, so longer sequences are refused"
            );
        }
        Ok(())
    }

    fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward_as(h, self.dtype)?;
        match &self.lm_head {
            Some(head) => head.forward(&h),
            None => self.embed_tokens.tied_logits(&h),
        }
    }
}

impl Stacked for Llama {
    type Batch = TokenBatch;
    type Block = DecoderLayer;

    fn blocks(&self) -> &[DecoderLayer] {
        &self.layers
    }

    fn block_path(&self) -> String {
        "model.layers".into()
    }

    fn first_input(&self, batch: &TokenBatch) -> Result<Tensor> {
        Ok(batch.inputs.clone())
    }

    fn embed(&self, input: &Tensor, _: &TokenBatch, _: &SegmentContext) -> Result<Tensor> {
        self.embed_ids(input)
    }

    fn head(&self, x: &Tensor, batch: &TokenBatch, _: &SegmentContext) -> Result<Tensor> {
        batch.loss(&self.head_logits(x)?)
    }

    fn embedding_parameters(&self) -> Vec<Parameter> {
        self.embed_tokens.parameters()
    }

    fn head_parameters(&self) -> Vec<Parameter> {
        let head: &dyn Module = match &self.lm_head {
            Some(head) => head,
            None => &self.embed_tokens,
        };
        parameters_of(&[&self.norm, head])
    }
}

crate::segmented_stack!(Llama);

crate::module_fields!(Llama { embed_tokens, layers, norm, lm_head });

impl crate::serve::Snapshot for Llama {
    /// A copy with its own variables (same names, values and dtype); a quantized base (QLoRA's,
    /// immutable) is shared with the copy, not copied.
    fn snapshot(&self) -> crate::Result<Self> {
        let values = self.params.detached_values()?;
        Self::build(
            &self.config,
            ParamBuilder::from_values(self.dtype, self.device(), values)
                .with_shared_quantized(self.quantized_weights()),
        )
    }
}
