//! Tokenized datasets as the Trainer's [`DataSource`]s: [`TokenDataset`] (causal language
//! modelling with masked labels, padded per micro-batch) and [`ClassificationDataset`]
//! (token ids and a class per sample, for [`BertClassifier`](crate::train::models::BertClassifier)).
//!
//! Sample `j` of step `s` is example `rng(seed, s, j) mod n`, so the data a step sees does not
//! depend on how the global batch is cut into micro-batches or ranks.

use std::ops::Range;

use candle::{Device, Tensor};
use candle_ckpt::RngKey;
use candle_train::checkpoint::sha256_hex;
use candle_train::models::ClassificationBatch;
use candle_train::{Counted, DataShape, DataSource, Error, TokenBatch};

use super::tokenize::{collate, Example};

/// The example drawn for sample `index` of step `step`.
fn draw(seed: u64, step: u64, index: usize, n: usize) -> usize {
    RngKey { seed, step, micro_batch: index as u64, segment: 0, stream: 0x_da7a }.rng().below(n as u64)
        as usize
}

fn data_error(what: &str, reason: impl Into<String>) -> Error {
    Error::config("data", format!("{what}: {}", reason.into()))
}

/// Tokenized causal-LM examples (labels `-100` where the loss does not count), split into
/// training and validation. A batch holds the drawn examples cut to `seq_len + 1` tokens and
/// right-padded to the longest ([`collate`]): targets `I64`, so the model's loss is the mean
/// over counted targets and the Trainer weights micro-batches by their counted targets.
#[derive(Debug, Clone)]
pub struct TokenDataset {
    name: String,
    train: Vec<Example>,
    validation: Vec<Example>,
    pad_id: u32,
}

impl TokenDataset {
    /// A dataset named `name` (in errors and its fingerprint); padding inputs with `pad_id`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when a split is empty or an example has fewer than two tokens
    /// or labels of another length, naming the split and the example.
    pub fn new(
        name: &str,
        train: Vec<Example>,
        validation: Vec<Example>,
        pad_id: u32,
    ) -> candle_train::Result<Self> {
        for (split, examples) in [("train", &train), ("validation", &validation)] {
            if examples.is_empty() {
                return Err(data_error(name, format!("the {split} split has no examples")));
            }
            if let Some((i, e)) = examples
                .iter()
                .enumerate()
                .find(|(_, e)| e.input_ids.len() < 2 || e.labels.len() != e.input_ids.len())
            {
                return Err(data_error(
                    name,
                    format!(
                        "{split} example {i} has {} tokens and {} labels: at least two tokens, one label per token",
                        e.input_ids.len(),
                        e.labels.len()
                    ),
                ));
            }
        }
        Ok(Self { name: name.to_string(), train, validation, pad_id })
    }

    /// Examples of the training split.
    pub fn train(&self) -> &[Example] {
        &self.train
    }

    fn cut(example: &Example, seq_len: usize) -> Example {
        let mut e = example.clone();
        e.truncate(seq_len + 1);
        e
    }

    fn batch_of(&self, examples: &[Example], device: &Device) -> candle_train::Result<TokenBatch> {
        let refs: Vec<&Example> = examples.iter().collect();
        let collated = collate(&refs, self.pad_id).map_err(|e| data_error(&self.name, e.to_string()))?;
        let (inputs, targets) = collated.tensors(device)?;
        Ok(TokenBatch { inputs, targets })
    }

    fn drawn(&self, seed: u64, step: u64, samples: Range<usize>, seq_len: usize) -> Vec<Example> {
        samples.map(|j| Self::cut(&self.train[draw(seed, step, j, self.train.len())], seq_len)).collect()
    }
}

impl DataSource for TokenDataset {
    type Batch = TokenBatch;

    fn check(&self, shape: &DataShape) -> candle_train::Result<()> {
        if shape.seq_len == 0 {
            return Err(data_error(&self.name, "a sequence length of 0 holds no target"));
        }
        Ok(())
    }

    /// `tokens NAME seq_len=N pad=P sha256=H`, H over every example's ids and labels.
    fn fingerprint(&self, shape: &DataShape) -> String {
        let mut bytes = Vec::new();
        for e in &self.train {
            bytes.extend((e.input_ids.len() as u64).to_le_bytes());
            bytes.extend(e.input_ids.iter().flat_map(|id| id.to_le_bytes()));
            bytes.extend(e.labels.iter().flat_map(|l| l.to_le_bytes()));
        }
        format!(
            "tokens {} seq_len={} pad={} sha256={}",
            self.name,
            shape.seq_len,
            self.pad_id,
            sha256_hex(&bytes)
        )
    }

    fn batch(
        &self,
        seed: u64,
        step: u64,
        samples: Range<usize>,
        shape: &DataShape,
        device: &Device,
    ) -> candle_train::Result<TokenBatch> {
        self.batch_of(&self.drawn(seed, step, samples, shape.seq_len), device)
    }

    fn count(
        &self,
        seed: u64,
        step: u64,
        samples: Range<usize>,
        shape: &DataShape,
    ) -> candle_train::Result<usize> {
        Ok(self.drawn(seed, step, samples, shape.seq_len).iter().map(Example::counted_targets).sum())
    }

    fn validation(
        &self,
        shape: &DataShape,
        device: &Device,
    ) -> candle_train::Result<Vec<Counted<TokenBatch>>> {
        let examples: Vec<Example> = self
            .validation
            .iter()
            .take(shape.eval_samples.max(1))
            .map(|e| Self::cut(e, shape.seq_len))
            .collect();
        examples
            .chunks(shape.eval_batch.max(1))
            .map(|chunk| {
                let count = chunk.iter().map(Example::counted_targets).sum();
                Ok(Counted { batch: self.batch_of(chunk, device)?, count })
            })
            .collect()
    }
}

/// Token ids and a class per sample, split into training and validation. A batch pads the
/// drawn samples (cut to `seq_len` tokens) to the longest with `pad_id` and a zero attention
/// mask; token types are zero. Every sample counts once (the model's loss is the mean over the
/// batch's samples).
#[derive(Debug, Clone)]
pub struct ClassificationDataset {
    name: String,
    train: Vec<(Vec<u32>, u32)>,
    validation: Vec<(Vec<u32>, u32)>,
    num_labels: usize,
    pad_id: u32,
}

impl ClassificationDataset {
    /// A dataset named `name` of `(ids, label)` samples with labels below `num_labels`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an empty split, a sample without tokens or a label out of
    /// range, naming the split and the sample.
    pub fn new(
        name: &str,
        train: Vec<(Vec<u32>, u32)>,
        validation: Vec<(Vec<u32>, u32)>,
        num_labels: usize,
        pad_id: u32,
    ) -> candle_train::Result<Self> {
        for (split, samples) in [("train", &train), ("validation", &validation)] {
            if samples.is_empty() {
                return Err(data_error(name, format!("the {split} split has no samples")));
            }
            for (i, (ids, label)) in samples.iter().enumerate() {
                if ids.is_empty() {
                    return Err(data_error(name, format!("{split} sample {i} has no tokens")));
                }
                if *label as usize >= num_labels {
                    return Err(data_error(
                        name,
                        format!("{split} sample {i} has label {label}, not below the {num_labels} labels"),
                    ));
                }
            }
        }
        Ok(Self { name: name.to_string(), train, validation, num_labels, pad_id })
    }

    /// The number of classes.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    fn batch_of(
        &self,
        samples: &[&(Vec<u32>, u32)],
        seq_len: usize,
        device: &Device,
    ) -> candle_train::Result<ClassificationBatch> {
        let width = samples.iter().map(|(ids, _)| ids.len().min(seq_len)).max().unwrap_or(1).max(1);
        let (mut ids, mut mask) = (Vec::with_capacity(samples.len() * width), Vec::new());
        for (tokens, _) in samples {
            let n = tokens.len().min(seq_len);
            ids.extend_from_slice(&tokens[..n]);
            ids.extend(std::iter::repeat_n(self.pad_id, width - n));
            mask.extend(std::iter::repeat_n(1u32, n));
            mask.extend(std::iter::repeat_n(0u32, width - n));
        }
        let shape = (samples.len(), width);
        let labels: Vec<u32> = samples.iter().map(|(_, l)| *l).collect();
        Ok(ClassificationBatch {
            ids: Tensor::from_vec(ids, shape, device)?,
            token_types: Tensor::zeros(shape, candle::DType::U32, device)?,
            mask: Tensor::from_vec(mask, shape, device)?,
            labels: Tensor::from_vec(labels, samples.len(), device)?,
        })
    }
}

impl DataSource for ClassificationDataset {
    type Batch = ClassificationBatch;

    /// `classification NAME labels=K seq_len=N pad=P sha256=H`.
    fn fingerprint(&self, shape: &DataShape) -> String {
        let mut bytes = Vec::new();
        for (ids, label) in &self.train {
            bytes.extend((ids.len() as u64).to_le_bytes());
            bytes.extend(ids.iter().flat_map(|id| id.to_le_bytes()));
            bytes.extend(label.to_le_bytes());
        }
        format!(
            "classification {} labels={} seq_len={} pad={} sha256={}",
            self.name,
            self.num_labels,
            shape.seq_len,
            self.pad_id,
            sha256_hex(&bytes)
        )
    }

    fn batch(
        &self,
        seed: u64,
        step: u64,
        samples: Range<usize>,
        shape: &DataShape,
        device: &Device,
    ) -> candle_train::Result<ClassificationBatch> {
        let drawn: Vec<&(Vec<u32>, u32)> =
            samples.map(|j| &self.train[draw(seed, step, j, self.train.len())]).collect();
        self.batch_of(&drawn, shape.seq_len, device)
    }

    fn count(
        &self,
        _seed: u64,
        _step: u64,
        samples: Range<usize>,
        _shape: &DataShape,
    ) -> candle_train::Result<usize> {
        Ok(samples.len())
    }

    fn validation(
        &self,
        shape: &DataShape,
        device: &Device,
    ) -> candle_train::Result<Vec<Counted<ClassificationBatch>>> {
        let samples: Vec<&(Vec<u32>, u32)> = self.validation.iter().take(shape.eval_samples.max(1)).collect();
        samples
            .chunks(shape.eval_batch.max(1))
            .map(|chunk| {
                Ok(Counted { batch: self.batch_of(chunk, shape.seq_len, device)?, count: chunk.len() })
            })
            .collect()
    }
}
