//! What a `--model PATH` names: a Hugging Face folder written by [`crate::export`] (or by
//! `transformers`, single `model.safetensors`), a GGUF file, or a packaged model by short name
//! (`smollm2`), loaded with its tokenizer.

use std::path::Path;

use anyhow::Context;
use candle::{DType, Device};
use candle_train::lora::LoraModel;
use candle_train::models::{Bert, BertClassifier, DecoderFamily, GgufFile, Gpt, Llama, Pooling};
use candle_train::quant::BaseQuantization;

use crate::gguf_tokenizer::LmTokenizer;
use crate::pretrained::{SmolLm2Files, TextEncoder};

/// The short names of the packaged models `--model` accepts.
pub const SHORT_NAMES: [&str; 2] = ["smollm2", "smollm2-135m-instruct"];

/// The longest text a classifier's tokenizer keeps (BERT's positions).
const CLASSIFIER_MAX_LEN: usize = 512;

/// The Hugging Face class of a GPT-2 language model.
const GPT2_ARCHITECTURE: &str = "GPT2LMHeadModel";

/// The Hugging Face class of a BERT sequence classifier.
const CLASSIFIER_ARCHITECTURE: &str = "BertForSequenceClassification";

/// What a model folder's `config.json` says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderKind {
    /// A LLaMA-family causal language model.
    Llama(DecoderFamily),
    /// A GPT-2 causal language model (`GPT2LMHeadModel`, `GPT2Model`, `model_type` `gpt2`).
    Gpt2,
    /// A `BertForSequenceClassification`.
    BertClassifier,
    /// A BERT encoder without a head (`BertModel`, or `model_type` `bert` alone).
    BertEncoder,
}

/// The kind of model in the folder `dir`, from its `config.json`'s `architectures` (first
/// entry) or, without one, its `model_type`.
///
/// # Errors
/// One line naming `config.json` (and the field): missing, not JSON, or an architecture this
/// crate does not implement.
pub fn folder_kind(dir: &Path) -> anyhow::Result<FolderKind> {
    let config_path = dir.join("config.json");
    let bytes = candle_train::io::read_bounded(&config_path, candle_train::io::MAX_CONFIG_BYTES)
        .with_context(|| format!("{}: a model folder needs config.json", dir.display()))?;
    let config: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}", config_path.display()))?;
    let architecture = config.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str());
    let model_type = config.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
    let family = match architecture {
        Some(name) => DecoderFamily::from_architecture(name),
        None => DecoderFamily::from_model_type(model_type),
    };
    Ok(match (architecture, model_type) {
        _ if family.is_some() => FolderKind::Llama(family.expect("checked by the guard")),
        (Some("GPT2LMHeadModel" | "GPT2Model"), _) | (None, "gpt2") => FolderKind::Gpt2,
        (Some(CLASSIFIER_ARCHITECTURE), _) => FolderKind::BertClassifier,
        (Some("BertModel"), _) | (None, "bert") => FolderKind::BertEncoder,
        (architecture, model_type) => anyhow::bail!(
            "{}: field `architectures` = {:?} (model_type `{model_type}`) is not supported; \
             supported: {}, {GPT2_ARCHITECTURE}, GPT2Model, {CLASSIFIER_ARCHITECTURE}, BertModel (finetune only)",
            config_path.display(),
            architecture.unwrap_or("(missing)"),
            DecoderFamily::ALL.map(DecoderFamily::architecture).join(", ")
        ),
    })
}
/// A loaded model with what it needs to read text.
// One value per command, moved once: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum LoadedModel {
    /// A causal language model of the LLaMA family (`LlamaForCausalLM`,
    /// `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`).
    CausalLm {
        /// The model.
        model: Llama,
        /// Its tokenizer (special tokens, chat template).
        tokenizer: LmTokenizer,
    },
    /// A GPT-2 causal language model (`GPT2LMHeadModel`, `GPT2Model`).
    Gpt2 {
        /// The model.
        model: Gpt,
        /// Its tokenizer (`tokenizer.json`, special tokens from `tokenizer_config.json`).
        tokenizer: LmTokenizer,
    },
    /// A sequence classifier (`BertForSequenceClassification`).
    Classifier {
        /// The model.
        model: BertClassifier,
        /// Label names by index (`id2label`).
        labels: Vec<String>,
        /// Its tokenizer.
        tokenizer: TextEncoder,
    },
}

impl LoadedModel {
    /// The architecture's Hugging Face class name.
    pub fn architecture(&self) -> &'static str {
        match self {
            LoadedModel::CausalLm { model, .. } => model.config().model_type.architecture(),
            LoadedModel::Gpt2 { .. } => GPT2_ARCHITECTURE,
            LoadedModel::Classifier { .. } => CLASSIFIER_ARCHITECTURE,
        }
    }

    /// The number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        match self {
            LoadedModel::CausalLm { model, .. } => model.parameters().num_elements(),
            LoadedModel::Gpt2 { model, .. } => model.parameters().num_elements(),
            LoadedModel::Classifier { model, .. } => model.parameters().num_elements(),
        }
    }
}

/// Loads what `spec` names, in `dtype` on `device`.
///
/// # Errors
/// One line naming the file (and field) at fault: a folder without `config.json`, an
/// `architectures`/`model_type` this crate does not implement, a file that does not load; or
/// a `spec` that is neither a path nor a short name.
pub fn load_model(spec: &str, dtype: DType, device: &Device) -> anyhow::Result<LoadedModel> {
    let path = Path::new(spec);
    if path.is_dir() {
        return load_folder(path, dtype, device);
    }
    if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return load_gguf(path, dtype, device);
    }
    if SHORT_NAMES.contains(&spec.to_ascii_lowercase().as_str()) {
        let files = SmolLm2Files::locate()?;
        return load_gguf(&files.gguf, dtype, device);
    }
    anyhow::bail!(
        "--model `{spec}`: not a model folder, a .gguf file, or a packaged model ({})",
        SHORT_NAMES.join(", ")
    )
}

/// Whether `spec` names a GGUF file (a `.gguf` path or a packaged short name, which is one).
pub fn is_gguf(spec: &str) -> bool {
    let path = Path::new(spec);
    (path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))
        || (!path.exists() && SHORT_NAMES.contains(&spec.to_ascii_lowercase().as_str()))
}

/// Loads the causal language model `spec` names (as [`load_model`]) with its decoder layers'
/// affine weights held quantized (QLoRA's frozen base): a GGUF file is read straight into
/// blocks ([`GgufFile::llama_quantized`]: `gguf` keeps the file's own blocks, never
/// dequantizing them); a folder loads dense and is quantized weight by weight.
///
/// # Errors
/// As [`load_model`]; `gguf` for a model that is not a GGUF file, naming `--quantize-base`; a
/// classifier.
pub fn load_causal_lm_quantized(
    spec: &str,
    quantization: BaseQuantization,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(Llama, LmTokenizer)> {
    let gguf = if is_gguf(spec) && Path::new(spec).is_file() {
        Some(Path::new(spec).to_path_buf())
    } else if is_gguf(spec) {
        Some(SmolLm2Files::locate()?.gguf)
    } else {
        None
    };
    if let Some(path) = gguf {
        let file = GgufFile::open(&path).with_context(|| format!("{}", path.display()))?;
        let model = file
            .llama_quantized(quantization, dtype, device)
            .with_context(|| format!("{}", path.display()))?;
        let tokenizer = LmTokenizer::from_gguf_metadata(file.metadata())
            .with_context(|| format!("{}", path.display()))?;
        return Ok((model, tokenizer));
    }
    anyhow::ensure!(
        quantization != BaseQuantization::Gguf,
        "invalid `--quantize-base gguf`: it keeps a GGUF file's own blocks, but --model `{spec}` is not a .gguf file (use nf4, q4_0, q4_1 or q8_0)"
    );
    match load_model(spec, dtype, device)? {
        LoadedModel::CausalLm { model, tokenizer } => {
            let model = model.quantize_base(quantization).with_context(|| format!("--model {spec}"))?;
            Ok((model, tokenizer))
        }
        other => anyhow::bail!(
            "--model {spec}: a {} is not a causal language model; QLoRA trains LlamaForCausalLM",
            other.architecture()
        ),
    }
}

fn load_gguf(path: &Path, dtype: DType, device: &Device) -> anyhow::Result<LoadedModel> {
    let file = GgufFile::open(path).with_context(|| format!("{}", path.display()))?;
    let model = file.llama(dtype, device).with_context(|| format!("{}", path.display()))?;
    let tokenizer =
        LmTokenizer::from_gguf_metadata(file.metadata()).with_context(|| format!("{}", path.display()))?;
    Ok(LoadedModel::CausalLm { model, tokenizer })
}

fn load_folder(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<LoadedModel> {
    if !dir.join("config.json").exists() && dir.join("adapter_config.json").is_file() {
        return load_adapter(dir, dtype, device);
    }
    match folder_kind(dir)? {
        FolderKind::Llama(_) => {
            let (model, tokenizer) = crate::export::load_llama(dir, dtype, device)?;
            Ok(LoadedModel::CausalLm { model, tokenizer })
        }
        FolderKind::Gpt2 => {
            let (model, tokenizer) = crate::export::load_gpt2(dir, dtype, device)?;
            Ok(LoadedModel::Gpt2 { model, tokenizer })
        }
        FolderKind::BertClassifier => {
            let (model, labels) = BertClassifier::from_pretrained(dir, dtype, device)
                .with_context(|| format!("loading the classifier in {}", dir.display()))?;
            let tokenizer = classifier_tokenizer(dir)?;
            Ok(LoadedModel::Classifier { model, labels, tokenizer })
        }
        FolderKind::BertEncoder => anyhow::bail!(
            "{}: field `architectures`: a BertModel has no head to evaluate or generate with; \
             `candle-fit finetune --model {}` on text,label records makes it a {CLASSIFIER_ARCHITECTURE}",
            dir.join("config.json").display(),
            dir.display()
        ),
    }
}

fn classifier_tokenizer(dir: &Path) -> anyhow::Result<TextEncoder> {
    Ok(TextEncoder::from_file(&dir.join("tokenizer.json"), CLASSIFIER_MAX_LEN)?)
}

/// A BERT classifier to fine-tune from the folder `spec` with its tokenizer: a
/// `BertForSequenceClassification` as saved (its `id2label` names the classes), or a BERT
/// encoder (`BertModel`) with a new `[CLS]`-pooler head of `labels.len()` classes named
/// `labels` (the pooler's weights from the folder when it has them, as `BertModel` checkpoints
/// do; else drawn from `seed`, as the head is).
///
/// # Errors
/// One line naming the folder or file: `spec` is not a folder, its `config.json` names a model
/// other than BERT, a file does not load.
pub fn load_classifier(
    spec: &str,
    labels: &[String],
    seed: u64,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(BertClassifier, Vec<String>, TextEncoder)> {
    let dir = Path::new(spec);
    anyhow::ensure!(dir.is_dir(), "--model {spec}: a classifier is fine-tuned from a BERT model folder");
    let (model, labels) = match folder_kind(dir)? {
        FolderKind::BertClassifier => BertClassifier::from_pretrained(dir, dtype, device)
            .with_context(|| format!("loading the classifier in {}", dir.display()))?,
        FolderKind::BertEncoder => {
            let encoder = Bert::from_pretrained(dir, dtype, device)
                .with_context(|| format!("loading the BERT encoder in {}", dir.display()))?;
            let weights = dir.join("model.safetensors");
            let model = BertClassifier::with_pooling(encoder, labels.len(), Pooling::ClsPooler, seed)?;
            let pooler = format!("{}pooler.dense.weight", model.encoder().prefix());
            if safetensors_names(&weights)?.contains(&pooler) {
                model.load_pooler(&weights).with_context(|| format!("{}", weights.display()))?;
            }
            (model, labels.to_vec())
        }
        FolderKind::Llama(_) | FolderKind::Gpt2 => anyhow::bail!(
            "--model {spec}: a causal language model; classification records (text + label) train \
             a BERT classifier (a BertModel or {CLASSIFIER_ARCHITECTURE} folder)"
        ),
    };
    Ok((model, labels, classifier_tokenizer(dir)?))
}

/// The tensor names of a safetensors file (its header only is parsed).
fn safetensors_names(path: &Path) -> anyhow::Result<Vec<String>> {
    let bytes = candle_train::io::read_bounded(path, candle_train::io::MAX_STATE_BYTES)
        .with_context(|| format!("{}", path.display()))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(metadata.tensors().into_keys().collect())
}

/// A PEFT LoRA adapter folder (as `candle-fit finetune --lora-rank` writes it): the base its
/// `base_model_name_or_path` names (a folder, a `.gguf` file or a packaged short name), with
/// the adapters loaded and merged.
fn load_adapter(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<LoadedModel> {
    let config_path = dir.join("adapter_config.json");
    let bytes = candle_train::io::read_bounded(&config_path, candle_train::io::MAX_CONFIG_BYTES)?;
    let config: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{}", config_path.display()))?;
    let base = config.get("base_model_name_or_path").and_then(|b| b.as_str()).with_context(|| {
        format!(
            "{}: field `base_model_name_or_path` is missing (the base model to adapt)",
            config_path.display()
        )
    })?;
    let loaded = load_model(base, dtype, device)
        .with_context(|| format!("{}: field `base_model_name_or_path`", config_path.display()))?;
    let context = || format!("loading the LoRA adapter in {}", dir.display());
    match loaded {
        LoadedModel::CausalLm { model, tokenizer } => {
            let (adapted, _) = LoraModel::from_peft(model, dir, "").with_context(context)?;
            Ok(LoadedModel::CausalLm { model: adapted.merge()?, tokenizer })
        }
        LoadedModel::Gpt2 { model, tokenizer } => {
            let (adapted, _) = LoraModel::from_peft(model, dir, "").with_context(context)?;
            Ok(LoadedModel::Gpt2 { model: adapted.merge()?, tokenizer })
        }
        LoadedModel::Classifier { .. } => {
            anyhow::bail!("{}: the base model `{base}` is not a causal language model", config_path.display())
        }
    }
}
