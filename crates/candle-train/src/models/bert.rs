//! A trainable BERT encoder (post-LayerNorm, exact-erf GELU, bidirectional attention with a
//! key-padding mask) under Hugging Face `BertModel` parameter names, so the weights of a
//! shipped checkpoint (all-MiniLM-L6-v2) load and save by name.
//!
//! Every op has a backward: attention is [`scaled_dot_product_attention`] under a key-padding mask, norms our [`LayerNorm`], GELU
//! our exact-erf [`ops::gelu_erf`] (Candle's rounds 1/√(2π) in its backward). The residual stream is kept in F32 and only
//! the matmuls run in the parameters' dtype, as in [`crate::models::Gpt`].

use std::path::Path;

use candle::{DType, Device, Result, Tensor};
use candle_ckpt::Rng;
use serde::{Deserialize, Serialize};

use crate::layers::attention::{scaled_dot_product_attention, split_heads, AttentionMask};
use crate::layers::ops::{self, padding_bias, residual_add};
use crate::layers::{Dropout, Embedding, LayerNorm, Linear, WeightLayout};
use crate::module::{parameters_of, Forward, ForwardContext, ModuleBuilder};
use crate::params::{ParamBuilder, Parameter, Parameters};

/// The fields of a Hugging Face BERT `config.json` this model uses; every other field is kept
/// in [`BertConfig::extra`] and written back by the exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads; must divide `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Number of learned positions.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// Dropout on embeddings and residual branches.
    #[serde(default, serialize_with = "shortest_f32")]
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities.
    #[serde(default, serialize_with = "shortest_f32")]
    pub attention_probs_dropout_prob: f32,
    /// The activation; only `"gelu"` (exact erf form) is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Every other field of the `config.json` read (`architectures`, `model_type`,
    /// `pad_token_id`, `id2label`, ...), written back unchanged.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_act() -> String {
    "gelu".into()
}

/// Writes an F32 field as the shortest decimal that reads back to it (`0.1`, not the F64
/// widening `0.10000000149011612`), so a saved config has the value it was read with.
fn shortest_f32<S: serde::Serializer>(value: &f32, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_f64(value.to_string().parse().unwrap_or(f64::from(*value)))
}

impl BertConfig {
    /// Reads a Hugging Face `config.json`.
    ///
    /// # Errors
    /// [`crate::Error::Io`] if the file cannot be read, [`crate::Error::InvalidConfig`] if it
    /// does not parse or names an unsupported activation or head count.
    pub fn from_json_file(path: &Path) -> crate::Result<Self> {
        let config: Self = crate::io::read_json_config(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the configuration is one this model implements.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] naming the first bad field.
    pub fn validate(&self) -> crate::Result<()> {
        if self.hidden_act != "gelu" {
            return Err(crate::Error::config(
                "hidden_act",
                format!("`{}` is not supported (supported: gelu)", self.hidden_act),
            ));
        }
        match self.extra.get("position_embedding_type") {
            None | Some(serde_json::Value::Null) => {}
            Some(kind) if kind == "absolute" => {}
            Some(kind) => {
                return Err(crate::Error::config(
                    "position_embedding_type",
                    format!("{kind} is not supported (supported: absolute)"),
                ))
            }
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(crate::Error::config(
                "num_attention_heads",
                format!("{} heads do not divide the width {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        Ok(())
    }

    /// A small configuration for tests.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 11,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 12,
            max_position_embeddings: 16,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            hidden_act: "gelu".into(),
            extra: serde_json::Map::new(),
        }
    }
}

/// One encoder layer: self-attention and feed-forward, each followed by add & LayerNorm.
#[derive(Debug, Clone)]
pub struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    heads: usize,
    attention_dropout: Dropout,
    hidden_dropout: Dropout,
    /// The matmuls' dtype (the parameters'); hidden states stay in F32 under a half type.
    dtype: DType,
}

crate::module_fields!(BertLayer {
    query,
    key,
    value,
    attention_output,
    attention_norm,
    intermediate,
    output,
    output_norm
});

impl BertLayer {
    /// Creates the layer's parameters under `{prefix}` (`encoder.layer.{i}`).
    ///
    /// # Errors
    /// On an invalid dropout probability or allocation failure.
    pub fn new(pb: &mut ParamBuilder, prefix: &str, config: &BertConfig) -> crate::Result<Self> {
        ModuleBuilder::scoped(pb, prefix, |b| Self::build(b, config))
    }

    /// Creates the layer's parameters under `b`'s path (`encoder.layer.{i}`), as Hugging Face
    /// names them.
    ///
    /// # Errors
    /// On an invalid dropout probability or allocation failure.
    pub fn build(b: &ModuleBuilder, config: &BertConfig) -> crate::Result<Self> {
        let (h, i, eps) = (config.hidden_size, config.intermediate_size, config.layer_norm_eps);
        let linear =
            |b: ModuleBuilder, inp: usize, out: usize| Linear::build(&b, inp, out, WeightLayout::OutIn, 0.02);
        let (attention, this) = (b.pp("attention"), b.pp("attention").pp("self"));
        Ok(Self {
            query: linear(this.pp("query"), h, h)?,
            key: linear(this.pp("key"), h, h)?,
            value: linear(this.pp("value"), h, h)?,
            attention_output: linear(attention.pp("output").pp("dense"), h, h)?,
            attention_norm: LayerNorm::build(&attention.pp("output").pp("LayerNorm"), h, eps)?,
            intermediate: linear(b.pp("intermediate").pp("dense"), h, i)?,
            output: linear(b.pp("output").pp("dense"), i, h)?,
            output_norm: LayerNorm::build(&b.pp("output").pp("LayerNorm"), h, eps)?,
            heads: config.num_attention_heads,
            attention_dropout: Dropout::new(config.attention_probs_dropout_prob)?,
            hidden_dropout: Dropout::new(config.hidden_dropout_prob)?,
            dtype: b.dtype(),
        })
    }

    /// Applies the layer to the F32 (F64) hidden states `x` (`[batch, t, hidden]`), with the
    /// additive key bias `bias` (`[batch, 1, 1, t]`) from [`padding_bias`]; matmuls run in
    /// `dtype`. Returns hidden states in `x`'s dtype.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        dtype: DType,
        rng: &mut Rng,
        training: bool,
    ) -> Result<Tensor> {
        let xc = x.to_dtype(dtype)?;
        let split = |layer: &Linear| split_heads(&layer.forward(&xc)?, self.heads);
        let (q, k, v) = (split(&self.query)?, split(&self.key)?, split(&self.value)?);
        let dropout = (&self.attention_dropout, &mut *rng, training);
        let context =
            scaled_dot_product_attention(&q, &k, &v, AttentionMask::KeyPadding(bias), Some(dropout))?;
        let attended =
            self.hidden_dropout.forward(&self.attention_output.forward(&context)?, rng, training)?;
        let x = self.attention_norm.forward_as(&residual_add(x, &attended)?, x.dtype())?;
        let hidden = ops::gelu_erf(&self.intermediate.forward(&x.to_dtype(dtype)?)?)?;
        let out = self.hidden_dropout.forward(&self.output.forward(&hidden)?, rng, training)?;
        self.output_norm.forward_as(&residual_add(&x, &out)?, x.dtype())
    }
}

impl Forward for BertLayer {
    /// The layer on hidden states `x` under the context's key-padding bias.
    ///
    /// # Errors
    /// When the context has no key-padding bias (a padded batch's mask is part of the
    /// input), or as [`BertLayer::forward`].
    fn forward(&self, x: &Tensor, ctx: &mut ForwardContext) -> Result<Tensor> {
        let Some(bias) = ctx.key_padding.clone() else {
            candle::bail!(
                "a BERT layer needs the batch's key-padding bias in its ForwardContext (`with_key_padding`)"
            );
        };
        BertLayer::forward(self, x, &bias, self.dtype, &mut ctx.rng, ctx.training)
    }
}

/// The BERT encoder (`BertModel` without the pooler).
#[derive(Debug, Clone)]
pub struct Bert {
    config: BertConfig,
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    embedding_norm: LayerNorm,
    embedding_dropout: Dropout,
    layers: Vec<BertLayer>,
    params: Parameters,
    dtype: DType,
    prefix: String,
}

crate::module_fields!(Bert { word, position, token_type, embedding_norm, layers });

impl Bert {
    /// A randomly initialised encoder (N(0, 0.02²) weights, as Hugging Face initialises BERT)
    /// whose parameter names start with `prefix` (`""` for all-MiniLM-L6-v2, `"bert."` for
    /// checkpoints saved from `BertFor...` heads).
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for an unsupported configuration; allocation failure.
    pub fn new(
        config: &BertConfig,
        prefix: &str,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> crate::Result<Self> {
        config.validate()?;
        let b = ModuleBuilder::new(ParamBuilder::new(dtype, device.clone(), seed));
        // `pp("")` stays at the root.
        let root = b.pp(prefix.trim_end_matches('.'));
        let (h, e) = (config.hidden_size, root.pp("embeddings"));
        let word = Embedding::build(&e.pp("word_embeddings"), config.vocab_size, h, 0.02)?;
        let position =
            Embedding::build(&e.pp("position_embeddings"), config.max_position_embeddings, h, 0.02)?;
        let token_type = Embedding::build(&e.pp("token_type_embeddings"), config.type_vocab_size, h, 0.02)?;
        let embedding_norm = LayerNorm::build(&e.pp("LayerNorm"), h, config.layer_norm_eps)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::build(&root.pp("encoder").pp("layer").pp(i), config))
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            word,
            position,
            token_type,
            embedding_norm,
            embedding_dropout: Dropout::new(config.hidden_dropout_prob)?,
            layers,
            params: b.finish(),
            dtype,
            prefix: prefix.to_string(),
        })
    }

    /// An encoder with the weights of a Hugging Face safetensors file (converted to `dtype`).
    /// Tensors the encoder does not use (`embeddings.position_ids`, a pooler) are ignored.
    ///
    /// # Errors
    /// As [`Bert::new`] and [`Parameters::load_safetensors`] (a missing or misshapen tensor).
    pub fn from_safetensors(
        config: &BertConfig,
        prefix: &str,
        path: &Path,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        let model = Self::new(config, prefix, dtype, device, 0)?;
        model.params.load_safetensors(path)?;
        Ok(model)
    }

    /// An encoder saved as a Hugging Face folder (`config.json` and one `model.safetensors`,
    /// such as all-MiniLM-L6-v2 or [`Bert::save_pretrained`]'s): the parameter names start with
    /// `bert.` when the file's do (a checkpoint saved from a `BertFor...` class), else with
    /// nothing. A pooler or head in the file is ignored.
    ///
    /// # Errors
    /// As [`BertConfig::from_json_file`] and [`Bert::from_safetensors`].
    pub fn from_pretrained(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config = BertConfig::from_json_file(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        let bytes = crate::io::read_bounded(&path, crate::io::MAX_STATE_BYTES)?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| crate::Error::MalformedState { path: path.clone(), reason: e.to_string() })?;
        let prefixed = tensors.names().iter().any(|n| n.starts_with("bert.embeddings."));
        Self::from_safetensors(&config, if prefixed { "bert." } else { "" }, &path, dtype, device)
    }

    /// Writes `config.json` (every field of the config read; `architectures` `BertModel` and
    /// `model_type` `bert` where absent; `torch_dtype` naming the parameters' dtype) and
    /// `model.safetensors` (every parameter under its name, in the parameters' dtype) into
    /// `dir`, creating it; each file atomically.
    ///
    /// # Errors
    /// [`crate::Error::Io`] on a file-system error.
    pub fn save_pretrained(&self, dir: &Path) -> crate::Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io("create", dir, e))?;
        let bad = |e: serde_json::Error| crate::Error::config("config.json", e.to_string());
        let mut value = serde_json::to_value(&self.config).map_err(bad)?;
        if let Some(map) = value.as_object_mut() {
            map.entry("architectures").or_insert_with(|| serde_json::json!(["BertModel"]));
            map.entry("model_type").or_insert_with(|| "bert".into());
            map.insert("torch_dtype".into(), crate::models::llama::hf_dtype_name(self.dtype).into());
        }
        let text = serde_json::to_string_pretty(&value).map_err(bad)?;
        crate::io::write_atomic(&dir.join("config.json"), text.as_bytes())?;
        self.params.save_safetensors(&dir.join("model.safetensors"))
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The parameters, in creation order, under their Hugging Face names.
    pub fn parameters(&self) -> &Parameters {
        &self.params
    }

    /// The dtype of the parameters (and the matmuls).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The last hidden states `[batch, t, hidden]`, in F32 (F64 for an F64 model), for token
    /// ids `[batch, t]`, an attention mask `[batch, t]` (1 for tokens, 0 for padding; any
    /// numeric dtype) and optional token-type ids (zeros when `None`).
    ///
    /// # Errors
    /// On a shape mismatch or a sequence longer than `max_position_embeddings`.
    pub fn forward(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        mask: &Tensor,
        rng: &mut Rng,
        training: bool,
    ) -> Result<Tensor> {
        let mut x = self.embed(ids, token_types, rng, training)?;
        let bias = padding_bias(mask, x.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias, self.dtype, rng, training)?;
        }
        Ok(x)
    }

    /// The embeddings' output `[batch, t, hidden]` (word + position + token type, LayerNorm,
    /// dropout), in F32 (F64 for an F64 model): the input of the first encoder layer.
    ///
    /// # Errors
    /// On a shape mismatch or a sequence longer than `max_position_embeddings`.
    pub fn embed(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        rng: &mut Rng,
        training: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            candle::bail!(
                "bert: sequence of {t} tokens exceeds {} positions",
                self.config.max_position_embeddings
            );
        }
        let stream = crate::device::reduction_dtype(self.dtype);
        let positions = Tensor::arange(0u32, t as u32, ids.device())?.unsqueeze(0)?.repeat((b, 1))?;
        let zeros;
        let types = match token_types {
            Some(types) => types,
            None => {
                zeros = ids.zeros_like()?;
                &zeros
            }
        };
        let x = self.word.forward(ids)?.to_dtype(stream)?;
        let x = residual_add(&x, &self.position.forward(&positions)?)?;
        let x = residual_add(&x, &self.token_type.forward(types)?)?;
        self.embedding_dropout.forward(&self.embedding_norm.forward(&x)?, rng, training)
    }

    /// The parameters the embeddings read (word, position and token-type tables, LayerNorm).
    pub fn embedding_parameters(&self) -> Vec<Parameter> {
        parameters_of(&[&self.word, &self.position, &self.token_type, &self.embedding_norm])
    }

    /// The encoder layers, in order.
    pub fn layers(&self) -> &[BertLayer] {
        &self.layers
    }

    /// The prefix of every parameter name (`""` or `"bert."`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl crate::serve::Snapshot for Bert {
    /// A copy with its own variables (same names, values and dtype). The copy is built as
    /// [`Bert::new`] builds a model, then its values are overwritten.
    fn snapshot(&self) -> crate::Result<Self> {
        let copy = Self::new(&self.config, &self.prefix, self.dtype, &self.params.device(), 0)?;
        for (to, from) in copy.params.iter().zip(self.params.iter()) {
            to.var()?.set(&from.tensor()?.detach().copy()?)?;
        }
        Ok(copy)
    }
}

/// The mean of `hidden` (`[batch, t, c]`) over the positions where `mask` (`[batch, t]`) is 1:
/// sentence-transformers' mean pooling, differentiable, in `hidden`'s dtype.
///
/// # Errors
/// On a shape mismatch.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    summed.broadcast_div(&counts)
}
