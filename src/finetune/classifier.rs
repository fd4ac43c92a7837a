//! `finetune` on classification records: a BERT classifier (a `BertForSequenceClassification`
//! folder, or a `BertModel` folder given a new head) trained through the same ranks as a
//! language model, evaluated by its accuracy, and written as a `BertForSequenceClassification`
//! folder reloaded bit for bit.

use std::path::Path;

use anyhow::Context;
use candle::{DType, Device};
use candle_train::evaluate::ClassifierEvaluator;
use candle_train::models::BertClassifier;
use candle_train::{Hooks, TrainableModel};

use super::{compare_parameters, prepare_output, print_start, train_ranks, FinetuneOptions, FinetuneOutcome};
use crate::datasets::{ClassificationDataset, LabelMap, Records};
use crate::evaluation::classification_samples;

/// The class names of a new head: the training records' labels (sorted), or with
/// `--num-labels N` and integer labels below N, `0..N`.
fn head_labels(options: &FinetuneOptions, records: &Records) -> anyhow::Result<Vec<String>> {
    let found = LabelMap::from_records(records)?;
    let Some(n) = options.num_labels else { return Ok(found.names().to_vec()) };
    if n == found.len() {
        return Ok(found.names().to_vec());
    }
    let below = found.names().iter().all(|l| l.parse::<usize>().is_ok_and(|i| i < n));
    anyhow::ensure!(
        below && n > found.len(),
        "invalid `--num-labels`: {n}, but --data {} has {} labels {:?} (give at least as many, \
         with integer labels below it)",
        options.data.display(),
        found.len(),
        found.names()
    );
    Ok((0..n).map(|i| i.to_string()).collect())
}

/// Fine-tunes a BERT classifier on classification records and writes a
/// `BertForSequenceClassification` folder.
pub(super) fn finetune_classifier(
    options: &FinetuneOptions,
    train_records: &Records,
    valid_records: Option<&Records>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<FinetuneOutcome> {
    anyhow::ensure!(
        options.lora.is_none(),
        "`--lora-rank`: LoRA is not available for a BERT classifier (its head must train in full, \
         PEFT's modules_to_save, which the LoRA layer does not implement); fine-tune it without LoRA"
    );
    anyhow::ensure!(
        Path::new(&options.model).is_dir(),
        "--model {}: --data {} holds classification records (text + label), which train a BERT \
         classifier from a model folder (BertModel or BertForSequenceClassification)",
        options.model,
        options.data.display()
    );
    let labels = head_labels(options, train_records)?;
    let (model, labels, tokenizer) =
        crate::model_source::load_classifier(&options.model, &labels, options.seed, dtype, device)?;
    anyhow::ensure!(
        options.num_labels.is_none_or(|n| n == labels.len()),
        "invalid `--num-labels`: --model {} is a classifier of {} labels {labels:?}",
        options.model,
        labels.len()
    );
    let context = model.context_length();
    anyhow::ensure!(
        options.seq_len <= context,
        "invalid `--seq-len`: {} is longer than the model's positions ({context})",
        options.seq_len
    );
    let map = LabelMap::from_names(labels.clone())
        .map_err(|reason| anyhow::anyhow!("--model {}: id2label: {reason}", options.model))?;
    let train = classification_samples(&map, train_records, &tokenizer)?;
    let valid = match valid_records {
        Some(records) => classification_samples(&map, records, &tokenizer)?,
        None => train.clone(),
    };
    let name = options.data.display().to_string();
    let data = ClassificationDataset::new(&name, train, valid, labels.len(), 0)?;
    print_start(options, model.parameters().num_elements(), train_records.records.len());
    println!("labels: {}", labels.join(", "));
    prepare_output(&options.out)?;
    // Other ranks train structural copies (rank 0's values are broadcast to them).
    let replica = || {
        crate::model_source::load_classifier(&options.model, &labels, options.seed, dtype, device)
            .map(|(model, ..)| model)
            .map_err(|e| candle_train::Error::config("finetune", format!("{e:#}")))
    };
    let trainable = model.parameters().num_elements();
    let hooks = Hooks::new().evaluator(ClassifierEvaluator);
    let (report, model, writer) = train_ranks(model, options, &data, replica, hooks)?;
    if !writer {
        return Ok(FinetuneOutcome { report, trainable, verified: false });
    }
    crate::export::save_classifier(&model, &labels, Path::new(&options.model), &options.out)?;
    let (reloaded, reloaded_labels) = BertClassifier::from_pretrained(&options.out, dtype, &Device::Cpu)
        .with_context(|| format!("reloading {}", options.out.display()))?;
    anyhow::ensure!(
        reloaded_labels == labels,
        "{}: reloaded id2label {reloaded_labels:?} differs from {labels:?}",
        options.out.display()
    );
    // The folder holds the encoder and pooler under `bert.` whatever prefix they were read with.
    let prefix = model.encoder().prefix().to_string();
    let saved_name = |name: &str| match name.strip_prefix(prefix.as_str()) {
        Some(rest) if !name.starts_with(BertClassifier::HEAD) => format!("bert.{rest}"),
        _ => name.to_string(),
    };
    compare_parameters(model.parameters(), reloaded.parameters(), &options.out, saved_name)?;
    println!(
        "saved to {} (BertForSequenceClassification folder); reloaded: bit-identical",
        options.out.display()
    );
    Ok(FinetuneOutcome { report, trainable, verified: true })
}
