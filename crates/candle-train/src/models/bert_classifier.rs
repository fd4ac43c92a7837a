//! A BERT sequence classifier (encoder, pooling, a linear `classifier` head, cross-entropy)
//! cut into segments for the recompute engine: embeddings, one per encoder layer, pooling +
//! head + loss. Parameter names are the encoder's Hugging Face names plus `classifier.weight`
//! and `classifier.bias`, as `BertForSequenceClassification` names its head.
//!
//! Two poolings: sentence-transformers' mean over the tokens ([`Pooling::Mean`]), and
//! `BertForSequenceClassification`'s `tanh(pooler.dense(h[CLS]))` ([`Pooling::ClsPooler`]).
//! Only the second exports as a Hugging Face folder ([`BertClassifier::save_pretrained`]):
//! `transformers` has no mean-pooling sequence classifier, and a folder that loads as one
//! with other semantics would give other labels.

use std::collections::HashMap;
use std::path::Path;

use candle::{DType, Device, Result, Tensor};
use candle_ckpt::SegmentContext;
use serde_json::json;

use crate::device::reduction_dtype;
use crate::layers::ops::padding_bias;
use crate::layers::{cross_entropy, Linear, WeightLayout};
use crate::models::bert::{mean_pool, Bert, BertConfig, BertLayer};
use crate::module::{parameters_of, ForwardContext, ModuleBuilder, Stacked};
use crate::params::{ParamBuilder, Parameter, Parameters};

/// A tokenized, labelled batch: ids, token types and attention mask `[batch, t]` (integers;
/// mask 1 for tokens, 0 for padding) and labels `[batch]`.
#[derive(Debug, Clone)]
pub struct ClassificationBatch {
    /// Token ids.
    pub ids: Tensor,
    /// Token-type ids.
    pub token_types: Tensor,
    /// Attention mask.
    pub mask: Tensor,
    /// Class indices.
    pub labels: Tensor,
}

/// How the classifier turns the encoder's hidden states into one vector per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the tokens the mask keeps (sentence-transformers); no Hugging Face
    /// sequence-classification class computes this, so it does not export.
    Mean,
    /// `tanh(pooler.dense(h[:, 0]))`, the `[CLS]` token through BERT's pooler, as
    /// `BertForSequenceClassification` pools.
    ClsPooler,
}

/// BERT + pooling + a linear head.
///
/// Segments: `0` the embeddings, `1..=num_hidden_layers` the layers `encoder.layer.{i}`, and
/// the last pooling, the head and the mean cross-entropy over the batch (F32). Dropout in
/// each segment draws from the segment's own generator, so recomputation replays it (the head
/// segment has none: `BertForSequenceClassification`'s dropout before `classifier` is not
/// applied).
#[derive(Debug, Clone)]
pub struct BertClassifier {
    encoder: Bert,
    pooler: Option<Linear>,
    head: Linear,
    params: Parameters,
}

/// The name prefix `BertForSequenceClassification` gives the encoder and pooler.
const HF_PREFIX: &str = "bert.";

crate::module_fields!(BertClassifier { encoder, pooler, head });

impl BertClassifier {
    /// The head's name prefix.
    pub const HEAD: &'static str = "classifier";

    /// `encoder` with a new `classifier` head of `num_labels` outputs, N(0, 0.02²) weights and
    /// zero bias drawn from `seed`, in the encoder's dtype.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for zero labels; allocation failure.
    pub fn new(encoder: Bert, num_labels: usize, seed: u64) -> crate::Result<Self> {
        Self::with_pooling(encoder, num_labels, Pooling::Mean, seed)
    }

    /// `encoder` with `pooling` and a new `classifier` head of `num_labels` outputs. For
    /// [`Pooling::ClsPooler`] the pooler `{prefix}pooler.dense` is new too (N(0, 0.02²)
    /// weight, zero bias); [`BertClassifier::load_pooler`] gives it a checkpoint's values.
    /// Drawn from `seed`, in the encoder's dtype.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for zero labels; allocation failure.
    pub fn with_pooling(
        encoder: Bert,
        num_labels: usize,
        pooling: Pooling,
        seed: u64,
    ) -> crate::Result<Self> {
        if num_labels == 0 {
            return Err(crate::Error::config("num_labels", "must be at least 1"));
        }
        let b = ModuleBuilder::new(ParamBuilder::new(encoder.dtype(), encoder.parameters().device(), seed));
        let hidden = encoder.config().hidden_size;
        let pooler = match pooling {
            Pooling::Mean => None,
            Pooling::ClsPooler => {
                let dense = b.pp(format!("{}pooler", encoder.prefix())).pp("dense");
                Some(Linear::build(&dense, hidden, hidden, WeightLayout::OutIn, 0.02)?)
            }
        };
        let head = Linear::build(&b.pp(Self::HEAD), hidden, num_labels, WeightLayout::OutIn, 0.02)?;
        let params = encoder.parameters().merged(&b.finish());
        Ok(Self { encoder, pooler, head, params })
    }

    /// The pooling.
    pub fn pooling(&self) -> Pooling {
        if self.pooler.is_some() {
            Pooling::ClsPooler
        } else {
            Pooling::Mean
        }
    }

    /// The number of labels (the head's outputs).
    pub fn num_labels(&self) -> usize {
        self.params.get("classifier.bias").map_or(0, |p| p.elem_count())
    }

    /// Sets the pooler's weights from the `{prefix}pooler.dense.weight` and `.bias` of a
    /// safetensors file (a pretrained `BertModel` such as all-MiniLM-L6-v2 ships them).
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] when the classifier pools by mean (it has no pooler);
    /// [`crate::Error::Io`] / [`crate::Error::MalformedState`] for an unreadable file;
    /// [`crate::Error::StateMismatch`] naming a missing or misshapen tensor.
    pub fn load_pooler(&self, path: &Path) -> crate::Result<()> {
        if self.pooler.is_none() {
            return Err(crate::Error::config("pooling", "a mean-pooling classifier has no pooler to load"));
        }
        let prefix = format!("{}pooler.", self.encoder.prefix());
        let pooler = self.params.iter().filter(|p| p.name.starts_with(&prefix)).cloned();
        Parameters::from_handles(pooler)?.load_safetensors(path)
    }

    /// Writes a Hugging Face `BertForSequenceClassification` folder into `dir` (created):
    /// `config.json` (the encoder's shape, `architectures`, `num_labels`, `id2label` and
    /// `label2id` from `labels`, `torch_dtype`) and `model.safetensors` (the encoder and pooler
    /// under `bert.`, the head as `classifier.*`, in the parameters' dtype). The tokenizer files
    /// are the caller's (the root package's `export` module writes them). Files are written
    /// atomically.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for a mean-pooling classifier (field `pooling`: no
    /// `transformers` class computes it) or when `labels` does not have `num_labels` names;
    /// [`crate::Error::Io`] on a file-system error.
    pub fn save_pretrained(&self, dir: &Path, labels: &[String]) -> crate::Result<()> {
        if self.pooler.is_none() {
            return Err(crate::Error::config(
                "pooling",
                "a mean-pooling classifier has no BertForSequenceClassification equivalent; \
                 build it with Pooling::ClsPooler to export a Hugging Face folder",
            ));
        }
        if labels.len() != self.num_labels() {
            return Err(crate::Error::config(
                "labels",
                format!("{} names for a head of {} labels", labels.len(), self.num_labels()),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io("create", dir, e))?;
        let config = classifier_config_json(self.encoder.config(), labels, self.encoder.dtype())?;
        crate::io::write_atomic(&dir.join("config.json"), config.as_bytes())?;
        let prefix = self.encoder.prefix();
        let tensors = self
            .params
            .iter()
            .map(|p| {
                let name = match p.name.strip_prefix(prefix) {
                    Some(rest) if !p.name.starts_with("classifier.") => format!("{HF_PREFIX}{rest}"),
                    _ => p.name.clone(),
                };
                Ok((name, p.var()?.as_tensor().clone()))
            })
            .collect::<crate::Result<Vec<_>>>()?;
        let path = dir.join("model.safetensors");
        let bytes = safetensors::serialize(tensors, None)
            .map_err(|e| crate::Error::MalformedState { path: path.clone(), reason: e.to_string() })?;
        crate::io::write_atomic(&path, &bytes)
    }

    /// A classifier saved by [`BertClassifier::save_pretrained`] (or any Hugging Face
    /// `BertForSequenceClassification` folder with one `model.safetensors`), in `dtype` on
    /// `device`, and its label names (`id2label`, by index; `LABEL_{i}` where absent).
    ///
    /// # Errors
    /// [`crate::Error::Io`] for an unreadable file; [`crate::Error::InvalidConfig`] naming
    /// `config.json`'s bad field (`num_labels`, `id2label`, the encoder's); as
    /// [`crate::params::Parameters::load_safetensors`] for the weights.
    pub fn from_pretrained(dir: &Path, dtype: DType, device: &Device) -> crate::Result<(Self, Vec<String>)> {
        let path = dir.join("config.json");
        let config = BertConfig::from_json_file(&path)?;
        let labels = labels_from_config(&crate::io::read_json_config(&path)?)?;
        let encoder = Bert::new(&config, HF_PREFIX, dtype, device, 0)?;
        let model = Self::with_pooling(encoder, labels.len(), Pooling::ClsPooler, 0)?;
        model.params.load_safetensors(&dir.join("model.safetensors"))?;
        Ok((model, labels))
    }

    /// The encoder.
    pub fn encoder(&self) -> &Bert {
        &self.encoder
    }

    /// Every parameter: the encoder's, then the head's.
    pub fn parameters(&self) -> &Parameters {
        &self.params
    }

    /// The logits `[batch, num_labels]` in F32, without dropout.
    ///
    /// # Errors
    /// On a shape mismatch or a sequence longer than the encoder's positions.
    pub fn logits(&self, ids: &Tensor, token_types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden =
            self.encoder.forward(ids, Some(token_types), mask, &mut candle_ckpt::Rng::seeded(0), false)?;
        self.head_logits(&hidden, mask)
    }

    fn head_logits(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let pooled = match &self.pooler {
            None => mean_pool(hidden, mask)?.to_dtype(self.encoder.dtype())?,
            Some(pooler) => {
                let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?.to_dtype(self.encoder.dtype())?;
                pooler.forward(&cls)?.tanh()?
            }
        };
        self.head.forward(&pooled)?.to_dtype(crate::device::reduction_dtype(self.encoder.dtype()))
    }
}

impl Stacked for BertClassifier {
    type Batch = ClassificationBatch;
    type Block = BertLayer;

    fn blocks(&self) -> &[BertLayer] {
        self.encoder.layers()
    }

    /// `encoder.layer` (segment names leave out a `bert.` prefix).
    fn block_path(&self) -> String {
        "encoder.layer".into()
    }

    fn embedding_name(&self) -> String {
        "embeddings".into()
    }

    fn first_input(&self, batch: &ClassificationBatch) -> Result<Tensor> {
        Ok(batch.ids.clone())
    }

    fn embed(&self, input: &Tensor, batch: &ClassificationBatch, ctx: &SegmentContext) -> Result<Tensor> {
        self.encoder.embed(input, Some(&batch.token_types), &mut ctx.rng(0), ctx.training)
    }

    fn block_context(&self, batch: &ClassificationBatch, ctx: &SegmentContext) -> Result<ForwardContext> {
        let bias = padding_bias(&batch.mask, reduction_dtype(self.encoder.dtype()))?;
        Ok(ForwardContext::new(ctx).with_key_padding(bias))
    }

    fn head(&self, x: &Tensor, batch: &ClassificationBatch, _: &SegmentContext) -> Result<Tensor> {
        let logits = self.head_logits(x, &batch.mask)?;
        cross_entropy(&logits, &batch.labels.to_dtype(DType::U32)?)
    }

    fn embedding_parameters(&self) -> Vec<Parameter> {
        self.encoder.embedding_parameters()
    }

    fn head_parameters(&self) -> Vec<Parameter> {
        parameters_of(&[&self.pooler, &self.head])
    }
}

crate::segmented_stack!(BertClassifier);

/// `BertForSequenceClassification`'s `config.json` for `config` and `labels`.
fn classifier_config_json(config: &BertConfig, labels: &[String], dtype: DType) -> crate::Result<String> {
    let bad = |e: serde_json::Error| crate::Error::config("config.json", e.to_string());
    let mut value = serde_json::to_value(config).map_err(bad)?;
    let id2label: serde_json::Map<String, serde_json::Value> =
        labels.iter().enumerate().map(|(i, name)| (i.to_string(), json!(name))).collect();
    let label2id: serde_json::Map<String, serde_json::Value> =
        labels.iter().enumerate().map(|(i, name)| (name.clone(), json!(i))).collect();
    if let Some(map) = value.as_object_mut() {
        // The head's fields describe this model; the others keep what the config read held.
        map.insert("architectures".into(), json!(["BertForSequenceClassification"]));
        map.insert("model_type".into(), json!("bert"));
        map.insert("num_labels".into(), json!(labels.len()));
        map.insert("id2label".into(), id2label.into());
        map.insert("label2id".into(), label2id.into());
        map.entry("problem_type").or_insert_with(|| json!("single_label_classification"));
        map.entry("position_embedding_type").or_insert_with(|| json!("absolute"));
        map.entry("pad_token_id").or_insert_with(|| json!(0));
        map.insert("torch_dtype".into(), json!(crate::models::llama::hf_dtype_name(dtype)));
    }
    serde_json::to_string_pretty(&value).map_err(bad)
}

/// The label names of a `config.json` value: `id2label` when present (every index below its
/// size named), else `num_labels` names `LABEL_{i}`.
fn labels_from_config(value: &serde_json::Value) -> crate::Result<Vec<String>> {
    let num_labels = value.get("num_labels").map(|n| {
        n.as_u64().map(|n| n as usize).ok_or_else(|| crate::Error::config("num_labels", "must be an integer"))
    });
    match value.get("id2label") {
        Some(map) => {
            let map = map.as_object().ok_or_else(|| crate::Error::config("id2label", "must be an object"))?;
            let mut by_index: HashMap<usize, String> = HashMap::new();
            for (key, name) in map {
                let index = key
                    .parse::<usize>()
                    .map_err(|_| crate::Error::config("id2label", format!("key `{key}` is not an index")))?;
                let name = name.as_str().ok_or_else(|| {
                    crate::Error::config("id2label", format!("label {index} is not a string"))
                })?;
                by_index.insert(index, name.to_string());
            }
            let labels = (0..by_index.len())
                .map(|i| {
                    by_index
                        .remove(&i)
                        .ok_or_else(|| crate::Error::config("id2label", format!("index {i} is missing")))
                })
                .collect::<crate::Result<Vec<_>>>()?;
            if let Some(n) = num_labels.transpose()? {
                if n != labels.len() {
                    return Err(crate::Error::config(
                        "num_labels",
                        format!("{n} but id2label names {}", labels.len()),
                    ));
                }
            }
            if labels.is_empty() {
                return Err(crate::Error::config("id2label", "names no label"));
            }
            Ok(labels)
        }
        None => match num_labels.transpose()? {
            Some(n) if n > 0 => Ok((0..n).map(|i| format!("LABEL_{i}")).collect()),
            _ => Err(crate::Error::config("num_labels", "missing (and no id2label)")),
        },
    }
}
