//! Fine-tuning data: records read from JSONL or CSV files, validated before any work starts,
//! every bad record named by file, line and field; a chat template (Jinja, as Hugging Face
//! tokenizers ship it) for `{"messages": [...]}` records; tokenized examples whose labels mask
//! what the loss must not see (`-100`, as Hugging Face uses); packing into fixed windows and a
//! padding collator.
//!
//! Formats (one per file, decided by the first record's keys, or asked for):
//!
//! | format | JSONL record | labels |
//! |---|---|---|
//! | [`Format::Text`] | `{"text": "..."}` | every token |
//! | [`Format::PromptCompletion`] | `{"prompt": "...", "completion": "..."}` | the completion's tokens (and EOS) |
//! | [`Format::Chat`] | `{"messages": [{"role": "user", "content": "..."}, ...]}` | the assistant turns as the template renders them |
//! | [`Format::Classification`] | `{"text": "...", "label": "..." or 3}`, or CSV with `text` and `label` columns | the label's index in a [`LabelMap`] |
//!
//! Keys other than these are ignored (as Hugging Face's tools do), so a record may carry ids or
//! metadata; a record missing its format's key, or with a key of the wrong type, is refused.

mod chat;
mod records;
mod source;
mod tokenize;

pub use chat::ChatTemplate;
pub use records::{
    read_messages, read_records, read_records_from, Format, LabelMap, Message, Record, Records,
    MAX_DATA_FILE_BYTES,
};
pub use source::{ClassificationDataset, TokenDataset};
pub use tokenize::{collate, encode_record, pack, Collated, Example, Tokenize, IGNORE_INDEX};

use std::path::PathBuf;

/// Why data could not be read, parsed or tokenized. Every variant names the file, and a record's
/// line (1-based; for CSV the line its record starts on) where there is one.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file as a whole is unusable (not a regular file, too large, empty, mixed formats).
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// One record is malformed.
    #[error("{}:{line}: {reason}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// The record's line, 1-based.
        line: usize,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// The chat template does not parse, fails to render, or renders a conversation in a way
    /// that cannot be split into prompt and assistant spans.
    #[error("chat template: {0}")]
    Template(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// `Result` with a [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;
