//! A trainable LLaMA-family decoder (SmolLM2, LLaMA 2/3 without rope scaling, Mistral without
//! sliding windows) under Hugging Face `LlamaForCausalLM` parameter names: RMSNorm, rotary
//! positions in the half-split form, grouped-query attention, a SwiGLU feed-forward block and a
//! tied or untied head. Cut into segments for the recompute engine: embedding, one per decoder
//! layer, final norm + head + loss.
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
use crate::layers::{
    token_cross_entropy, Embedding, GroupedQueryAttention, Linear, RmsNorm, Rotary, SwiGlu, WeightLayout,
};
use crate::models::TokenBatch;
use crate::module::{Forward, ForwardContext, Module, ModuleBuilder, Stacked};
use crate::params::{ParamBuilder, Parameter, Parameters};

/// The fields of a Hugging Face LLaMA `config.json` this model uses (others are ignored when
/// reading). Serialises back to a `config.json` Hugging Face loads ([`LlamaConfig::to_hf_json`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
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
        }
    }

    /// Reads a Hugging Face `config.json`.
    ///
    /// # Errors
    /// [`crate::Error::Io`] if the file cannot be read, [`crate::Error::InvalidConfig`] if it
    /// does not parse or describes a model this one does not implement.
    pub fn from_json_file(path: &Path) -> crate::Result<Self> {
        let bytes = crate::io::read_bounded(path, crate::io::MAX_CONFIG_BYTES)?;
        let text = String::from_utf8(bytes).map_err(|e| {
            crate::Error::io("read", path, std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })?;
        let config: Self =
            serde_json::from_str(&text).map_err(|e| crate::Error::config("config.json", e.to_string()))?;
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
            map.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
            map.insert("model_type".into(), "llama".into());
            map.insert("head_dim".into(), self.head_dim().into());
            map.insert("torch_dtype".into(), hf_dtype_name(dtype).into());
        }
        serde_json::to_string_pretty(&value).map_err(|e| crate::Error::config("config.json", e.to_string()))
    }

    /// The dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks that every field is usable.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] naming the first bad field.
    pub fn validate(&self) -> crate::Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(crate::Error::config(field, "must be at least 1"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 || self.head_dim() % 2 != 0 {
            return Err(crate::Error::config(
                "num_attention_heads",
                format!(
                    "{} heads do not split the width {} into heads of an even dimension",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
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
                format!("`{}` is not supported", self.hidden_act),
            ));
        }
        Ok(())
    }

    /// The number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let kv = self.num_key_value_heads * self.head_dim();
        let layer = 2 * h + h * h + 2 * h * kv + h * h + 3 * h * i;
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
            self_attn: GroupedQueryAttention::build(
                &b.pp("self_attn"),
                h,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim(),
                std,
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
        let attn = self.self_attn.forward(&self.input_layernorm.forward_as(x, self.dtype)?, &self.rotary)?;
        let x = residual_add(x, &attn)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward_as(&x, self.dtype)?)?;
        residual_add(&x, &mlp)
    }
}

impl DecoderLayer {
    /// The layer on the new positions `x` over `cache` (this layer's keys and values), which
    /// it extends.
    fn forward_cached(&self, x: &Tensor, cache: &mut Option<(Tensor, Tensor)>) -> Result<Tensor> {
        let normed = self.input_layernorm.forward_as(x, self.dtype)?;
        let attn = self.self_attn.forward_cached(&normed, &self.rotary, cache)?;
        let x = residual_add(x, &attn)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward_as(&x, self.dtype)?)?;
        residual_add(&x, &mlp)
    }
}

/// The keys and values of the positions a [`Llama`] has seen, per layer, for decoding one
/// token at a time ([`Llama::logits_cached`]).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
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
    /// layers are frozen and compute through [`crate::quant::quantized_linear`].
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
        let bytes = crate::io::read_bounded(path, crate::io::MAX_STATE_BYTES)?;
        let tensors = candle::safetensors::load_buffer(&bytes, device)
            .map_err(|e| crate::Error::MalformedState { path: path.to_path_buf(), reason: e.to_string() })?;
        Self::from_tensors(config, tensors, dtype, device)
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
        let rotary =
            Rotary::new(config.head_dim(), config.max_position_embeddings, config.rope_theta, &device)?;
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
        self.params.iter().next().map_or(Device::Cpu, |p| p.var.device().clone())
    }

    /// The logits `[batch, t, vocab]` (in the parameters' dtype) for token ids `[batch, t]`.
    ///
    /// # Errors
    /// On a sequence longer than `max_position_embeddings`, an id out of range, or a tensor
    /// error.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let mut h = self.embed_ids(ids)?;
        for layer in &self.layers {
            h = layer.forward(&h, &mut ForwardContext::eval())?;
        }
        self.head_logits(&h)
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
        if cache.len + t > self.config.max_position_embeddings {
            candle::bail!(
                "sequence of {} tokens exceeds the model's {} positions",
                cache.len + t,
                self.config.max_position_embeddings
            );
        }
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
        if t > self.config.max_position_embeddings {
            candle::bail!(
                "sequence of {t} tokens exceeds the model's {} positions",
                self.config.max_position_embeddings
            );
        }
        let vocab = self.config.vocab_size;
        let largest = ids.to_dtype(DType::U32)?.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if largest >= vocab {
            candle::bail!("token id {largest} is out of the vocabulary of {vocab}");
        }
        self.embed_tokens.forward(ids)?.to_dtype(self.residual_dtype())
    }

    fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward_as(h, self.dtype)?;
        match &self.lm_head {
            Some(head) => head.forward(&h),
            None => {
                let (b, t, c) = h.dims3()?;
                let table = self.embed_tokens.weight();
                crate::layers::linear::matmul_transposed(&h.reshape((b * t, c))?, table)?.reshape((
                    b,
                    t,
                    self.config.vocab_size,
                ))
            }
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
        let logits = self.head_logits(x)?;
        let (b, t, v) = logits.dims3()?;
        token_cross_entropy(&logits.reshape((b * t, v))?, &batch.targets.flatten_all()?)
    }

    fn embedding_parameters(&self) -> Vec<Parameter> {
        self.embed_tokens.parameters()
    }

    fn head_parameters(&self) -> Vec<Parameter> {
        let head = match &self.lm_head {
            Some(head) => head.parameters(),
            None => self.embed_tokens.parameters(),
        };
        [self.norm.parameters(), head].concat()
    }
}

crate::segmented_stack!(Llama);

crate::module_fields!(Llama { embed_tokens, layers, norm, lm_head });

impl crate::serve::Snapshot for Llama {
    /// A copy with its own variables (same names, values and dtype).
    fn snapshot(&self) -> crate::Result<Self> {
        if !self.quantized_weights().is_empty() {
            return Err(crate::Error::config("snapshot", "a model over a quantized base is not copied"));
        }
        let tensors = self
            .params
            .iter()
            .map(|p| Ok((p.name.clone(), p.tensor()?.detach())))
            .collect::<crate::Result<_>>()?;
        Self::from_tensors(&self.config, tensors, self.dtype, &self.device())
    }
}
