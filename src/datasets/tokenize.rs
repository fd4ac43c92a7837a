//! Records to token ids and labels, packing into fixed windows, and the padding collator.
//!
//! Labels follow Hugging Face's convention: `labels[i]` is `input_ids[i]` where the loss counts
//! that token and [`IGNORE_INDEX`] (-100) where it does not; the causal shift (predict token
//! `i + 1` from tokens `..=i`) happens in [`collate`].

use candle::{Device, Tensor};

use super::chat::ChatTemplate;
use super::records::Record;
use super::{DataError, Result};
use crate::gguf_tokenizer::LmTokenizer;

/// The label of a token the loss does not count (Hugging Face's `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// What the data pipeline needs of a tokenizer.
pub trait Tokenize {
    /// Token ids of `text`, with no special tokens added.
    ///
    /// # Errors
    /// The tokenizer's failure, as text.
    fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String>;
    /// The end-of-sequence id appended after texts and completions, if the tokenizer has one.
    fn eos_id(&self) -> Option<u32>;
}

impl Tokenize for LmTokenizer {
    fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        LmTokenizer::encode(self, text).map_err(|e| e.to_string())
    }

    fn eos_id(&self) -> Option<u32> {
        LmTokenizer::eos_id(self)
    }
}

/// One tokenized language-modelling example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Per token: its id where the loss counts it, [`IGNORE_INDEX`] where it does not.
    pub labels: Vec<i64>,
}

impl Example {
    fn push(&mut self, ids: &[u32], trained: bool) {
        self.input_ids.extend_from_slice(ids);
        self.labels.extend(ids.iter().map(|&id| if trained { i64::from(id) } else { IGNORE_INDEX }));
    }

    /// The number of tokens the loss counts after the causal shift (labels of every token but
    /// the first).
    pub fn counted_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Keeps the first `max_len` tokens.
    pub fn truncate(&mut self, max_len: usize) {
        self.input_ids.truncate(max_len);
        self.labels.truncate(max_len);
    }
}

/// Tokenizes a language-modelling record: a text (every token, then EOS), a prompt (masked)
/// and its completion (then EOS), or a conversation rendered by `template` (the assistant
/// spans counted, see [`ChatTemplate::spans`]).
///
/// # Errors
/// [`DataError::Tokenizer`] when tokenizing fails; [`DataError::Template`] for a conversation
/// without a template or one the template cannot split; [`DataError::Template`] too for a
/// classification record (those are encoded with a [`super::LabelMap`]).
pub fn encode_record(
    record: &Record,
    tokenizer: &dyn Tokenize,
    template: Option<&ChatTemplate>,
) -> Result<Example> {
    let encode = |text: &str| tokenizer.encode(text).map_err(DataError::Tokenizer);
    let eos: Vec<u32> = tokenizer.eos_id().into_iter().collect();
    let mut example = Example { input_ids: Vec::new(), labels: Vec::new() };
    match record {
        Record::Text(text) => {
            example.push(&encode(text)?, true);
            example.push(&eos, true);
        }
        Record::PromptCompletion { prompt, completion } => {
            example.push(&encode(prompt)?, false);
            example.push(&encode(completion)?, true);
            example.push(&eos, true);
        }
        Record::Chat(messages) => {
            let template = template.ok_or_else(|| {
                DataError::Template("chat records need a chat template, and the tokenizer has none".into())
            })?;
            for (text, trained) in template.spans(messages)? {
                example.push(&encode(&text)?, trained);
            }
        }
        Record::Labelled { .. } => {
            return Err(DataError::Template(
                "a classification record is not a language-modelling example (use a label map)".into(),
            ))
        }
    }
    Ok(example)
}

/// Concatenates examples and cuts the stream into windows of `window` tokens (the last
/// partial window is dropped), keeping each token's label: pretraining-style packing of
/// text records into fixed-length sequences.
///
/// # Panics
/// Never; `window == 0` gives no windows.
pub fn pack(examples: &[Example], window: usize) -> Vec<Example> {
    if window == 0 {
        return Vec::new();
    }
    let ids: Vec<u32> = examples.iter().flat_map(|e| e.input_ids.iter().copied()).collect();
    let labels: Vec<i64> = examples.iter().flat_map(|e| e.labels.iter().copied()).collect();
    ids.chunks_exact(window)
        .zip(labels.chunks_exact(window))
        .map(|(i, l)| Example { input_ids: i.to_vec(), labels: l.to_vec() })
        .collect()
}

/// A padded batch of causal language-modelling examples: inputs are each example's tokens but
/// the last, targets its labels but the first (so position `i` predicts token `i + 1`), both
/// padded on the right to the longest example (inputs with `pad_id`, targets with
/// [`IGNORE_INDEX`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collated {
    /// Sequences in the batch.
    pub batch: usize,
    /// Positions per sequence (the longest example's length less one).
    pub seq_len: usize,
    /// Input ids, row-major `[batch, seq_len]`.
    pub inputs: Vec<u32>,
    /// Targets, row-major `[batch, seq_len]`, [`IGNORE_INDEX`] where nothing is counted.
    pub targets: Vec<i64>,
    /// Per sequence, its unpadded number of input positions.
    pub lengths: Vec<usize>,
}

impl Collated {
    /// The number of targets the loss counts.
    pub fn counted_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    /// Inputs (`U32`) and targets (`I64`) as `[batch, seq_len]` tensors on `device`.
    ///
    /// # Errors
    /// When a tensor cannot be made on the device.
    pub fn tensors(&self, device: &Device) -> candle::Result<(Tensor, Tensor)> {
        let shape = (self.batch, self.seq_len);
        Ok((
            Tensor::from_slice(&self.inputs, shape, device)?,
            Tensor::from_slice(&self.targets, shape, device)?,
        ))
    }
}

/// Pads `examples` into one batch (see [`Collated`]).
///
/// # Errors
/// [`DataError::Tokenizer`] when there are no examples, or one has fewer than two tokens (no
/// target), or its labels and ids differ in length.
pub fn collate(examples: &[&Example], pad_id: u32) -> Result<Collated> {
    if examples.is_empty() {
        return Err(DataError::Tokenizer("cannot collate an empty batch".into()));
    }
    for (i, e) in examples.iter().enumerate() {
        if e.input_ids.len() < 2 || e.labels.len() != e.input_ids.len() {
            return Err(DataError::Tokenizer(format!(
                "example {i} has {} tokens and {} labels: at least two tokens, one label per token",
                e.input_ids.len(),
                e.labels.len()
            )));
        }
    }
    let seq_len = examples.iter().map(|e| e.input_ids.len() - 1).max().unwrap_or(0);
    let mut out = Collated {
        batch: examples.len(),
        seq_len,
        inputs: Vec::with_capacity(examples.len() * seq_len),
        targets: Vec::with_capacity(examples.len() * seq_len),
        lengths: Vec::with_capacity(examples.len()),
    };
    for e in examples {
        let n = e.input_ids.len() - 1;
        out.inputs.extend_from_slice(&e.input_ids[..n]);
        out.inputs.extend(std::iter::repeat_n(pad_id, seq_len - n));
        out.targets.extend_from_slice(&e.labels[1..]);
        out.targets.extend(std::iter::repeat_n(IGNORE_INDEX, seq_len - n));
        out.lengths.push(n);
    }
    Ok(out)
}
