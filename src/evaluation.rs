//! `candle-fit eval`: a model's loss and perplexity (and accuracy, for a classifier) on a data
//! file, through the same record parsing and tokenization as fine-tuning
//! ([`crate::datasets`]) and the Trainer's evaluators ([`candle_train::evaluate`]).

use std::path::Path;

use candle::Device;
use candle_train::evaluate::{ClassifierEvaluator, Evaluator, LossEvaluator, Metrics};
use candle_train::source::{DataShape, DataSource};
use candle_train::LanguageModel;

use crate::datasets::{
    read_records, ChatTemplate, ClassificationDataset, Format, LabelMap, Records, TokenDataset,
};
use crate::gguf_tokenizer::LmTokenizer;
use crate::model_source::LoadedModel;
use crate::pretrained::TextEncoder;

/// How `eval` cuts and batches the data.
#[derive(Debug, Clone, Copy)]
pub struct EvalConfig {
    /// Tokens per sequence: text is packed into windows of `seq_len + 1` tokens, other records
    /// are cut to it.
    pub seq_len: usize,
    /// Sequences per forward pass.
    pub batch: usize,
}

/// The metrics (`loss` per counted token or sample, `perplexity`, `accuracy` for a
/// classifier) of `model` on every record of `data`, and the number of counted units.
///
/// # Errors
/// A data file error (naming file, line and field), a record the model cannot read (a
/// classification file for a language model, a label outside the classifier's `id2label`), a
/// tokenizer or model error.
pub fn evaluate_file(
    model: &LoadedModel,
    data: &Path,
    config: EvalConfig,
    device: &Device,
) -> anyhow::Result<(Metrics, usize)> {
    anyhow::ensure!(config.seq_len > 0 && config.batch > 0, "--seq-len and --batch must be at least 1");
    let records = read_records(data, None)?;
    let name = data.display().to_string();
    let shape = DataShape { seq_len: config.seq_len, eval_samples: usize::MAX, eval_batch: config.batch };
    match model {
        LoadedModel::CausalLm { model, tokenizer } => {
            evaluate_lm(model, tokenizer, &records, &name, config, &shape, device)
        }
        LoadedModel::Gpt2 { model, tokenizer } => {
            evaluate_lm(model, tokenizer, &records, &name, config, &shape, device)
        }
        LoadedModel::Classifier { model, labels, tokenizer } => {
            anyhow::ensure!(
                records.format == Format::Classification,
                "{name}: {} records, but the model is a classifier (it needs `text` and `label`)",
                records.format
            );
            let map = LabelMap::from_names(labels.clone())
                .map_err(|reason| anyhow::anyhow!("the model's id2label: {reason}"))?;
            let samples = classification_samples(&map, &records, tokenizer)?;
            let dataset = ClassificationDataset::new(&name, samples.clone(), samples, labels.len(), 0)?;
            let batches = dataset.validation(&shape, device)?;
            let count = batches.iter().map(|b| b.count).sum();
            Ok((ClassifierEvaluator.evaluate(model, &batches)?, count))
        }
    }
}

/// Each classification record's token ids (through `tokenizer`, with its special tokens) and
/// class index in `map`.
///
/// # Errors
/// A record whose label is not in `map` (naming file, line and label), or a tokenizer error.
pub fn classification_samples(
    map: &LabelMap,
    records: &Records,
    tokenizer: &TextEncoder,
) -> anyhow::Result<Vec<(Vec<u32>, u32)>> {
    map.resolve(records)?
        .into_iter()
        .map(|(text, label)| {
            let ids = tokenizer.encode(&[text], &Device::Cpu)?.ids.to_vec2::<u32>()?;
            Ok((ids.into_iter().next().unwrap_or_default(), label as u32))
        })
        .collect()
}

/// Loss and perplexity of a causal language model over `records` (not classification ones).
fn evaluate_lm<M: LanguageModel>(
    model: &M,
    tokenizer: &LmTokenizer,
    records: &Records,
    name: &str,
    config: EvalConfig,
    shape: &DataShape,
    device: &Device,
) -> anyhow::Result<(Metrics, usize)> {
    anyhow::ensure!(
        records.format != Format::Classification,
        "{name}: classification records, but the model is a causal language model"
    );
    let template = match (records.format, tokenizer.chat_template()) {
        (Format::Chat, Some(source)) => {
            let token = |id: Option<u32>| id.and_then(|id| tokenizer.token(id)).unwrap_or_default();
            Some(ChatTemplate::new(source, &token(tokenizer.bos_id()), &token(tokenizer.eos_id()))?)
        }
        (Format::Chat, None) => {
            anyhow::bail!("{name}: chat records, but the model's tokenizer has no chat template")
        }
        _ => None,
    };
    let mut examples =
        crate::finetune::tokenize_records(name, records, tokenizer, template.as_ref(), config.seq_len + 1)?;
    examples.retain(|e| e.input_ids.len() >= 2);
    anyhow::ensure!(!examples.is_empty(), "{name}: no record has two tokens to predict one from");
    let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
    let dataset = TokenDataset::new(name, examples.clone(), examples, pad)?;
    let batches = dataset.validation(shape, device)?;
    let count = batches.iter().map(|b| b.count).sum();
    Ok((LossEvaluator.evaluate(model, &batches)?, count))
}
